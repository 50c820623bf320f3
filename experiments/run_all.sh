#!/bin/sh
# Runs the three experiments one after another (each resumes where it stopped); extra arguments go
# to every script, e.g. `sh experiments/run_all.sh --device cuda --steps 3000`.
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
for name in transformer resnet batch_transfer; do
    "$PY" experiments/$name.py "$@"
done
