"""Command line: ``python -m mmgrad {backends,build,verify,selftest,demo,bench,bench-step}`` and ``--version``."""

from __future__ import annotations

import sys
from typing import Sequence

COMMANDS = {
    "backends": "which kernel backends run here, and why a missing one is missing",
    "build": "compile the C++ (and, on a GPU, CUDA) kernels now instead of on first use",
    "verify": "every backend against the float64 reference on random inputs",
    "selftest": "a short check of every method on every backend, for a new install or GPU",
    "demo": "train on the UCI multiple-features digits with each method",
    "bench": "kernel timings against memcpy and the reference",
    "bench-step": "a calibrated training step against a plain one, per method",
}


def usage() -> str:
    lines = ["usage: python -m mmgrad COMMAND [options]   (COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:10s} {what}" for name, what in COMMANDS.items()]
    lines += ["", "  --version  print mmgrad's version"]
    return "\n".join(lines)


def build(argv: Sequence[str]) -> int:
    import argparse

    import torch

    from . import _jit
    from .backends import backends

    p = argparse.ArgumentParser(prog="python -m mmgrad build", description=COMMANDS["build"][0].upper() + COMMANDS["build"][1:] + (
        ". Compiled kernels are cached per mmgrad, torch and Python version under ~/.cache/mmgrad (MMGRAD_CACHE)."))
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = p.parse_args(argv)
    kinds = ["cpu"] + (["cuda"] if torch.version.cuda is not None and torch.cuda.is_available() else [])
    for kind in kinds:
        _jit.build(kind, verbose=args.verbose)
    return list_backends([])


def list_backends(argv: Sequence[str]) -> int:
    import argparse

    from .backends import backends

    argparse.ArgumentParser(prog="python -m mmgrad backends", description=COMMANDS["backends"][0].upper() + (
        COMMANDS["backends"][1:] + ": available or not, what it runs on, and the reason when not.")).parse_args(argv)
    for info in backends().values():
        print(info)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from ._version import __version__

        print(f"mmgrad {__version__}")
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "verify":
        from .tools.verify import main as run
    elif cmd == "selftest":
        from .tools.selftest import main as run
    elif cmd == "demo":
        from .tools.demo import main as run
    elif cmd == "bench":
        from .tools.bench import main as run
    elif cmd == "bench-step":
        from .tools.bench_step import main as run
    elif cmd == "build":
        run = build
    else:
        run = list_backends
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
