#!/bin/sh
# Runs the experiments one after another (each resumes where it stopped); extra arguments go to
# every script, e.g. `sh experiments/run_all.sh --steps 1000`. The GPU protocol is one command of
# its own: `graftlab experiment transformer --preset gpu`.
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" experiments/transformer.py --task bert "$@"
"$PY" experiments/transformer.py --task gpt "$@"
for name in resnet batch_transfer; do
    "$PY" experiments/$name.py "$@"
done
