from dataclasses import asdict
from pathlib import Path

import pytest

from er_sglang.config import load_config
from orchestrator import sweep as sw
from orchestrator.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
JOB_FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("roofline", "sweeps"))
MODES = ("no-sd", "rtn", "toggle", "adaptive", "argmax")
# model dir -> (fixed gamma of the paper, kl_coef, template, data)
MODELS = {
    "qwen2.5-7b": (7, 1e-4, "qwen-base", "data/math_hard_train.jsonl"),
    "llama3.1-8b-instruct": (5, 1e-2, "llama-instruct", "data/math_medium_train.jsonl"),
    "qwen2.5-14b": (5, 1e-4, "qwen-base", "data/math_hard_train.jsonl"),
}
# Staged real models (issue 11: one H200, the model staged on the device): a mode pair, equal but for spec.mode.
STAGED = {"qwen2.5-coder-0.5b": ("no-sd", "argmax")}
# Where configs/default.yaml differs from the schema defaults (none: `er-train` with no arguments runs
# exactly the default job; the experiment files set the paper's lr 5e-7 and KL weights).
DEFAULT_YAML_OVERRIDES: dict = {}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.mark.parametrize("path", JOB_FILES, ids=_rel)
def test_configs_every_job_yaml_loads(path):
    cfg = load_config(TrainConfig, [str(path)])
    assert isinstance(cfg, TrainConfig)


def test_configs_experiments_are_three_models_times_five_modes_plus_staged_pairs():
    assert {p.parent.name for p in CONFIGS.glob("experiments/*/*.yaml")} == set(MODELS) | set(STAGED)
    for model in MODELS:
        assert {p.stem for p in (CONFIGS / "experiments" / model).glob("*.yaml")} == {"base", *MODES}
    for model, modes in STAGED.items():
        assert {p.stem for p in (CONFIGS / "experiments" / model).glob("*.yaml")} == {"base", *modes}


@pytest.mark.parametrize("model", STAGED)
def test_configs_staged_mode_files_differ_only_in_mode(model):
    first, second = (_flat(asdict(load_config(TrainConfig, [str(CONFIGS / "experiments" / model / f"{m}.yaml")])))
                     for m in STAGED[model])
    assert {k for k in first if first[k] != second[k]} == {"spec.mode"}  # same seed, data, lengths, everything
    assert (first["spec.mode"], second["spec.mode"]) == STAGED[model]
    engine = (first["engine"], first["model.dtype"], first["sglang.attention_backend"])
    assert engine == ("sglang", "bfloat16", "triton")
    cluster = (first["cluster.num_gpus"], first["cluster.num_engines"], first["cluster.placement"])
    assert cluster == (1, 1, "colocated")
    assert first["data.samples_per_prompt"] == 8 and first["sampling.max_new_tokens"] == 2048
    assert first["sampling.temperature"] == 1.0 and first["train.num_steps"] >= 20


@pytest.mark.parametrize("model", MODELS)
def test_configs_experiment_mode_files_set_mode_and_paper_recipe(model):
    gamma, kl_coef, template, data = MODELS[model]
    for mode in MODES:
        cfg = load_config(TrainConfig, [str(CONFIGS / "experiments" / model / f"{mode}.yaml")])
        assert cfg.spec.mode == mode
        if mode in ("rtn", "toggle", "adaptive"):
            assert cfg.spec.gamma == gamma
        assert (cfg.engine, cfg.model.dtype) == ("sglang", "bfloat16")
        assert (cfg.cluster.num_gpus, cfg.cluster.num_trainers, cfg.cluster.num_engines) == (8, 8, 8)
        assert cfg.cluster.placement == "colocated"
        assert (cfg.data.prompts_per_step, cfg.data.samples_per_prompt) == (128, 8)
        assert (cfg.data.template, cfg.data.train) == (template, data)
        assert cfg.sampling.max_new_tokens == 8192 and cfg.sampling.temperature == 1.0
        assert cfg.train.lr == 5e-7 and cfg.train.kl_coef == kl_coef and cfg.train.kl_type == "low_var_kl"
        assert cfg.sglang == {"attention_backend": "flashinfer", "sampling_backend": "pytorch",
                              "mem_fraction_static": 0.7}


def test_configs_default_yaml_equals_schema_defaults_except_documented():
    from_file = _flat(asdict(load_config(TrainConfig, [str(CONFIGS / "default.yaml")])))
    defaults = _flat(asdict(load_config(TrainConfig, [])))
    assert from_file.keys() == defaults.keys()
    diffs = {k: (defaults[k], from_file[k]) for k in defaults if defaults[k] != from_file[k]}
    assert diffs == DEFAULT_YAML_OVERRIDES


def test_configs_default_yaml_holds_the_cpu_job():
    cfg = load_config(TrainConfig, [str(CONFIGS / "default.yaml")])
    assert (cfg.model.path, cfg.engine, cfg.spec.mode) == ("smollm2-135m-instruct", "reference", "argmax")
    assert (cfg.data.prompts_per_step, cfg.data.samples_per_prompt, cfg.sampling.max_new_tokens) == (3, 8, 24)
    assert (cfg.train.num_steps, cfg.cluster.num_trainers, cfg.cluster.num_engines) == (10, 2, 1)
    assert cfg.checkpoint.every == 5 and cfg.cluster.num_gpus == 0


@pytest.mark.parametrize("path", [p for p in JOB_FILES if p.name != "base.yaml"]  # bases aren't launched
                         + sorted(CONFIGS.glob("sweeps/*.yaml")), ids=_rel)
def test_configs_first_line_gives_the_launch_command(path):
    tool = "er-sweep" if path.parent.name == "sweeps" else "er-train"
    assert path.read_text().splitlines()[0].split() == ["#", tool, _rel(path)]


@pytest.mark.parametrize("name, num_runs", [("spec_gamma", 15), ("lr", 8)])
def test_configs_sweep_runs_are_valid_er_train_configs(name, num_runs):
    sweep = sw.load_sweep(str(CONFIGS / "sweeps" / f"{name}.yaml"))
    runs = sw.expand_runs(sweep)
    assert len(runs) == num_runs
    for params in runs:
        command = sw.build_command(sweep, params, "runs/x")
        assert command[:3] == ["/usr/bin/env", "er-train", "configs/default.yaml"]
        overrides = command[3:]
        assert overrides[-1] == "run_dir=runs/x"
        cfg = load_config(TrainConfig, [str(CONFIGS / "default.yaml"), *overrides])
        assert all(_flat(asdict(cfg))[k] == v for k, v in params.items())


def test_check_runnable_colocated_sglang_needs_the_memory_saver_unless_opted_out(monkeypatch):
    import importlib.util

    from er_sglang.config import ConfigError
    from er_sglang.rollout import check_runnable

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name == "torch_memory_saver" else object() if name == "sglang" else real(name, *a)))
    cfg = load_config(TrainConfig, ["engine=sglang", "cluster.placement=colocated"])
    with pytest.raises(ConfigError, match=r"^cluster\.placement: colocated with engine=sglang needs torch_memory_saver"):
        check_runnable(cfg)
    check_runnable(load_config(TrainConfig, ["engine=sglang", "cluster.placement=colocated",
                                             "sglang.enable_memory_saver=false"]))
    check_runnable(load_config(TrainConfig, ["engine=sglang", "cluster.placement=split"]))


def test_configs_sglang_refuses_a_group_size_other_than_128():
    from er_sglang.config import ConfigError

    # the GPU's int4 kernels quantize in groups of 128: any other size would silently run as 128
    with pytest.raises(ConfigError, match=r"^spec\.group_size: engine=sglang runs int4 groups of 128 only, got 64; "
                                          r"set spec\.group_size=128 \(other sizes run on engine=reference\)$"):
        load_config(TrainConfig, ["engine=sglang", "spec.mode=rtn", "spec.group_size=64"])
    assert load_config(TrainConfig, ["engine=sglang", "spec.mode=rtn"]).spec.group_size == 128
    assert load_config(TrainConfig, ["engine=reference", "spec.mode=rtn", "spec.group_size=64"]).spec.group_size == 64
    # no-sd builds no drafter and reads no spec.* key (config.ignores_key)
    assert load_config(TrainConfig, ["engine=sglang", "spec.mode=no-sd", "spec.group_size=256"]).engine == "sglang"
