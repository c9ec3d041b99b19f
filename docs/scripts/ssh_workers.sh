#!/usr/bin/env bash
# One evomerge search per host over plain ssh, every GPU of each host a worker, one study.
#   STORAGE=postgresql://evo@db-host/evomerge ./ssh_workers.sh experiments/big.yaml gpu1 gpu2 gpu3
# Each host needs the checkout at $REPO (same path), its .venv, the models and fitness data
# (see docs/distributed.md). A host's command is rerun when it lost the database (exit 2
# with "lost the study's storage"), up to $RETRIES times, 60 s apart.
set -euo pipefail
EXPERIMENT="$1"; shift
: "${STORAGE:?set STORAGE to the PostgreSQL URL of the study}"
REPO="${REPO:-$PWD}"
RETRIES="${RETRIES:-5}"

remote() {  # runs on each host: repo, experiment, storage, retries
  cd "$1"
  local devices errors code
  devices=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed 's/^/cuda:/' | paste -sd,)
  errors="search-$(hostname).err"
  for _ in $(seq 0 "$4"); do
    .venv/bin/evomerge search "$2" --storage "$3" --devices "$devices" -q 2>"$errors" && return 0
    code=$?
    cat "$errors" >&2
    grep -q "lost the study's storage" "$errors" || return "$code"
    sleep 60
  done
  return 1
}

mkdir -p logs
for host in "$@"; do
  ssh "$host" bash -s -- "$(printf '%q ' "$REPO" "$EXPERIMENT" "$STORAGE" "$RETRIES")" \
    < <(declare -f remote; echo 'remote "$@"') >"logs/$host.out" 2>"logs/$host.err" &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
for host in "$@"; do echo "== $host"; tail -n 3 "logs/$host.out"; done
exit $status
