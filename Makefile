PYTHON ?= python3
# Compile the CUDA kernel for A100 (8.0) and H100 (9.0), with PTX for newer GPUs, unless the
# caller says otherwise; no GPU is needed to compile.
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX

.PHONY: install build test demo

install:
	$(PYTHON) -m pip install -q -r requirements.txt

build: install
	$(PYTHON) ops/setup.py build_ext --inplace

test: build
	$(PYTHON) -m pytest -q tests

demo: build
	PYTHON=$(PYTHON) bash tools/run_demo.sh
