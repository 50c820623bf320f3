# Set-up and the two everyday commands: `make demo` (the main job) and `make test` (the tests).
# The venv gets the CPU build of PyTorch from this machine's wheel (torch==2.13.0) unless a torch is
# already importable there; on a GPU machine, install PyTorch your usual way into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.graftlab-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test bench notebooks figures clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@[ -d $(FMNIST) ] || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } \
	  || echo "warning: could not install Debian's dataset-fashion-mnist; the resnet task needs --data" >&2
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

demo: $(STAMP)
	$(BIN)/graftlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# docs/figures/*.png from the sample traces (the commands of docs/figures/README.md)
figures: $(STAMP)
	$(BIN)/graftlab plot sample_traces/bert-adam-sgd-bs16 --figure 5 -o docs/figures/figure5.png --overwrite
	$(BIN)/graftlab plot sample_traces/bert-adam-sgd-bs16 sample_traces/bert-adam-sgd-bs64 --figure 6 \
	  --steps 2000 --steps 500 -o docs/figures/figure6.png --overwrite
	$(BIN)/graftlab plot sample_traces/bert-adam-sgd-bs16 sample_traces/bert-adam-sgd-bs64 --figure 8 \
	  --steps 2000 --steps 500 -o docs/figures/figure8.png --overwrite
	$(BIN)/graftlab plot sample_traces/resnet-sgd-adagrad-global --figure 4 -o docs/figures/figure4.png --overwrite

# every notebook top to bottom; the executed copies (with their figures) go to runs/notebooks/
notebooks: $(STAMP)
	@mkdir -p runs/notebooks
	OMP_NUM_THREADS=1 $(BIN)/jupyter execute --output='../runs/notebooks/{notebook_name}' notebooks/*.ipynb

clean:
	rm -rf $(VENV) build *.egg-info
