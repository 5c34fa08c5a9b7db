"""scripts/bench_rollout.py (+ _report.py) and er_sglang/replay.py on CPU: the wall-time model, replayed acceptance
and its guard, prompt sampling, the trace and active-batch curves, their plot and per-bucket breakdown, and the
`real` part end to end on the reference engine."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from er_sglang.engine import SamplingParams, SpecStats
from er_sglang.policy import SpecPolicy
from er_sglang.replay import ENV, ReplayAccept, ReplayRefused, build_replay, fit_alpha, refuse_in_training
from scripts import bench_rollout
from scripts.bench_rollout import active_curve, predict_wall, thin
from scripts.bench_rollout_report import LABELS, breakdown, bucket_of, curve_split, series, trace_split

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


def test_thin_sums_emitted_tokens_over_each_window():
    # 7 steps emitting 1..7, points 3 -> k = 2, kept steps 0, 2, 4, 6: windows {0}, {1,2}, {3,4}, {5,6}
    tr = [[100.0 + i, 9 - i, 3, i + 1] for i in range(7)]
    assert thin(tr, points=3) == [[0.0, 9, 3, 1], [2.0, 7, 3, 5], [4.0, 5, 3, 9], [6.0, 3, 3, 13]]
    # 8 steps: kept 0, 2, 4, 6 and the last, 7, whose window is {7} alone; every token counted once
    out = thin([[float(i), 1, 0, i + 1] for i in range(8)], points=3)
    assert [p[3] for p in out] == [1, 5, 9, 13, 8] and sum(p[3] for p in out) == 36


def test_thin_rate_between_kept_points_is_the_true_rate():
    # 512 tokens per 10 ms step = 51,200 tok/s; kept every 3rd step, the old one-step count read 17,067
    tr = [[5.0 + 0.01 * i, 512, 0, 512] for i in range(10)]
    t, _, rate, _ = series({"trace": thin(tr, points=3)})
    assert t == pytest.approx([0.0, 0.03, 0.06, 0.09]) and rate[1:] == pytest.approx([51200.0] * 3)


def test_active_curve_counts_running_requests_and_their_mean_rates():
    # rates len/latency: 100/2 = 50, 60/1 = 60, 30/0.5 = 60, 20/1 = 20; two requests finish at t = 1
    curve = active_curve([100, 60, 30, 20], [2.0, 1.0, 0.5, 1.0])
    assert curve == [[0.0, 4, 190.0], [0.5, 3, 130.0], [1.0, 1, 50.0], [2.0, 0, 0.0]]
    # the rate integrates back to every token: 190 * 0.5 + 130 * 0.5 + 50 * 1 = 210 = 100 + 60 + 30 + 20
    assert sum(a[2] * (b[0] - a[0]) for a, b in itertools.pairwise(curve)) == pytest.approx(210)
    assert active_curve([5, 5], [1.0, None]) is None and active_curve([], []) is None


def test_active_curve_keeps_every_finish_down_to_the_last_request():
    # request j (1..10) finishes at j s with 10 j tokens (10 tok/s each): a point per finish, none dropped, so the
    # one-request tail (t in [9, 10)) keeps its own point
    curve = active_curve([10 * j for j in range(1, 11)], [float(j) for j in range(1, 11)])
    assert len(curve) == 11 and curve[0] == [0.0, 10, 100.0] and curve[-2:] == [[9.0, 1, 10.0], [10.0, 0, 0.0]]


def test_sglang_generate_reads_latency_from_e2e_latency():
    from er_sglang.sglang.engine import SGLangEngine

    engine = object.__new__(SGLangEngine)
    engine.mode, engine._num_calls, engine.server_kwargs, engine._stats_no_sd = "no-sd", 0, {}, SpecStats()
    outs = [{"output_ids": [1, 2], "meta_info": {"e2e_latency": 1.25, "finish_reason": {"type": "length"}}},
            {"output_ids": [3], "meta_info": {"finish_reason": {"type": "stop"}}}]
    engine.engine = SimpleNamespace(generate=lambda **kw: outs)
    rollouts = engine.generate([[7], [8]], SamplingParams(seed=0))
    assert [r.latency_s for r in rollouts] == [1.25, None] and rollouts[0].finish_reason == "length"


def test_plot_writes_a_png_from_curves_and_old_traces(tmp_path):
    pytest.importorskip("matplotlib")
    doc, png = tmp_path / "r.json", tmp_path / "r.png"
    runs = [{**_run("real", "no-sd", 0, 2.0), "active_curve": [[0.0, 2, 30.0], [1.0, 1, 10.0], [2.0, 0, 0.0]]},
            {**_run("real", "rtn", 0, 1.0), "trace": [[0.0, 2, 3, 8], [0.5, 2, 3, 8], [1.0, 1, 3, 4]]}]
    doc.write_text(json.dumps({"part": "real", "device": "cpu", "meta": {}, "runs": runs}))
    assert bench_rollout.main(["plot", "--json", str(doc), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
        # every request stamped its finish: 3 running at submission, none after the last, within the wall time
        curve = r["active_curve"]
        assert curve[0][:2] == [0.0, 3] and curve[-1][1:] == [0, 0.0] and 0 < curve[-1][0] <= r["wall_s"] + 1e-3
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


def test_bucket_of_edges():
    assert LABELS == ["1", "2-4", "5-16", "17-64", "65-256", ">256"]
    assert [bucket_of(b) for b in (0, 1, 2, 4, 5, 16, 17, 64, 65, 256, 257, 4096)] == [
        None, "1", "2-4", "2-4", "5-16", "5-16", "17-64", "17-64", "65-256", "65-256", ">256", ">256"]


def test_curve_split_time_and_tokens_by_hand():
    # B = 8 for 1 s at 800 tok/s, then B = 2 for 2 s at 100 tok/s: 1 of 3 s and 800 of 1000 tokens at B 5-16
    assert curve_split([[0.0, 8, 800.0], [1.0, 2, 100.0], [3.0, 0, 0.0]]) == {
        "5-16": {"s": 1.0, "tokens": 800.0}, "2-4": {"s": 2.0, "tokens": 200.0}}


def test_trace_split_weighs_each_kept_point_by_its_window():
    # windows: p0 0 s, p1 0.25 s (B 8, g 5), p2 0.25 s (B 2, g 0), p3 0.5 s (B 2, g 5)
    tr = [[0.0, 8, 5, 40], [0.25, 8, 5, 40], [0.5, 2, 0, 10], [1.0, 2, 5, 10]]
    assert trace_split(tr) == {"5-16": {"steps": 2, "sd_steps": 2, "s": 0.25, "gamma_s": {5: 0.25}},
                               "2-4": {"steps": 2, "sd_steps": 1, "s": 0.75, "gamma_s": {0: 0.25, 5: 0.5}}}


def _bd_runs():
    """no-sd (1 rollout), rtn (2: one with a trace, one with an empty trace), toggle from an old JSON (wall only)."""
    nosd = {**_run("real", "no-sd", 0, 3.6), "trace": None,
            "active_curve": [[0.0, 8, 800.0], [1.0, 2, 100.0], [3.0, 0, 0.0]]}
    rtn0 = {**_run("real", "rtn", 0, 1.5), "active_curve": [[0.0, 8, 1600.0], [0.5, 2, 400.0], [1.0, 0, 0.0]],
            "trace": [[0.0, 8, 5, 40], [0.25, 8, 5, 40], [0.5, 2, 0, 10], [1.0, 2, 5, 10]]}
    rtn1 = {**_run("real", "rtn", 1, 3.0), "active_curve": [[0.0, 8, 1600.0], [0.5, 2, 100.0], [2.5, 0, 0.0]],
            "trace": []}
    return [nosd, rtn0, rtn1, _run("real", "toggle", 0, 1.8)]


def test_breakdown_shares_and_speedups_by_hand():
    doc = breakdown({"runs": _bd_runs()})
    nosd, rtn, toggle = doc["groups"]
    assert nosd["buckets"]["5-16"] == pytest.approx(
        {"s": 1.0, "time_share": 1 / 3, "tokens": 800.0, "token_share": 0.8, "tok_per_s": 800.0, "vs_no_sd": 1.0})
    assert nosd["wall_vs_no_sd"] == 1.0 and "sd_step_frac" not in nosd["buckets"]["2-4"]
    # rtn per rollout: B 5-16 0.5 s + 0.5 s, 800 + 800 tokens; B 2-4 0.5 s + 2 s, 200 + 200 tokens
    assert rtn["curve_rollouts"] == 2 and rtn["trace_rollouts"] == 1
    assert rtn["wall_s"] == 2.25 and rtn["wall_vs_no_sd"] == pytest.approx(3.6 / 2.25)  # 1.6x
    b5, b2 = rtn["buckets"]["5-16"], rtn["buckets"]["2-4"]
    assert b5.pop("gamma_time_share") == {"5": 1.0}
    assert b5 == pytest.approx({"s": 0.5, "time_share": 1 / 3.5, "tokens": 800.0, "token_share": 0.8,
                                "tok_per_s": 1600.0, "vs_no_sd": 2.0, "sd_step_frac": 1.0, "sd_time_frac": 1.0})
    # no-sd spent 2 s at B 2-4, rtn 1.25 s on average: 1.6x in the tail; its trace speculated 0.5 of 0.75 s there
    assert b2.pop("gamma_time_share") == pytest.approx({"0": 1 / 3, "5": 2 / 3})
    assert b2 == pytest.approx({"s": 1.25, "time_share": 2.5 / 3.5, "tokens": 200.0, "token_share": 0.2,
                                "tok_per_s": 160.0, "vs_no_sd": 1.6, "sd_step_frac": 0.5, "sd_time_frac": 2 / 3})
    assert toggle["buckets"] == {} and toggle["wall_vs_no_sd"] == 2.0
    assert doc["notes"] == [
        "real/rtn: 1 of 2 rollouts have no trace: left out of the gamma columns",
        "real/toggle: 1 of 1 rollouts have no active_curve (older JSON): left out of the time and token shares",
        "real/toggle: 1 of 1 rollouts have no trace: left out of the gamma columns"]


def test_breakdown_command_prints_the_table_and_writes_json(tmp_path, capsys):
    src, out = tmp_path / "r.json", tmp_path / "b.json"
    runs = [*_bd_runs(), {**_run("other", "rtn", 0, 1.0), "active_curve": [[0.0, 1, 10.0], [1.0, 0, 0.0]]}]
    src.write_text(json.dumps({"part": "real", "device": "cpu", "meta": {}, "runs": runs}))
    assert bench_rollout.main(["breakdown", "--json", str(src), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| real | rtn | all | 2.25 | | | | 1.60x | | | |" in text
    assert "| real | rtn | 2-4 | 1.25 | 71.4% | 20.0% | 160 | 1.60x | 50.0% | 66.7% | 0:33% 5:67% |" in text
    assert "| real | no-sd | 5-16 | 1.00 | 33.3% | 80.0% | 800 | 1.00x | | | |" in text
    assert "| other | rtn | 1 | 1.00 | 100.0% | 100.0% | 10 | | | | |" in text  # no no-sd, no trace: blanks
    assert text.splitlines()[1] == "|---|---|---|---|---|---|---|---|---|---|---|"
    assert "note: other/rtn: no no-sd run of this part: no speedups" in text
    doc = json.loads(out.read_text())
    assert doc["bucket_lows"] == [1, 2, 5, 17, 65, 257] and doc["groups"][1]["buckets"]["2-4"]["s"] == 1.25
