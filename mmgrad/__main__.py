"""Command line: ``python -m mmgrad {verify,selftest,demo,bench,backends}``."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("verify", "selftest", "demo", "bench", "backends")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m mmgrad {{{','.join(commands)}}} [options]   (--help after a command for its options)")
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
    else:
        from .backends import backends

        for info in backends().values():
            print(info)
        return 0
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
