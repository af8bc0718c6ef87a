"""The hostile soak (benchmarks/soak_hostile.py) at a small count: honest requests through two
schedulers and two workers under the documented ACLs while a hostile producer re-submits their
ids, sends malformed and garbage entries carrying them, forges final events and claims attempts.
The full 20,000-request run and its figures are in docs/security.md."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "soak_hostile.py"


@pytest.mark.slow
def test_hostile_soak_loses_duplicates_and_corrupts_nothing(tmp_path):
    spec = importlib.util.spec_from_file_location("soak_hostile", SCRIPT)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    report = soak.main(["--requests", "400", "--concurrency", "64", "--hostile-rate", "100",
                        "--token-delay-ms", "5", "--redis-server", shutil.which("redis-server"),
                        "--logs", str(tmp_path)])
    assert (report["lost"], report["wrong"], report["streamed_wrong"], report["duplicated"]) == (0, 0, 0, 0), report
    assert report["hostile_fresh_not_attempt_0"] == 0 and not report["daemons_exited"], report
    assert sum(n for attack, n in report["attacks"].items() if attack.startswith("duplicate")) > 0, report
    assert not any(attack.startswith("NOT REFUSED") for attack in report["attacks"]), report
    assert report["dead_letter_stream_mb"] < 5, report
