"""The GPU check's CPU rehearsal: ``tests/device_check.py --rehearse`` runs every step that
can run without a GPU, at tiny sizes, and writes a report that meets its schema; so a broken
check is found here, not during a lease of a GPU."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_check  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-check")
    res = subprocess.run([sys.executable, "tests/device_check.py", str(out), "--rehearse"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**__import__("os").environ, "MMGRAD_QUIET": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), (out / "device-check.log").read_text()


def test_the_rehearsal_runs_every_step_and_meets_the_schema(rehearsal):
    rep, log = rehearsal
    device_check.validate(rep)
    assert [s["name"] for s in rep["steps"]] == [name for name, _, _ in device_check.STEPS]
    assert rep["rehearsal"] is True and rep["failed"] == []
    status = {s["name"]: s["status"] for s in rep["steps"]}
    for runs_on_a_cpu in ("env", "build", "selftest", "bench", "end-to-end"):
        assert status[runs_on_a_cpu] == "passed", rep
    assert "no CUDA device" in next(s["why"] for s in rep["steps"] if s["name"] == "sanitizer")
    bench = next(s for s in rep["steps"] if s["name"] == "bench")["data"]["rows"]
    assert {r["method"] for r in bench} == {"bogc", "mgda", "combine", "gram", "combine_and_gram"} and all(r["ms"] > 0 for r in bench)
    assert "== selftest: passed" in log


def test_a_broken_report_is_refused(rehearsal):
    rep, _ = rehearsal
    for breaks, message in ((lambda r: r.pop("machine"), "lacks 'machine'"),
                            (lambda r: r["steps"][0].update(status="fine"), "status 'fine'"),
                            (lambda r: r["steps"][0].update(status="skipped", why=""), "without saying why"),
                            (lambda r: r["steps"][0].pop("seconds"), "lacks 'seconds'")):
        broken = copy.deepcopy(rep)
        breaks(broken)
        with pytest.raises(ValueError, match=message):
            device_check.validate(broken)
