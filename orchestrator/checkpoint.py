"""Checkpoints: trainer shards (DCP), data position, spec-policy state, written so a crash never leaves a
checkpoint that looks complete: everything goes into a hidden `.step_N.partial/` directory (state.json
last), which is renamed to `step_N/` once whole. Disk use is bounded: the newest `checkpoint.keep` stay."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import ray


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, trainers: list, engines: list, data_state: dict, keep: int) -> Path:
    """Save after `step` steps are done; keeps the newest `keep` (>= 1) complete checkpoints.

    Peak disk use is keep + 1 checkpoints (the old ones go once the new one is complete).
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*"):  # left by a crash mid-save: never complete, never resumed from
        shutil.rmtree(stale, ignore_errors=True)
    path, partial = root / f"step_{step:06d}", root / f".step_{step:06d}.partial"
    partial.mkdir()
    ray.get([t.save_checkpoint.remote(str(partial / "trainer")) for t in trainers])
    state = {"step": step, "data": data_state, "policies": ray.get([e.policy_state.remote() for e in engines])}
    (partial / "state.json").write_text(json.dumps(state, indent=1, default=_jsonable))
    if path.exists():  # a step redone after a restart replaces its own older checkpoint
        old = root / f".step_{step:06d}.old"
        path.rename(old)
        partial.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(path)
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


def read_state(path: Path) -> dict:
    """A complete checkpoint's state.json: {"step", "data", "policies"}."""
    return json.loads((Path(path) / "state.json").read_text())


def load(path: Path, trainers: list, engines: list) -> dict:
    """Restore trainer shards and engine policies; returns the state dict (step, data)."""
    state = read_state(path)
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
