"""`er-sweep SWEEP.yaml [--sweep-dir DIR] [--max-runs N] [--seed S] [--dry-run]`: a W&B sweep, no server.

Reads the same YAML that `wandb sweep` takes (method grid|random, parameters with values / value /
distribution, metric, program, command with ${env} ${interpreter} ${program} ${args} ${args_no_hyphens}
${args_json}), runs each expanded command as a subprocess, one after another, and writes
`<sweep_dir>/sweep.json` (runs, overrides, exit codes, last metric values, best run) after every run.

Run i gets `ER_RUN_DIR=<sweep_dir>/run-<i>` in its environment and, when the command is `er-train`, a
`run_dir=<sweep_dir>/run-<i>` override. Its metric is the mean over the steps in `<run_dir>/metrics.jsonl`
(with the std and the last value beside it): one step's timing is too noisy to rank runs by. An
er-train run that differs from an earlier one only in keys its spec.mode ignores (no-sd and spec.gamma)
is skipped. Random sweeps stop after --max-runs (default: the YAML's `run_cap`, as `wandb agent --count`).

Ctrl-C is passed on to the running command once per press (it runs in its own session, so the terminal
does not signal it directly): er-train then finishes its step and saves a checkpoint. No run starts
after an interrupt; the exit code is 130 unless every run had already run and succeeded.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from er_sglang.config import ignores_key
from orchestrator.tracker import read_metrics

METHODS = ("grid", "random")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # wandb's default


class SweepError(ValueError):
    """A bad sweep file or flag; printed as one `error:` line, exit 2."""


def load_sweep(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"{path}: sweep file not found")
    try:
        sweep = yaml.safe_load(p.read_text())  # not OmegaConf: ${args} is a wandb macro, not interpolation
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(sweep, dict):
        raise SweepError(f"{path}: expected a YAML mapping at the top level")
    if sweep.get("method") not in METHODS:
        raise SweepError(f"method: expected one of {METHODS} (bayes needs the W&B server), "
                         f"got {sweep.get('method')!r}")
    params = sweep.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError("parameters: expected a non-empty mapping of key -> {values|value|distribution}")
    for key, spec in params.items():
        _check_param(str(key), spec, sweep["method"])
    metric = sweep.get("metric")
    if metric is not None and (not isinstance(metric, dict) or "name" not in metric
                               or metric.get("goal", "minimize") not in ("minimize", "maximize")):
        raise SweepError("metric: expected {name: KEY, goal: minimize|maximize}")
    return sweep


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem}, line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _check_param(key: str, spec, method: str) -> None:
    if not isinstance(spec, dict) or not ({"values", "value", "distribution"} & spec.keys()):
        raise SweepError(f"parameters.{key}: expected {{values: [...]}}, {{value: x}} or {{distribution: ...}}")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise SweepError(f"parameters.{key}.values: expected a non-empty list")
    if "distribution" in spec:
        if method == "grid":
            raise SweepError(f"parameters.{key}: method grid needs values, not a distribution")
        if spec["distribution"] not in DISTRIBUTIONS:
            raise SweepError(f"parameters.{key}.distribution: expected one of {DISTRIBUTIONS}, "
                             f"got {spec['distribution']!r}")
        lo, hi = spec.get("min"), spec.get("max")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or lo > hi:
            raise SweepError(f"parameters.{key}: expected numeric min <= max (write 1.0e-5, not 1e-5), "
                             f"got min={lo!r} max={hi!r}")
        if spec["distribution"] == "log_uniform_values" and lo <= 0:
            raise SweepError(f"parameters.{key}.min: log_uniform_values needs min > 0, got {lo!r}")


def expand_runs(sweep: dict, max_runs: int | None = None, seed: int = 0) -> list[dict]:
    """The parameter assignments, one dict per run: grid = the cartesian product (in YAML order),
    random = `max_runs` independent draws."""
    params = sweep["parameters"]
    if sweep["method"] == "grid":
        axes = [spec["values"] if "values" in spec else [spec["value"]] for spec in params.values()]
        runs = [dict(zip(params, combo)) for combo in itertools.product(*axes)]
        return runs[:max_runs] if max_runs is not None else runs
    max_runs = max_runs if max_runs is not None else sweep.get("run_cap")
    if not isinstance(max_runs, int) or max_runs < 1:
        raise SweepError("method random: give --max-runs N (or run_cap: N in the sweep file)")
    rng = random.Random(seed)
    return [{key: _draw(spec, rng) for key, spec in params.items()} for _ in range(max_runs)]


def _draw(spec: dict, rng: random.Random):
    if "values" in spec:
        return rng.choice(spec["values"])
    if "value" in spec:
        return spec["value"]
    lo, hi = spec["min"], spec["max"]
    if spec["distribution"] == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if spec["distribution"] == "log_uniform_values":  # log x ~ U(log min, log max)
        return float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.4g}")  # 4 digits: readable
    return rng.uniform(lo, hi)


def build_command(sweep: dict, params: dict, run_dir: str | None = None) -> list[str]:
    """Substitute wandb's macros; params become `key=value` (${args_no_hyphens}) or `--key=value`."""
    command = [str(c) for c in sweep.get("command") or DEFAULT_COMMAND]
    args = dict(params)
    if run_dir is not None and _is_er_train(sweep, command):
        args["run_dir"] = run_dir
    macros = {
        "env": ["/usr/bin/env"],
        "interpreter": [sys.executable],
        "args": [f"--{k}={v}" for k, v in args.items()],
        "args_no_hyphens": [f"{k}={v}" for k, v in args.items()],
        "args_json": [json.dumps(args)],
    }
    if "program" in sweep:
        macros["program"] = [str(sweep["program"])]
    out = []
    for token in command:
        if token.startswith("${") and token.endswith("}"):
            if token[2:-1] not in macros:
                raise SweepError(f"command: unknown or unset macro {token} (known: "
                                 f"{', '.join('${' + m + '}' for m in macros)})")
            out += macros[token[2:-1]]
        else:
            out.append(token)
    return out


def _is_er_train(sweep: dict, command: list[str]) -> bool:
    """`er-train ...` or `python -m orchestrator.cli ...`, directly or as ${program}."""
    program = [str(sweep.get("program", ""))] if "${program}" in command else []
    return any(Path(t).name == "er-train" or t == "orchestrator.cli" for t in command + program)


def skip_ignored(sweep: dict, assignments: list[dict]) -> tuple[list[dict], list[dict]]:
    """(runs to do, runs skipped): an er-train run that differs from an earlier one only in keys its
    spec.mode ignores would repeat that run."""
    command = [str(c) for c in sweep.get("command") or DEFAULT_COMMAND]
    if not _is_er_train(sweep, command):
        return assignments, []
    kept, skipped, seen = [], [], set()
    for params in assignments:
        mode = str(params.get("spec.mode", ""))
        signature = tuple((k, repr(v)) for k, v in params.items() if not ignores_key(mode, k))
        (skipped if signature in seen else kept).append(params)
        seen.add(signature)
    return kept, skipped


def run_metric(run_dir: Path, name: str) -> dict:
    """{metric: mean over the logged steps, metric_std, metric_last, metric_steps} of `name` (None if unlogged)."""
    values = [line[name] for line in read_metrics(run_dir / "metrics.jsonl")
              if isinstance(line.get(name), (int, float))]
    if not values:
        return {"metric": None, "metric_std": None, "metric_last": None, "metric_steps": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"metric": statistics.fmean(values), "metric_std": std, "metric_last": values[-1],
            "metric_steps": len(values)}


def best_run(runs: list[dict], goal: str) -> dict | None:
    """The finished run (exit 0) with the best metric; `goal` is minimize or maximize."""
    done = [r for r in runs if r["exit_code"] == 0 and isinstance(r["metric"], (int, float))
            and not math.isnan(r["metric"])]
    if not done:
        return None
    return (max if goal == "maximize" else min)(done, key=lambda r: r["metric"])


def run_sweep(sweep: dict, sweep_path: str, sweep_dir: Path, assignments: list[dict]) -> dict:
    metric = sweep.get("metric") or {}
    result = {"sweep": sweep_path, "method": sweep["method"], "metric": metric, "runs": [], "best": None,
              "num_planned": len(assignments), "is_interrupted": False}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for i, params in enumerate(assignments):
        run_dir = sweep_dir / f"run-{i}"
        command = build_command(sweep, params, str(run_dir))
        print(f"[er-sweep] run {i + 1}/{len(assignments)}: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        exit_code, is_interrupted = _run_child(command, {**os.environ, "ER_RUN_DIR": str(run_dir)})
        run = {"index": i, "run_dir": str(run_dir), "overrides": [f"{k}={v}" for k, v in params.items()],
               "command": command, "exit_code": exit_code, "wall_s": round(time.perf_counter() - start, 3),
               **(run_metric(run_dir, metric["name"]) if metric else {"metric": None})}
        result["runs"].append(run)
        print(f"[er-sweep] run {i}: exit {exit_code}, {metric.get('name', 'metric')} = {_show_metric(run)}",
              flush=True)
        if metric:
            result["best"] = best_run(result["runs"], metric.get("goal", "minimize"))
        result["is_interrupted"] = is_interrupted
        (sweep_dir / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        if is_interrupted:
            break
    return result


def _run_child(command: list[str], env: dict) -> tuple[int, bool]:
    """Run `command` to its end -> (exit code, whether it was interrupted). It runs in a session of its
    own, so one Ctrl-C reaches it once (from here): er-train's first SIGINT saves, a second stops at once."""
    try:
        proc = subprocess.Popen(command, env=env, start_new_session=True)
    except OSError as exc:  # command not found / not executable: record it and go on
        print(f"[er-sweep] {exc}", file=sys.stderr, flush=True)
        return 127, False
    is_interrupted = False
    while True:
        try:
            return proc.wait(), is_interrupted
        except KeyboardInterrupt:
            if not is_interrupted:
                print("[er-sweep] interrupt: passed to the run, which saves a checkpoint; no further runs "
                      "(Ctrl-C again stops the run at once)", flush=True)
            is_interrupted = True
            proc.send_signal(signal.SIGINT)


def _show_metric(run: dict) -> str:
    if run.get("metric") is None:
        return "None"
    return (f"{run['metric']:.4g} (mean of {run['metric_steps']} steps, std {run['metric_std']:.2g}, "
            f"last {run['metric_last']:.4g})")


def _summary(result: dict, sweep_dir: Path) -> str:
    best, runs = result["best"], result["runs"]
    text = f"{len(runs)} of {result['num_planned']} runs -> {sweep_dir / 'sweep.json'}; best: "
    if not best:
        return text + "none"
    text += f"run-{best['index']} {' '.join(best['overrides'])} ({result['metric']['name']} = {_show_metric(best)})"
    close = [r for r in runs if r is not best and r["exit_code"] == 0 and r["metric"] is not None
             and abs(r["metric"] - best["metric"]) <= best["metric_std"]]
    if close:  # within one std of the best's own step-to-step spread: the ranking between them is noise
        text += "; within its std: " + ", ".join(f"run-{r['index']}" for r in close)
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other er-* error
        raise SweepError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="er-sweep", description="Run a W&B sweep YAML locally, without a W&B server.")
    parser.add_argument("sweep", help="sweep YAML (the file `wandb sweep` takes)")
    parser.add_argument("--sweep-dir", help="output dir (default runs/sweep-<name>-<time>)")
    parser.add_argument("--max-runs", type=int, help="random: number of runs (grid: the first N)")
    parser.add_argument("--seed", type=int, default=0, help="random: sampling seed")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        sweep = load_sweep(args.sweep)
        assignments, skipped = skip_ignored(sweep, expand_runs(sweep, args.max_runs, args.seed))
        sweep_dir = Path(args.sweep_dir or f"runs/sweep-{Path(args.sweep).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        if skipped:
            print(f"[er-sweep] skipping {len(skipped)} runs that repeat an earlier one (their spec.mode ignores "
                  "the keys they differ in): " + "; ".join(" ".join(f"{k}={v}" for k, v in p.items())
                                                           for p in skipped), flush=True)
        if args.dry_run:
            for i, params in enumerate(assignments):
                print(shlex.join(build_command(sweep, params, str(sweep_dir / f"run-{i}"))))
            return 0
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` is handled as Ctrl-C: the run gets to save
        result = run_sweep(sweep, args.sweep, sweep_dir, assignments)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # between runs, before any run started
        print("[er-sweep] interrupted", file=sys.stderr)
        return 130
    is_ok = all(r["exit_code"] == 0 for r in result["runs"])
    if result["is_interrupted"] and not (is_ok and len(result["runs"]) == result["num_planned"]):
        print(f"[er-sweep] interrupted: {_summary(result, sweep_dir)}", flush=True)
        return 130
    print(f"[er-sweep] {_summary(result, sweep_dir)}", flush=True)
    return 0 if is_ok else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
