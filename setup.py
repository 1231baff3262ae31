"""Build of mmgrad: the Python package, the kernels' sources, and (where torch is importable
at build time) the C++/OpenMP extension ``mmgrad._C`` and the CUDA extension ``mmgrad._C_cuda``.

``pip install .`` builds in an isolated environment without torch (pyproject.toml lists
none, so pip never pulls a second torch into it): the wheel is pure Python plus the
sources, and mmgrad compiles them against the user's torch on first use (mmgrad/_jit.py).
``pip install --no-build-isolation .`` (and ``make build``) compile here instead, against
the torch of the environment. ``MMGRAD_NO_EXTENSION=1`` compiles nothing here;
``MMGRAD_PORTABLE=1`` drops ``-march=native``; ``MMGRAD_NO_CUDA=1`` skips the CUDA extension.
"""

import os
import runpy
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG = runpy.run_path(os.path.join(ROOT, "mmgrad", "_build_config.py"))
VERSION = runpy.run_path(os.path.join(ROOT, "mmgrad", "_version.py"))["__version__"]


def say(msg):
    print(f"mmgrad: {msg}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package as mmgrad/_csrc, for the compilation on first use."""

    def run(self):
        super().run()
        for rel in CONFIG["CPU_SOURCES"] + CONFIG["CUDA_SOURCES"] + CONFIG["HEADERS"]:
            dst = os.path.join(self.build_lib, "mmgrad", "_csrc", rel)
            self.mkpath(os.path.dirname(dst))
            self.copy_file(os.path.join(ROOT, "csrc", rel), dst)


def extensions():
    if os.environ.get("MMGRAD_NO_EXTENSION") == "1":
        say("MMGRAD_NO_EXTENSION=1: no extension compiled at install; the first use compiles them")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        say("torch is not importable here (pip's isolated build): the kernels compile on first use, "
            "against the torch installed then")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        say("no C++ compiler found: installing without the cpu backend's kernels")
        return [], {}
    cxx = CONFIG["cpu_flags"]()
    sources = [os.path.join("csrc", rel) for rel in CONFIG["CPU_SOURCES"]]
    ext = [CppExtension("mmgrad._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=CONFIG["CPU_LINK_FLAGS"])]
    ext += cuda_extensions()
    return ext, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def cuda_extensions():
    """mmgrad._C_cuda, only where torch has CUDA: the CPU wheel has CUDA headers but no
    libc10_cuda to link against. Says so when it skips."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None or os.environ.get("MMGRAD_NO_CUDA") == "1":
        why = "torch has no CUDA" if torch.version.cuda is None else ("no CUDA toolkit found" if CUDA_HOME is None else "MMGRAD_NO_CUDA=1")
        say(f"skipping the CUDA extension mmgrad._C_cuda ({why}); the cuda backend will be unavailable")
        return []
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", CONFIG["CUDA_ARCHS"])
    sources = [os.path.join("csrc", rel) for rel in CONFIG["CUDA_SOURCES"]]
    flags = {"cxx": CONFIG["CUDA_CXX_FLAGS"], "nvcc": CONFIG["CUDA_NVCC_FLAGS"]}
    return [CUDAExtension("mmgrad._C_cuda", sources, extra_compile_args=flags)]


ext_modules, cmdclass = extensions()

setup(
    name="mmgrad",
    version=VERSION,
    description="Fused gradient calibration (BOGC, MGDA, MMPareto, MIMO, OGM-GE) for multi-modal learning",
    packages=find_packages(include=["mmgrad", "mmgrad.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **cmdclass},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy", "matplotlib"],
        "demo": ["matplotlib"],
        "triton": ["triton>=3.6"],
    },
    entry_points={"console_scripts": ["mmgrad=mmgrad.__main__:main"]},
)
