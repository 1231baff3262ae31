"""The repository speaks of mmgrad, not of how it was written: no issue numbers and no
working periods in the documents, the package, the tests or the kernels. Figures say
instead which command produced them, on which machine and when."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# "session" as in a working period (the word), issue numbers however written
PROCESS_WORDS = re.compile(r"\bsessions?\b|\bissue\s*#?\s*\d+|\bissue #", re.IGNORECASE)


def tracked_text_files():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    keep = (".md", ".py", ".h", ".cpp", ".cu", ".toml", ".txt", ".cfg")
    return [ROOT / f for f in listed if f.endswith(keep) or f in ("Makefile", ".ci/run")]


def test_no_file_speaks_of_how_mmgrad_was_written():
    found = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve() or not path.exists():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if PROCESS_WORDS.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "process words in the repository:\n" + "\n".join(found)


def test_the_pattern_finds_the_words_it_is_for():
    for text in ("as in issue #15", "fixed this session", "see Issue 27", "two sessions ago"):
        assert PROCESS_WORDS.search(text), text
    for text in ("the issue with BatchNorm", "sessionless", "a possession"):
        assert not PROCESS_WORDS.search(text), text
