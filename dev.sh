#!/usr/bin/env bash
# One entry point for a fresh machine: installs into .venv on first use (CPU torch first, so
# pip never pulls a multi-GB CUDA build), then runs `evomerge demo` or the test suite.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${EVOMERGE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${EVOMERGE_TORCH:-torch==2.13.0}"

install() {
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$VENV/.installed"
}

if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
  echo "installing evomerge into $VENV ..." >&2
  install
fi

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  demo) exec "$VENV/bin/evomerge" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  bench) exec "$VENV/bin/python" "benchmarks/${1:-merge_to_disk}.py" "${@:2}" ;;
  *) echo "usage: ./dev.sh demo|test|bench [args...]" >&2; exit 2 ;;
esac
