# Kaito in Python. `make demo` runs the main job on the embedded default;
# `make test` passes the tests. Both install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Console scripts, not `python -m`: `-m` puts the working directory first on
# sys.path, where this repo's operator/ folder would shadow the stdlib module.
PIP := $(VENV)/bin/pip
# torch is installed first and pinned: an unpinned torch (or peft/transformers
# before torch) pulls a multi-GB CUDA build. For CUDA images use e.g.
#   make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
EXTRAS ?= all
MODEL ?= tiny-phi-3
REGISTRY ?= out/registry
TAG ?=
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-gpu bench build-base build-preset crd lint typecheck e2e-container e2e-cluster clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -I -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $@

install:
	@test -x $(PY) || rm -f $(VENV)/.installed
	@$(MAKE) --no-print-directory $(VENV)/.installed

demo: install
	$(PY) tests/e2e/demo.py $(if $(filter-out out/registry,$(REGISTRY)),--registry $(REGISTRY))

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/pytest -m "not slow and not docker" $(PYTEST_ARGS)

# CUDA paths only (they skip, saying why, where torch sees too few GPUs); needs a CUDA build of torch.
test-gpu: install
	$(VENV)/bin/pytest -m "gpu or multi_gpu" -rs $(PYTEST_ARGS)

bench: install
	$(PY) bench/image_push.py
	$(PY) bench/serving.py
	$(PY) bench/tuning.py
	$(PY) bench/operator.py

# The runtime base (Dockerfiles/base), built once, offline, with a private dockerd (root):
# stored as $(REGISTRY)/kaito-base:<version> (a layout dir or a registry), where build-preset
# finds it by default.
build-base: install
	$(PY) tests/e2e/container.py --base-only --registry $(REGISTRY)

# Weights on the runtime base: --base / KAITO_BASE_IMAGE, else $(REGISTRY)/kaito-base:<version>,
# else out/registry/kaito-base:<version>; none of them is an error saying how to get one.
build-preset: install
	$(VENV)/bin/kaito image build-preset $(MODEL) --registry $(REGISTRY) $(if $(TAG),--tag $(TAG))

crd: install
	$(VENV)/bin/kaito operator crd --out-dir .
	$(VENV)/bin/kaito operator manifests --out-dir .

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	@$(MAKE) --no-print-directory typecheck

# mypy (config: [tool.mypy] in pyproject.toml) over the five packages as `kaito.<pkg>`.
# setuptools maps kaito.<pkg> to the folder <pkg>/ and the editable install resolves that
# with an import hook mypy cannot follow, so mypy reads them through links under
# build/typecheck/kaito/, run from build/typecheck: mypy also searches its working directory,
# where this repo's operator/ would shadow the stdlib `operator`. The shim's __init__.py makes
# mypy pick presets/training_configs.py over the data folder presets/training_configs/ beside
# it, as Python does. Paths in the report are rewritten back to <pkg>/...
# Offline: needs only what `make install` put in the venv.
TYPECHECK_DIR := build/typecheck
KAITO_PACKAGES := presets image_builder runtime tuning operator
typecheck: install
	@mkdir -p $(TYPECHECK_DIR)/kaito
	@echo '# mypy shim: see typecheck in the Makefile' >$(TYPECHECK_DIR)/kaito/__init__.py
	@for p in $(KAITO_PACKAGES); do ln -sfn ../../../$$p $(TYPECHECK_DIR)/kaito/$$p; done
	set -o pipefail; cd $(TYPECHECK_DIR) && $(abspath $(VENV))/bin/mypy --config-file $(CURDIR)/pyproject.toml \
	  $(addprefix -p kaito.,$(KAITO_PACKAGES)) | sed -E 's#^([^ :]*/)?kaito/([a-z_]+/)#\2#'

e2e-container: install
	$(PY) tests/e2e/container.py

# The seed's Workspaces through the real operator, their pods run with docker (tests/cluster).
e2e-cluster: install
	$(VENV)/bin/pytest tests/cluster -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf out build dist *.egg-info
