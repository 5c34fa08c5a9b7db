import json

import pytest

from orchestrator import tracker as tracker_mod
from orchestrator.tracker import Tracker, read_metrics, resolve_mode

WANDB_VARS = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_DIR", "WANDB_CONFIG_DIR",
              "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_SILENT")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No WANDB_* variables, HOME and cwd in tmp dirs; everything restored after the test."""
    for var in WANDB_VARS:  # setenv first so monkeypatch restores what the Tracker sets
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def _metrics(step: int) -> dict:
    return {"train/reward_mean": 0.1 * step, "train/loss": 1.0 / step, "timing/rollout_s": 2.5}


def test_tracker_writes_one_line_per_step(clean_env, tmp_path):
    t = Tracker(tmp_path / "run", {"a": 1}, mode="disabled")
    for step in (1, 2, 3):
        t.log_step(step, _metrics(step), samples=[{"prompt": "1+1", "response": "2", "reward": 1.0}],
                   hists={"spec/accept_len_hist": {1: 3, 4: 2}})
    t.close()
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[1]["train/reward_mean"] == pytest.approx(0.2)
    assert lines[2]["spec/accept_len_hist"] == {1: 3, 4: 2}  # int keys survive the JSON round trip
    samples = [json.loads(s) for s in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["response"]) for s in samples] == [(1, "2"), (2, "2"), (3, "2")]
    assert not (tmp_path / "run" / "wandb").exists()


def test_tracker_resume_truncates_from_resumed_step(clean_env, tmp_path):
    t = Tracker(tmp_path / "run", {}, mode="disabled")
    for step in range(1, 6):
        t.log_step(step, _metrics(step), samples=[{"prompt": "p", "response": str(step)}])
    t.close()
    # checkpoint at step 3: the resumed run logs step 4 again, then 5
    t = Tracker(tmp_path / "run", {}, mode="disabled", resume=True)
    t.log_step(4, {"train/loss": 40.0})
    t.log_step(5, {"train/loss": 50.0})
    t.close()
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert [line["train/loss"] for line in lines[3:]] == [40.0, 50.0]
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in samples] == [1, 2, 3]


def test_tracker_fresh_run_starts_new_files(clean_env, tmp_path):
    Tracker(tmp_path / "run", {}, mode="disabled").log_step(1, _metrics(1))
    Tracker(tmp_path / "run", {}, mode="disabled").log_step(1, _metrics(2))
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(lines) == 1 and lines[0]["train/loss"] == 0.5


def test_tracker_prints_header_once_with_fixed_widths(clean_env, tmp_path, capsys):
    t = Tracker(tmp_path / "run", {}, mode="disabled")
    t.log_step(1, {"train/reward_mean": 0.5, "spec/accept_rate": 0.8125, "spec/mean_accept_len": 3.25,
                   "spec/gamma_mean": 7.0, "spec/on_frac": 1.0, "timing/rollout_s": 12.346,
                   "timing/train_s": 3.0, "timing/sync_s": 0.25, "spec/requant_s": 0.0421})
    t.log_step(2, {"train/reward_mean": 0.75})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "reward", "acc_rate", "acc_len", "gamma", "sd_on", "rollout_s",
                                "train_s", "sync_s", "requant_s"]
    assert lines[1].split() == ["1", "0.500", "0.812", "3.25", "7.0", "1.00", "12.35", "3.00", "0.25", "0.042"]
    assert lines[2].split() == ["2", "0.750"] + ["-"] * 8  # missing metrics print as "-"
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1


def test_tracker_resolve_mode_auto_follows_env(clean_env, monkeypatch):
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert resolve_mode("offline") == "offline"
    with pytest.raises(ValueError, match="logging.wandb"):
        resolve_mode("cloud")


def test_tracker_offline_writes_under_run_dir_only(clean_env, tmp_path):
    run_dir = tmp_path / "run"
    t = Tracker(run_dir, {"train": {"lr": 1e-5}}, mode="offline", project="p", name="n", tags=["cpu"])
    assert t.run is not None, "wandb offline init failed"
    t.log_step(1, _metrics(1), samples=[{"prompt": "1+1", "response": "2", "reward": 1.0, "answer": "2"}],
               hists={"spec/gamma_hist": {0: 4, 5: 6}})
    t.close()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]  # nothing in cwd
    assert list(clean_env.iterdir()) == []  # nothing under HOME

    t = Tracker(run_dir, {}, mode="offline", resume=True)  # same wandb run id on resume
    assert t.run is not None and t.run.id == run_id
    t.close()
    assert list(clean_env.iterdir()) == []


def test_tracker_wandb_init_failure_warns_once_and_keeps_jsonl(clean_env, tmp_path, monkeypatch, capsys):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no network\nmore detail")

    monkeypatch.setattr(wandb, "init", broken_init)
    t = Tracker(tmp_path / "run", {}, mode="online")
    t.log_step(1, _metrics(1))
    t.log_step(2, _metrics(2))
    t.close()
    err = capsys.readouterr().err.splitlines()
    metrics_path = tmp_path / "run" / "metrics.jsonl"
    assert err == [f"warning: wandb init failed (RuntimeError: no network); logging to {metrics_path} only"]
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2


def test_tracker_np_histogram_has_unit_bins():
    counts, edges = tracker_mod._np_histogram({5: 2, 7: 1})
    assert counts == [2, 0, 1]
    assert edges == [4.5, 5.5, 6.5, 7.5]


def test_tracker_read_metrics_missing_file_is_empty(tmp_path):
    assert read_metrics(tmp_path / "nope.jsonl") == []
