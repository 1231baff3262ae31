"""How mmgrad's kernels are compiled: read by setup.py (an install that can see torch) and by
mmgrad._jit (the first use after an install that could not). Standard library only, so
setup.py can load it before torch is importable."""

import os

# -fno-trapping-math lets GCC turn the selects of the element math into blends, so the
# coordinate loops vectorise (5x faster); mmgrad never relies on FP exception traps.
CPU_CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-wrapv", "-Wall",
                 "-Wno-unknown-pragmas"]
CPU_NATIVE_FLAGS = ["-march=native"]  # dropped by MMGRAD_PORTABLE=1
CPU_LINK_FLAGS = ["-fopenmp"]


def cpu_flags() -> list:
    """The C++ flags of the cpu kernels: ``-march=native`` unless ``MMGRAD_PORTABLE=1``."""
    return CPU_CXX_FLAGS + ([] if os.environ.get("MMGRAD_PORTABLE") == "1" else CPU_NATIVE_FLAGS)

# C++20: torch 2.14's headers refuse older standards (#error C++20 or later ...)
CUDA_CXX_FLAGS = ["-O3", "-std=c++20"]
CUDA_NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo"]
CUDA_ARCHS = "8.0;9.0"  # TORCH_CUDA_ARCH_LIST's default here: Ampere and Hopper

# Sources, relative to the csrc/ directory (shipped inside the wheel as mmgrad/_csrc).
CPU_SOURCES = ["cpu/bindings.cpp", "cpu/bogc.cpp", "cpu/moo.cpp"]
CUDA_SOURCES = ["cuda/bindings.cpp", "cuda/bogc_kernels.cu"]
HEADERS = ["mmgrad_math.h", "cpu/bogc.h", "cpu/common.h", "cuda/launch.h"]
