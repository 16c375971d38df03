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

.PHONY: install demo test test-fast test-gpu bench build-base build-preset crd lint e2e-container e2e-cluster clean

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
	$(VENV)/bin/lint-imports

e2e-container: install
	$(PY) tests/e2e/container.py

# The seed's Workspaces through the real operator, their pods run with docker (tests/cluster).
e2e-cluster: install
	$(VENV)/bin/pytest tests/cluster -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf out build dist *.egg-info
