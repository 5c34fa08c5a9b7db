"""Fault tolerance end to end on CPU: one tiny er-train run survives an engine SIGKILL mid-rollout, a NaN
update, a corrupted draft and a trainer-rank SIGKILL, logging every step once; the give-up paths are
unit tests (tests/test_faults_units.py). Faults are injected through $ER_TEST_INJECT_FAULTS only."""
import os
import subprocess
import sys

import pytest

from orchestrator.actors import FAULT_ENV
from orchestrator.tracker import read_metrics

TINY = ["data.prompts_per_step=2", "data.samples_per_prompt=2", "sampling.max_new_tokens=8", "data.size=64",
        "logging.wandb=disabled", "checkpoint.every=1", "train.lr=1e-4", "sync.verify_every=1"]
FAULTS = "engine_kill@1,nan_loss@1,bad_draft@2,trainer_kill@3"


def _er_train(faults: str, *args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{FAULT_ENV: faults})
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *TINY, *args], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "run"
    out = _er_train(FAULTS, "train.num_steps=3", "checkpoint.keep=1", f"run_dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    return run, out, {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}


def test_faults_every_step_logged_exactly_once(faulted_run):
    run, _, _ = faulted_run
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_faults_engine_kill_restarts_engine_and_redoes_the_rollout(faulted_run):
    _, out, rows = faulted_run
    assert "warning: rollout engine 0 died" in out.stderr
    assert [rows[s]["fault/engine_restarts"] for s in (1, 2, 3)] == [1, 1, 1]
    assert rows[1]["rollout/num_tokens"] > 0 and rows[1]["spec/num_drafted"] > 0
    assert rows[1]["sync/verified"] == 1.0  # the restarted engine holds the trainer's weights again


def test_faults_nan_loss_skips_the_update(faulted_run):
    _, out, rows = faulted_run
    assert [rows[s]["train/skipped_updates"] for s in (1, 2, 3)] == [1.0, 0.0, 0.0]
    assert "warning: step 1: non-finite loss or gradient; update skipped" in out.stderr


def test_faults_bad_draft_detected_by_acceptance_and_requantized(faulted_run):
    _, out, rows = faulted_run
    assert rows[2]["spec/accept_rate"] < 0.5 * rows[1]["spec/accept_rate"]  # the corrupted draft's rollout
    assert rows[2]["spec/draft_ok"] == 0.0  # found, re-quantized
    assert rows[3]["spec/draft_ok"] == 1.0 and rows[3]["spec/accept_rate"] > 0.5 * rows[1]["spec/accept_rate"]
    assert "a bad draft was re-quantized" in out.stderr


def test_faults_trainer_kill_restarts_from_the_last_checkpoint(faulted_run):
    run, out, rows = faulted_run
    assert "warning: trainer rank 1 died in step 3; restarting every rank from" in out.stderr
    assert "step_000002" in out.stderr
    assert [rows[s]["fault/trainer_restarts"] for s in (1, 2, 3)] == [0, 0, 1]
    # checkpoint.keep=1: one checkpoint on disk, no partial one left behind
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003"]
