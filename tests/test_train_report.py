"""scripts/train_report.py: issue 11's GPU training record from metrics.jsonl files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("train_report", Path(__file__).parent.parent / "scripts" / "train_report.py")
train_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_report)


def _rows(step_s: float, n: int = 6, sync: float = 0.5, reward0: float = 0.1) -> list[dict]:
    return [{"step": i, "timing/step_s": step_s * (3 if i == 1 else 1), "timing/rollout_s": step_s * 0.7,
             "timing/train_s": step_s * 0.2, "timing/sync_s": sync, "spec/requant_s": 0.1,
             "train/reward_mean": reward0 + 0.05 * i} for i in range(1, n + 1)]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_summary_ratio_sync_fraction_and_resume(tmp_path):
    nosd, argmax = _write(tmp_path / "a.jsonl", _rows(10.0)), _write(tmp_path / "b.jsonl", _rows(8.0))
    resumed = _write(tmp_path / "r.jsonl", _rows(8.0, n=4))
    out = tmp_path / "o.json"
    assert train_report.main(["--run", f"no-sd={nosd}", "--run", f"argmax={argmax}", "--resume", resumed,
                              "--kill-after", "2", "--json", str(out), "--png", str(tmp_path / "p.png")]) == 0
    rep = json.loads(out.read_text())
    s = rep["summary"]
    assert s["no-sd"]["step_s"] == 10.0 and s["argmax"]["step_s"] == 8.0  # step 1 (3x, warm-up) left out
    assert s["argmax"]["step_time_ratio"] == 1.25 and s["no-sd"]["step_time_ratio"] == 1.0
    # the handoff's share and re-quantization's apart (requant is never added to sync_s: on the CPU it is inside it)
    assert s["argmax"]["sync_frac"] == pytest.approx(0.5 / 8.0, abs=1e-4)
    assert s["argmax"]["requant_frac"] == pytest.approx(0.1 / 8.0, abs=1e-4)
    assert s["no-sd"]["reward_first"] == pytest.approx(0.175) and s["no-sd"]["reward_last"] == pytest.approx(0.375)
    assert rep["resume_checked"] is True and [r["mode"] for r in rep["runs"]] == ["no-sd", "argmax"]
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_resume_check_fails_on_a_gap_or_no_progress_past_the_kill():
    assert not train_report.resume_checked([{"step": 1}, {"step": 2}, {"step": 4}], 2)
    assert not train_report.resume_checked([{"step": 1}, {"step": 2}], 2)
    assert not train_report.resume_checked([], 2)
    assert train_report.resume_checked([{"step": 1}, {"step": 2}, {"step": 3}], 2)


def test_bad_run_argument_is_one_line(tmp_path, capsys):
    assert train_report.main(["--run", f"no-sd={tmp_path / 'missing.jsonl'}", "--json", str(tmp_path / "o.json")]) == 2
    assert capsys.readouterr().err.strip() == f"--run no-sd={tmp_path / 'missing.jsonl'}: file not found"
    with pytest.raises(SystemExit):
        train_report.main(["--run", "nosd", "--json", str(tmp_path / "o.json")])


def test_summary_mem_max_per_phase_only_where_logged():
    rows = _rows(10.0, n=3)
    rows[1].update({"mem/used_gib_awake": 60.5, "mem/used_gib_asleep": 4.0, "mem/train_peak_gib": 31.25})
    rows[2].update({"mem/used_gib_awake": 61.0, "mem/used_gib_asleep": 3.5, "mem/train_peak_gib": 30.0})
    mem = train_report.summarize(rows)["mem_max_gib"]
    assert mem == {"used_gib_awake": 61.0, "used_gib_asleep": 4.0, "train_peak_gib": 31.25}  # no woken/reserved rows
    assert train_report.summarize(_rows(10.0))["mem_max_gib"] == {}  # a CPU run logs none


def test_resume_exact_compares_steps_after_the_kill_only():
    ref = _rows(10.0, n=4)
    for r in ref:
        r.update({"train/loss": 0.5 / r["step"], "train/num_tokens": 100 * r["step"]})
    same = [dict(r) for r in ref]
    same[0]["train/loss"] = 9.0  # step 1 ran before the kill in both runs: not compared
    out = train_report.resume_exact(same, ref, kill_after=2)
    assert out == {"exact": True, "steps": [3, 4], "max_rel_diff": 0.0}
    drift = [dict(r) for r in ref]
    drift[3]["train/reward_mean"] *= 1.001  # step 4's reward moved by 0.1 %
    bad = train_report.resume_exact(drift, ref, kill_after=2)
    assert bad["exact"] is False and bad["max_rel_diff"] == pytest.approx(0.001 / 1.001, rel=1e-6)
    assert train_report.resume_exact(ref[:2], ref, kill_after=2)["exact"] is None  # nothing past the kill
