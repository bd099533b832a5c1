"""The GPU verification kit, at toy size on the CPU: every step runs (or says why not) and its
checks hold, so the kit a lent GPU runs cannot rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("sklearn")


def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["cuda-tests", "bench-produce", "pipeline", "cpu-vs-device"], done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["smoke"] and report["device"] == "cpu"
    assert steps["cuda-tests"]["status"] in ("skipped", "passed")
    for name in ("bench-produce", "pipeline", "cpu-vs-device"):
        assert steps[name]["status"] == "passed", steps[name]
        assert steps[name]["seconds"] > 0 and steps[name]["figures"]
    bench = steps["bench-produce"]["figures"]
    assert bench["open_lth-style baseline, batch 128"]["ratio"] == 1.0 and "flowscan, batch 128" in bench
    packed, alone = bench["flowscan, 2 seeds packed, batch 128"], bench["flowscan, 2 seeds one at a time, batch 128"]
    assert bench["packed_over_one_at_a_time"] == round(packed["images_per_s"] / alone["images_per_s"], 2)
    assert all(n > 0 for n in steps["pipeline"]["figures"]["table_rows"].values())
    assert steps["cpu-vs-device"]["figures"]["densities_equal"] is True
    assert "| pipeline | passed |" in (tmp_path / "gpu_check.md").read_text()


def test_a_failing_step_is_recorded_and_the_kit_goes_on(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    kit = gpu_check.Kit(tmp_path, smoke=True, device="cpu")
    kit.step("broken", 30, [[sys.executable, "-c", "import sys; sys.exit(3)"]])
    kit.step("slow", 1, [[sys.executable, "-c", "import time; time.sleep(5)"]])
    kit.step("fine", 30, [[sys.executable, "-c", "print('ok')"]], lambda text: {"said": text.strip()})
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in steps] == [("broken", "failed"), ("slow", "failed"), ("fine", "passed")]
    assert "exit status 3" in steps[0]["reason"] and steps[1]["reason"] == "timed out"
    assert steps[2]["figures"] == {"said": "ok"}


def test_time_limits_scale_with_the_machine_and_the_summary_says_what_next(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    assert gpu_check.calibrate() > 0
    kit = gpu_check.Kit(tmp_path, smoke=True, device="cpu", time_scale=2.5)
    kit.step("fine", 30, [[sys.executable, "-c", "print('ok')"]])
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "Time limits were scaled by 2.50" in summary and json.loads((tmp_path / "gpu_check.json").read_text())[
        "time_scale"] == 2.5
    assert "## Reading the figures" in summary and "packed_over_one_at_a_time" in summary
    assert "## Next" in summary and "--wheels .gpu-wheels --out $OUT" in summary
    # a busy machine (calibration twice as slow as the reference) gets twice the limits, never less than 1x
    monkeypatch.setattr(gpu_check, "calibrate", lambda: 2 * gpu_check.CALIBRATION_SECONDS)
    seen = {}
    monkeypatch.setattr(gpu_check.Kit, "step", lambda self, name, limit, *a, **k: seen.setdefault(name, limit))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--smoke", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        gpu_check.main()
    assert seen["bench-produce"] == pytest.approx(240) and seen["pipeline"] == pytest.approx(240)
