#!/bin/sh
# Runs the experiments one after another (each resumes where it stopped); extra arguments go to
# every script, e.g. `sh experiments/run_all.sh --steps 1000`. The GPU protocol is one command of
# its own: `graftlab experiment transformer --preset gpu`.
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# the headline (gpt/tiny at batch 256) and the gap against the batch size (16, 64, 256 at equal steps);
# these take their own settings from the presets, so the extra arguments are not passed to them
for b in 256 64 16; do
    "$PY" experiments/transformer.py --preset cpu$b
done
"$PY" experiments/gap_curve.py
"$PY" experiments/transformer.py --task bert "$@"
"$PY" experiments/transformer.py --task gpt "$@"
for name in resnet batch_transfer; do
    "$PY" experiments/$name.py "$@"
done
