"""First contact: bad input fails before anything is written or started, --help, resume, console noise,
er-rollout on experiment files, er-sweep interrupts, and the import layering. No Ray is started here."""
import ast
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from er_sglang import cli as rollout_cli
from er_sglang.config import schema_fields
from orchestrator import cli, tracker
from orchestrator import sweep as sw

ROOT = Path(__file__).resolve().parent.parent
FAST = ["data.size=16", "logging.wandb=disabled", "train.num_steps=3"]


def _no_train(monkeypatch) -> list:
    """Stand in for the Ray job: records the plan it was given."""
    plans = []
    monkeypatch.setattr(cli, "_train", lambda plan: plans.append(plan) or 0)
    return plans


def _fake_run(run_dir: Path, steps: int, **overrides) -> Path:
    """A run as er-train leaves it: config.yaml (with `overrides`), metrics and a checkpoint after `steps`."""
    run_dir.mkdir(parents=True)
    cfg = cli.load_config(cli.TrainConfig, [*FAST, f"run_dir={run_dir}", *[f"{k}={v}" for k, v in overrides.items()]])
    (run_dir / "config.yaml").write_text(cli.to_yaml(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, steps + 1)))
    ckpt = run_dir / "checkpoints" / f"step_{steps:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": steps}))
    return ckpt


@pytest.mark.parametrize("args, message", [
    (["data.template=chatm"], "data.template: expected one of ('raw', "),
    (["spec.gama=3"], "spec.gama: unknown key; did you mean spec.gamma?"),
    (["lr=1e-5"], "lr: unknown key; did you mean train.lr?"),
    (["spec.mode=argmx"], "got 'argmx'; did you mean 'argmax'?"),
])
def test_cli_bad_key_or_value_names_it_and_suggests(args, message, tmp_path, capsys, monkeypatch):
    plans = _no_train(monkeypatch)
    assert cli.main([*args, f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists() and plans == []


def test_cli_run_dir_that_is_a_file_is_bad_input(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for run_dir in (afile, afile / "sub"):
        assert cli.main([f"run_dir={run_dir}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: run_dir: ") and str(afile) in err and len(err.splitlines()) == 1
    assert afile.read_text() == "x"


def test_cli_broken_yaml_gives_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec:\n  mode: rtn\n  gamma_ladder: [5, 7\n")
    assert cli.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:4:1: not valid YAML (") and "at line 3, column 17" in err


def test_cli_help_lists_every_key_with_type_default_and_allowed_values(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for key, _, _, _ in schema_fields(cli.TrainConfig):
        assert f"  {key} " in out, key
    assert "spec.mode                  str = argmax  (one of no-sd|rtn|toggle|adaptive|argmax)" in out
    assert "train.num_steps            int = 10  (an int >= 1)" in out
    assert rollout_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "data.template" in out and "train.lr" not in out


def test_cli_fresh_run_config_names_its_run_dir(tmp_path, monkeypatch):
    plans = _no_train(monkeypatch)
    assert cli.main([*FAST, f"run_dir={tmp_path / 'run'}"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["run_dir"] == str(tmp_path / "run") and plans[0].resume_from is None


def test_cli_resume_complete_run_says_so_and_starts_nothing(tmp_path, capsys, monkeypatch):
    plans = _no_train(monkeypatch)
    _fake_run(tmp_path / "run", steps=3)
    assert cli.main([f"run_dir={tmp_path / 'run'}", "resume=auto"]) == 0
    assert "is complete (3 of 3 steps)" in capsys.readouterr().out and plans == []


def test_cli_resume_with_overrides_keeps_config_yaml_and_reports_changes(tmp_path, capsys, monkeypatch):
    plans = _no_train(monkeypatch)
    ckpt = _fake_run(tmp_path / "run", steps=2, **{"sampling.max_new_tokens": 8})
    original = (tmp_path / "run" / "config.yaml").read_text()
    assert cli.main([f"run_dir={tmp_path / 'run'}", "resume=auto", "train.num_steps=5"]) == 0
    assert (tmp_path / "run" / "config.yaml").read_text() == original
    resumed = yaml.safe_load((tmp_path / "run" / "config.resume-step_000002.yaml").read_text())
    assert resumed["train"]["num_steps"] == 5 and resumed["sampling"]["max_new_tokens"] == 8  # the run's own
    assert "train.num_steps: 3 -> 5" in capsys.readouterr().out
    assert plans[0].resume_from == ckpt and plans[0].cfg.sampling.max_new_tokens == 8


def test_cli_resume_without_checkpoint_keeps_the_logged_steps(tmp_path, capsys, monkeypatch):
    plans = _no_train(monkeypatch)
    run = tmp_path / "run"
    ckpt = _fake_run(run, steps=2)
    (ckpt / "state.json").unlink()  # a crash before the first checkpoint completed
    assert cli.main([f"run_dir={run}", "resume=auto"]) == 2
    assert "resume: " in capsys.readouterr().err and plans == []
    assert (run / "metrics.jsonl").read_text().count("\n") == 2


def test_cli_resume_auto_picks_newest_run_with_a_checkpoint(tmp_path, monkeypatch):
    plans = _no_train(monkeypatch)
    monkeypatch.setattr(cli, "RUNS", tmp_path / "runs")
    good = _fake_run(tmp_path / "runs" / "a", steps=1)
    time.sleep(0.01)
    failed = tmp_path / "runs" / "b"  # newer, but it failed before any checkpoint
    failed.mkdir()
    (failed / "config.yaml").write_text("{}\n")
    assert cli.main(["resume=auto", *FAST]) == 0
    assert plans[0].run_dir == tmp_path / "runs" / "a" and plans[0].resume_from == good


def test_cli_interrupt_during_last_step_is_success(tmp_path, monkeypatch):
    import orchestrator.train as train_module

    run = tmp_path / "run"

    def train(cfg, run_dir, resume_from, prompts):  # Ctrl-C landed in the last step, which then ran
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n"
                                                       for s in range(1, cfg.train.num_steps + 1)))
        return 130

    monkeypatch.setattr(train_module, "train", train)
    monkeypatch.delenv("RAY_RUNTIME_ENV_HOOK", raising=False)
    assert cli.main([*FAST, f"run_dir={run}"]) == 0
    assert os.environ["RAY_RUNTIME_ENV_HOOK"] == "orchestrator.tracker.quiet_ray_workers"


def test_tracker_quiet_known_noise_drops_only_the_known_lines(caplog):
    tracker.quiet_known_noise()
    tracker.quiet_known_noise()  # idempotent
    assert len(logging.getLogger("torchao").filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/site-packages/torchao/_C_mxfp8.abi3.so: nope")
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
            "Calling register_constant() on Enum subclasses is deprecated and will be an error", "<enum 'K'>")
        logging.getLogger("torchao").warning("Failed to load the model")
    assert [r.getMessage() for r in caplog.records] == ["Failed to load the model"]
    env = tracker.quiet_ray_workers({"env_vars": {"A": "1"}})
    assert env["worker_process_setup_hook"] == "orchestrator.tracker.quiet_known_noise"
    assert env["env_vars"] == {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "A": "1"}


def test_rollout_cli_reads_the_rollout_part_of_experiment_files(capsys):
    path = ROOT / "configs" / "experiments" / "qwen2.5-7b" / "toggle.yaml"
    cfg = rollout_cli._load([str(path), "sampling.max_new_tokens=16"])
    assert (cfg.spec.mode, cfg.data.template, cfg.sampling.max_new_tokens) == ("toggle", "qwen-base", 16)
    assert "leaving out reward, train, cluster, logging" in capsys.readouterr().err
    with pytest.raises(rollout_cli.ConfigError, match="^train: unknown key"):
        rollout_cli._load([str(path), "train.lr=1.0e-6"])


def test_sweep_skip_ignored_runs_no_sd_once():
    sweep = {"method": "grid", "program": "er-train", "command": ["er-train", "${args_no_hyphens}"],
             "parameters": {"spec.mode": {"values": ["no-sd", "rtn"]}, "spec.gamma": {"values": [5, 7]}}}
    kept, skipped = sw.skip_ignored(sweep, sw.expand_runs(sweep))
    assert kept == [{"spec.mode": "no-sd", "spec.gamma": 5}, {"spec.mode": "rtn", "spec.gamma": 5},
                    {"spec.mode": "rtn", "spec.gamma": 7}]
    assert skipped == [{"spec.mode": "no-sd", "spec.gamma": 7}]


# On SIGINT: note how many it got, write its metric, exit 130 (er-train's contract: a step, a checkpoint).
CHILD = """
import json, os, pathlib, signal, sys, time
run = pathlib.Path(os.environ["ER_RUN_DIR"]); run.mkdir(parents=True)
got = []
signal.signal(signal.SIGINT, lambda *a: got.append(1))
(run / "started").write_text("")
deadline = time.time() + 20
while not got and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.3)  # "saving a checkpoint": a second SIGINT would land here
(run / "metrics.jsonl").write_text(json.dumps({"step": 1, "t": 1.0}) + "\\n")
(run / "signals").write_text(str(len(got)))
sys.exit(130)
"""


def test_sweep_ctrl_c_reaches_the_run_once_and_stops_the_sweep(tmp_path):
    sweep = {"method": "grid", "metric": {"name": "t"}, "parameters": {"x": {"values": [1, 2]}},
             "command": ["${interpreter}", "-c", CHILD, "${args_no_hyphens}"]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "out"
    # A test run started in the background (`pytest &` in a script) ignores SIGINT, and an ignored signal stays
    # ignored across exec: the sweep would never see the Ctrl-C. A handler here is reset to the default in it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", str(path), "--sweep-dir", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 120  # the sweep's and the run's imports: slow on a loaded 2-core machine
    while not (out / "run-0" / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (out / "run-0" / "started").exists(), "the sweep's first run did not start within 120 s"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert (out / "run-0" / "signals").read_text() == "1" and not (out / "run-1").exists()
    result = json.loads((out / "sweep.json").read_text())
    assert result["is_interrupted"] and [r["exit_code"] for r in result["runs"]] == [130]
    assert "interrupted: 1 of 2 runs" in stdout and "Traceback" not in stderr


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layering_er_sglang_imports_no_orchestrator_and_no_cycles():
    pkg = ROOT / "er_sglang"
    for path in pkg.rglob("*.py"):
        assert not any(m.startswith("orchestrator") for m in _imports(path)), path
    assert not {"er_sglang.reference", "er_sglang.sglang.engine"} & _imports(pkg / "engine.py") - {"er_sglang.rollout"}
    assert "er_sglang.roofline_cli" not in _imports(pkg / "roofline.py")
    assert "er_sglang.rollout" not in _imports(pkg / "reference.py") | _imports(pkg / "sglang" / "engine.py")
