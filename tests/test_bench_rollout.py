"""scripts/bench_rollout.py and er_sglang/replay.py on CPU: the wall-time model, replayed acceptance and
its guard, and the `real` part end to end on the reference engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from er_sglang.policy import SpecPolicy
from er_sglang.replay import ENV, ReplayAccept, ReplayRefused, build_replay, fit_alpha, refuse_in_training
from scripts import bench_rollout
from scripts.bench_rollout import predict_wall, thin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Roof:  # T_T = 1 + B ms; T_D = 0.5 ms; T_V = 1 + B + g ms; SD step = g*T_D + T_V
    def t_target(self, B, S):
        return (1 + B) * 1e-3

    def t_draft(self, B, S):
        return 0.5e-3

    def t_verify(self, B, S, g):
        return (1 + B + g) * 1e-3

    def t_sd_step(self, B, S, g):
        return self.t_target(B, S) if g == 0 else g * self.t_draft(B, S) + self.t_verify(B, S, g)


def test_predict_wall_plain_decoding_by_hand():
    # lengths 3, 1, 2: active B = 3, 2, 1 over three steps -> (4 + 3 + 2) ms
    out = predict_wall([3, 1, 2], 10, SpecPolicy("no-sd"), _Roof(), ReplayAccept(build_replay([{1: {0: 1}}], "t")))
    assert out == {"predicted_wall_s": 0.009, "predicted_steps": 3}


def test_predict_wall_full_acceptance_rtn():
    # rtn gamma 3, every draft accepted: 4 tokens per step; lengths 8 and 4 -> steps of B=2, then B=1
    accept = ReplayAccept(build_replay([{3: {3: 5}}], "t"))
    out = predict_wall([8, 4], 10, SpecPolicy("rtn", gamma=3), _Roof(), accept)
    def step(B):
        return 3 * 0.5e-3 + (1 + B + 3) * 1e-3

    assert out["predicted_steps"] == 2 and out["predicted_wall_s"] == round(step(2) + step(1), 3)


def test_predict_wall_speculates_only_where_the_engine_has_graphs():
    # served_bs {3: 1}: B = 2 decodes plainly (T_T = 3 ms) twice, then B = 1 speculates (6.5 ms) to the end
    accept = ReplayAccept(build_replay([{3: {3: 5}}], "t"))
    out = predict_wall([2, 6], 10, SpecPolicy("rtn", gamma=3), _Roof(), accept, served_bs={3: 1})
    assert out == {"predicted_wall_s": round(3e-3 + 3e-3 + 6.5e-3, 3), "predicted_steps": 3}


def test_replay_draws_from_the_measured_histogram_and_fits_alpha():
    spec = build_replay([{"3": {"0": 1, "3": 3}}, {3: {0: 1}, 5: {5: 2}}], "src")
    assert spec["accept_hist_by_gamma"] == {"3": {"0": 2, "3": 3}, "5": {"5": 2}}
    # alpha = accepted / (accepted + rejections) = (9 + 10) / (19 + 2)
    assert spec["alpha_iid"] == pytest.approx(19 / 21, abs=1e-6)
    assert fit_alpha({1: {0: 1, 1: 1}}) == 0.5
    r = ReplayAccept(spec, seed=1)
    draws = [r.draw(3) for _ in range(2000)]
    assert set(draws) == {0, 3} and 0.5 < draws.count(3) / len(draws) < 0.7  # 3/5 expected
    assert all(r.draw(5) == 5 for _ in range(50))
    assert r.draw(0) == 0
    assert {r.draw(2) for _ in range(300)} == {0, 1, 2}  # unmeasured gamma: i.i.d. chain at alpha_iid
    with pytest.raises(ValueError, match="no accept histogram"):
        build_replay([{0: {0: 4}}, {}], "src")


def test_training_refuses_replayed_acceptance(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    refuse_in_training()
    monkeypatch.setenv(ENV, str(tmp_path / "a.json"))
    with pytest.raises(ReplayRefused, match=ENV):
        refuse_in_training()
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", f"run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
                         env={**os.environ, ENV: str(tmp_path / "a.json")})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and ENV in lines[0], out.stderr
    assert not (tmp_path / "run").exists()


def test_thin_keeps_first_and_last():
    tr = [[10.0 + i, 5, 3, 9] for i in range(10)]
    out = thin(tr, points=4)
    assert out[0] == [0.0, 5, 3, 9] and out[-1][0] == 9.0 and len(out) <= 6


def test_real_part_on_the_reference_engine(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "scripts/bench_rollout.py", "real", "configs/default.yaml", "data.prompts_per_step=1",
           "data.samples_per_prompt=3", "sampling.max_new_tokens=12", "--modes", "no-sd,rtn", "--rollouts", "2",
           "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [(r["mode"], r["rollout"]) for r in data["runs"]] == [("no-sd", 0), ("no-sd", 1), ("rtn", 0), ("rtn", 1)]
    for r in data["runs"]:
        assert r["num_sequences"] == 3 and r["num_tokens"] == sum(r["lengths"]) and r["predicted_steps"] > 0
        assert r["trace"] and max(p[1] for p in r["trace"]) == 3  # the step trace saw the whole batch
        # decode steps emit every token but the one each prefill samples (the last step may overshoot)
        assert sum(p[3] for p in r["trace"]) >= r["num_tokens"] - r["num_sequences"]
    no_sd, rtn = data["runs"][0], data["runs"][2]
    assert no_sd["accept_hist_by_gamma"] == {} and set(rtn["gamma_hist"]) == {"5"}
    assert sum(rtn["accept_hist_by_gamma"]["5"].values()) == sum(p[1] for p in rtn["trace"])
    table = subprocess.run([sys.executable, "scripts/bench_rollout.py", "table", "--json", str(out)],
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "| real | rtn | 1 |" in table
    bad = subprocess.run([sys.executable, "scripts/bench_rollout.py", "real", "configs/default.yaml", "spec.gamma=-1",
                          "--json", str(tmp_path / "x.json")], capture_output=True, text=True, cwd=ROOT,
                         check=False)
    assert bad.returncode == 2 and "spec.gamma" in bad.stderr and not (tmp_path / "x.json").exists()


def _run(part, mode, rollout, wall):
    return {"part": part, "mode": mode, "rollout": rollout, "wall_s": wall, "num_tokens": 10, "tokens_per_s": 1.0,
            "accept_rate": 0.0, "mean_accept_len": 1.0, "spec_on_frac": 0.0, "gamma_hist": {}}


def test_merge_joins_per_call_files_and_refuses_duplicates_or_mixed_devices(tmp_path, capsys):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    a.write_text(json.dumps({"part": "real", "device": "H200", "meta": {"cmd": "a"},
                             "runs": [_run("real", "no-sd", 0, 10.0), _run("real", "no-sd", 1, 12.0)]}))
    b.write_text(json.dumps({"part": "real", "device": "H200", "meta": {"cmd": "b"},
                             "runs": [_run("real", "argmax", 0, 8.0)]}))
    assert bench_rollout.main(["merge", "--json", str(out), str(a), str(b)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["mode"], r["rollout"]) for r in doc["runs"]] == [("no-sd", 0), ("no-sd", 1), ("argmax", 0)]
    assert doc["part"] == "real" and doc["meta"]["merged_from"] == [str(a), str(b)]
    capsys.readouterr()
    bench_rollout.main(["table", "--json", str(out)])
    assert "| real | argmax | 0 | 8.00 | 1.250x |" in capsys.readouterr().out  # vs no-sd rollout 0 of file a
    assert bench_rollout.main(["merge", "--json", str(out), str(a), str(a)]) == 2
    assert "run ('real', 'no-sd', 0) is in both" in capsys.readouterr().err
    b.write_text(json.dumps({"part": "real", "device": "H100", "meta": {}, "runs": [_run("real", "rtn", 0, 9.0)]}))
    assert bench_rollout.main(["merge", "--json", str(out), str(a), str(b)]) == 2
    assert "different devices" in capsys.readouterr().err
