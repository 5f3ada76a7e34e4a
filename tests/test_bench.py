"""The benchmark script end to end on a very small workload: what a GPU run will execute, checked on CPU first."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench" / "bench_dpo.py"


@pytest.mark.slow
def test_bench_runs_every_kind_of_system_and_writes_its_table(tmp_path: Path) -> None:
    tiny = {"vocab": 512, "hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2}
    tiny |= {"lo": 8, "hi": 24, "pairs": 4, "steps": 2, "warmup": 1}
    systems = ["trl", "dpokit", "dpokit-ac-precomputed", "dpokit-padded"]
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--overrides", json.dumps(tiny), "--out", str(out), "--systems", *systems]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["results"]) == systems and report["command"].startswith("python ")
    for name, r in report["results"].items():
        assert "error" not in r, (name, r.get("error"))
        assert len(r["step_seconds"]) == tiny["steps"] + tiny["warmup"] and r["tokens_per_second"] > 0
        assert r["first_loss"] == pytest.approx(math.log(2), abs=1e-3), name
    assert "x TRL tok/s" in report["table"] and report["versions"]["trl"]
    assert report["results"]["trl"]["activation_checkpointing"] is False  # TRL in its fastest configuration
    # An unknown system is refused before any work.
    bad = subprocess.run([sys.executable, str(BENCH), "--systems", "dpokit-fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown system" in bad.stderr
