#!/usr/bin/env bash
# Check that an installed package (`pip install .`, not editable) works on its own: a fresh
# venv (CPU torch first, so pip does not pull a CUDA build), then this checkout installed
# non-editable; from an empty folder, `evomerge demo --n-trials 4` must build the zoo and
# write its study, best.yaml and report under runs/ there (and nothing beside the package), and the
# shipped experiment, fitness and search space must be found by name.
#   docs/scripts/check_installed.sh [WORK]    # default WORK: a new temporary folder
# Takes about 20 minutes on 2 busy CPU cores (most of it the zoo build); see the timings it prints.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${EVOMERGE_TORCH:-torch==2.13.0}"
VENV="$WORK/venv"
RUN="$WORK/run"
stamp() { echo "[$(date +%T), $((SECONDS / 60)) min $((SECONDS % 60)) s] $*"; }

stamp "venv in $VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
stamp "pip install $REPO (not editable)"
"$VENV/bin/python" -m pip install -q "$REPO"
PACKAGE="$(cd "$WORK" && "$VENV/bin/python" -c 'import evomerge, pathlib; print(pathlib.Path(evomerge.__file__).parent)')"
case "$PACKAGE" in "$VENV"/*) ;; *) echo "FAIL: evomerge imports from $PACKAGE, not the venv" >&2; exit 1 ;; esac

mkdir -p "$RUN"
cd "$RUN"
[ -z "$(ls -A)" ] || { echo "FAIL: $RUN is not empty" >&2; exit 1; }
touch "$WORK/.before-demo"
stamp "evomerge demo --n-trials 4 in $RUN"
"$VENV/bin/evomerge" demo --n-trials 4 --quiet
stamp "demo done"
for path in runs/zoo/zoo.json runs/demo/study.db runs/demo/best.yaml runs/demo/report/index.html; do
  [ -e "$path" ] || { echo "FAIL: the demo did not write $RUN/$path" >&2; exit 1; }
done
written="$(find "$(dirname "$PACKAGE")" -mindepth 1 -maxdepth 1 -newer "$WORK/.before-demo" -not -name __pycache__)"
written+="$(find "$PACKAGE" -mindepth 1 -newer "$WORK/.before-demo" -not -path '*__pycache__*')"
[ -z "$written" ] || { echo "FAIL: the demo wrote beside the package: $written" >&2; exit 1; }
[ "$(ls -A)" = runs ] || { echo "FAIL: the demo wrote more than runs/ in $RUN: $(ls -A)" >&2; exit 1; }

stamp "names: the shipped experiment, search space and fitness"
"$VENV/bin/evomerge" status zoo_ps --storage "sqlite:///$RUN/runs/demo/study.db"
"$VENV/bin/evomerge" export zoo_ps --storage "sqlite:///$RUN/runs/demo/study.db" -o "$WORK/exported.yaml"
cmp "$WORK/exported.yaml" runs/demo/best.yaml
"$VENV/bin/python" - <<'PY'
from evomerge.fitness import load_fitness
from evomerge.io import shipped
from evomerge.search import available_spaces, load_search_space
from evomerge.search.experiment import load_experiment

assert "ps_ties" in available_spaces(), available_spaces()
space = load_search_space("ps_ties", models=[f"runs/zoo/{s}" for s in ("increment", "reverse", "dates")],
                          base_model="runs/zoo/base")
experiment = load_experiment("zoo_ps")
fitness = load_fitness(experiment.fitness)
print(f"ps_ties: {len(space.distributions())} parameters; zoo_ps -> fitness {experiment.fitness} "
      f"({', '.join(fitness.metrics)}); shipped from {shipped.root()}")
assert "site-packages" in str(shipped.root())
PY
stamp "OK: the installed package works from $RUN"
