# Set-up and the two everyday commands: `make demo` (the main job) and `make test` (the tests).
# The venv gets the CPU build of PyTorch from this machine's wheel (torch==2.13.0) unless a torch is
# already importable there; on a GPU machine, install PyTorch your usual way into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.graftlab-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test bench figures clean

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

clean:
	rm -rf $(VENV) build *.egg-info
