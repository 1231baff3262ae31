"""The README and the documentation pages: the README's example runs as printed, the README
stays a front door (at most 300 lines), and every relative link in the README and in
``docs/`` names a file inside the repository (``make docs`` checks the site's own links
and anchors, with warnings as errors)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## A first example"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


def test_the_readme_example_runs_as_printed():
    res = subprocess.run([sys.executable, "-c", readme_example()], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "MMGRAD_QUIET": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    shares = [float(x) for x in re.findall(r"\d+\.\d+", res.stdout.strip().splitlines()[-1])]
    assert len(shares) == 3 and abs(sum(shares) - 1) < 1e-3, res.stdout


def test_the_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 300


def test_every_relative_link_names_a_file_in_the_repository():
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or an anchor on the same page
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links that leave the repository or name no file:\n" + "\n".join(broken)


def test_the_screenshot_tool_asks_for_a_built_site(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    import site_screenshot

    with pytest.raises(SystemExit) as exc:
        site_screenshot.main(["--site", str(tmp_path), "--out", str(tmp_path / "png")])
    assert exc.value.code == 2
    assert f"--site {tmp_path} holds no index.html: run `make docs` first" in capsys.readouterr().err
    assert not (tmp_path / "png").exists()
