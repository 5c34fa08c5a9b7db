"""Checkpoints: trainer shards (DCP), data position, spec-policy state, written so a crash never leaves a
checkpoint that looks complete (state.json is written last)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import ray


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, trainers: list, engines: list, data_state: dict, keep: int) -> Path:
    """Save after `step` steps are done; keeps the newest `keep` complete checkpoints."""
    path = checkpoint_root(run_dir) / f"step_{step:06d}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    ray.get([t.save_checkpoint.remote(str(path / "trainer")) for t in trainers])
    state = {"step": step, "data": data_state, "policies": ray.get([e.policy_state.remote() for e in engines])}
    tmp = path / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=_jsonable))
    tmp.rename(path / "state.json")
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())


def latest(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load(path: Path, trainers: list, engines: list) -> dict:
    """Restore trainer shards and engine policies; returns the state dict (step, data)."""
    state = json.loads((Path(path) / "state.json").read_text())
    ray.get([t.load_checkpoint.remote(str(Path(path) / "trainer")) for t in trainers])
    policies = state["policies"]
    if len(policies) != len(engines):
        policies = [policies[0]] * len(engines)  # engine count changed: every engine starts from engine 0's
    ray.get([e.load_policy_state.remote(p) for e, p in zip(engines, policies)])
    return state


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
