PYTHON ?= python3
# The CUDA architectures come from TORCH_CUDA_ARCH_LIST when it is set, else from ops/setup.py
# (the visible GPUs, or with none every architecture in its DEFAULT_ARCH_LIST).
GPU_CHECK_OUT ?= gpu_check

# pip runs again only when a requirements file is newer than its stamp (`make install` after
# changing the environment by hand: `rm -r build/stamps`).
STAMPS := build/stamps

.PHONY: install install-test build lint test test-fast demo gpu-check

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

# The demo runs on the CPU, so it builds the CPU kernel alone (an existing build with the CUDA
# kernel serves as well): MSDA_WITH_CUDA=0 is the only way to skip the CUDA kernel where nvcc is,
# and setup.py says so in one line. make build and make test build the CUDA kernel where nvcc is,
# and fail when it does not compile.
demo: install
	MSDA_WITH_CUDA=0 $(PYTHON) ops/setup.py build_ext --inplace
	PYTHON=$(PYTHON) bash tools/run_demo.sh

# Installs nothing from the registry (GPU machines may have their own torch): it builds the op for
# the visible GPUs itself, and takes wheels for missing packages from GPU_CHECK_WHEELS.
gpu-check:
	$(PYTHON) tools/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(GPU_CHECK_WHEELS),--wheels $(GPU_CHECK_WHEELS))
