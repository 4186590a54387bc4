PYTHON ?= python3
# Compile the CUDA kernel for A100 (8.0) and H100 (9.0), with PTX for newer GPUs, unless the
# caller says otherwise; no GPU is needed to compile.
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX

# pip runs again only when a requirements file is newer than its stamp (`make install` after
# changing the environment by hand: `rm -r build/stamps`).
STAMPS := build/stamps

.PHONY: install install-test build lint test test-fast demo

$(STAMPS)/runtime: requirements.txt
	$(PYTHON) -m pip install -q -r requirements.txt
	mkdir -p $(STAMPS) && touch $@

$(STAMPS)/test: $(STAMPS)/runtime tests/requirements.txt
	$(PYTHON) -m pip install -q -r tests/requirements.txt
	touch $@

install: $(STAMPS)/runtime

install-test: $(STAMPS)/test

build: install
	$(PYTHON) ops/setup.py build_ext --inplace

lint: install-test
	$(PYTHON) -m ruff check .

test: build install-test
	$(PYTHON) -m pytest -q tests

test-fast: build install-test
	$(PYTHON) -m pytest -q -m "not slow" tests

demo: build
	PYTHON=$(PYTHON) bash tools/run_demo.sh
