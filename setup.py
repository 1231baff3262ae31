"""Build of mmgrad: the Python package plus its C++/OpenMP extension ``mmgrad._C``.

The extension is optional: set ``MMGRAD_NO_EXTENSION=1`` to install the pure-PyTorch
package only (``mmgrad.backends()`` then says the CPU kernels are missing). The CUDA
extension is built only where torch itself has CUDA. ``MMGRAD_PORTABLE=1`` drops
``-march=native`` for a binary that runs on any x86-64/aarch64 machine.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    if os.environ.get("MMGRAD_NO_EXTENSION") == "1":
        print("mmgrad: MMGRAD_NO_EXTENSION=1, building no extension", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # -fno-trapping-math lets GCC turn the selects of the element math into blends, so the
    # coordinate loops vectorise (5x faster); mmgrad never relies on FP exception traps.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-wrapv", "-Wall", "-Wno-unknown-pragmas"]
    if os.environ.get("MMGRAD_PORTABLE") != "1":
        cxx.append("-march=native")
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    ext = [CppExtension("mmgrad._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    ext += cuda_extensions()
    return ext, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def cuda_extensions():
    """mmgrad._C_cuda, only where torch has CUDA: the CPU wheel has CUDA headers but no
    libc10_cuda to link against. Says so when it skips."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None or os.environ.get("MMGRAD_NO_CUDA") == "1":
        why = "torch has no CUDA" if torch.version.cuda is None else ("no CUDA toolkit found" if CUDA_HOME is None else "MMGRAD_NO_CUDA=1")
        print(f"mmgrad: skipping the CUDA extension mmgrad._C_cuda ({why}); the cuda backend will be unavailable",
              file=sys.stderr)
        return []
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    # C++20: torch 2.14's headers refuse older standards (#error C++20 or later ...)
    flags = {"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20", "-lineinfo"]}
    return [CUDAExtension("mmgrad._C_cuda", sources, extra_compile_args=flags)]


ext_modules, cmdclass = extensions()

setup(
    name="mmgrad",
    version="0.1.0",
    description="Fused gradient calibration (BOGC, MGDA, MMPareto, MIMO) for multi-modal learning",
    packages=find_packages(include=["mmgrad", "mmgrad.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.3", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy", "matplotlib"],
        "demo": ["matplotlib"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["mmgrad=mmgrad.__main__:main"]},
)
