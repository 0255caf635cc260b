# attune: `make demo` runs the whole path on this machine, `make test` runs every test.
# Both set up .venv first (once; again when pyproject.toml changes).

VENV    ?= .venv
PY      := $(VENV)/bin/python
UV      := $(VENV)/bin/uv
STAMP   := $(VENV)/.installed
# The one version of uv that installs and resolves; the dev extra pins the same.
UV_VERSION := 0.13.10
# torch==2.13.0+cpu is not on PyPI: take it from a local wheel folder when the machine has one,
# else from PyTorch's CPU index.
TORCH_SOURCE := $(if $(wildcard /opt/wheels/torch-2.13.0+cpu*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?=

.PHONY: setup lock demo test test-fast cluster bench-train data clean

setup: $(STAMP)

# Exactly the lock's set (docs/dependencies.md): torch first from its own source, then every
# other package by hash, then attune itself with nothing more. Bytecode compiled at install:
# where PYTHONDONTWRITEBYTECODE is set (many CI images and containers) every process would
# compile torch, Ray and vLLM again on each start.
$(STAMP): pyproject.toml requirements/cpu-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install -q 'uv==$(UV_VERSION)'
	$(UV) pip install -q --python $(PY) --compile-bytecode $(TORCH_SOURCE) 'torch==2.13.0+cpu'
	$(UV) pip install -q --python $(PY) --require-hashes --no-deps --compile-bytecode -r requirements/cpu-dev.txt
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolve the lock files to the newest versions pyproject.toml allows; then `make test` and
# commit both (docs/dependencies.md).
lock:
	test -x $(UV) || { test -x $(PY) || python3 -m venv $(VENV); $(PY) -m pip install -q 'uv==$(UV_VERSION)'; }
	UV=$(UV) requirements/lock.sh

demo: $(STAMP)
	$(PY) -m attune.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The cpu image, built here with podman from a local Debian base (docs/image.md); test-image
# runs the smoke tests inside it, which build it first (a cache hit when nothing changed).
# Not part of `make test`: a cold build takes many minutes.
.PHONY: image test-image image-tools
image: image-tools
	python3 tests/podman_image.py build

test-image: image-tools $(STAMP)
	$(PY) -m pytest --image tests/test_image.py $(PYTEST_ARGS)

# One line saying what to install, instead of a traceback from deep in the build.
image-tools:
	@for tool in podman debootstrap; do command -v $$tool >/dev/null || { \
	  echo "make: $$tool not found; install the image tools: apt-get install podman debootstrap (docs/image.md)"; \
	  exit 1; }; done

# A head with no CPUs and two worker nodes with private disks, on this machine (root: it
# uses mount namespaces); prints how to use it, Ctrl-C stops it (tests/multinode.py).
cluster: $(STAMP)
	$(PY) tests/multinode.py

bench-train: $(STAMP)
	$(PY) bench/train.py

data: $(STAMP)
	$(PY) -m attune.corpus data/transformer_qa.jsonl data/transformer_qa_preferences.jsonl

clean:
	rm -rf $(VENV) tests/artifacts
