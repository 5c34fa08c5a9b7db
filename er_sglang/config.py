"""The rollout-side config schema (dataclasses merged with YAML and key=value overrides via OmegaConf).

`orchestrator/config.py` extends `RolloutJob` with the training sections; both load through
`load_config`, which turns every OmegaConf/validation failure into one `ConfigError` line naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from er_sglang.data import TEMPLATES
from er_sglang.policy import ARGMAX_GAMMAS

SPEC_MODES = ("no-sd", "rtn", "toggle", "adaptive", "argmax")
ENGINES = ("reference", "sglang")
DTYPES = ("float32", "bfloat16", "float16")
DRAFTER_BACKENDS = ("auto", "torchao", "rtn")
DRAFT_HEADS = ("shared", "int8", "int4")  # spec.draft_head (er_sglang/draft_vocab.py)
DRAFT_KERNELS = ("marlin", "tinygemm", "gemlite")  # spec.draft_kernel (er_sglang/sglang/int4_kernels.py)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A bad config value, key or file; the message is one line naming it."""


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        choices = re.findall(r"'([^']*)'", expected) if isinstance(got, str) else []
        raise ConfigError(f"{key}: expected {expected}, got {got!r}{did_you_mean(got, choices, quote=True)}")


def did_you_mean(word: str, candidates, quote: bool = False) -> str:
    """'; did you mean X?' for the closest candidate (difflib ratio >= 0.6), else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1)
    return f"; did you mean {close[0]!r}?" if close and quote else (f"; did you mean {close[0]}?" if close else "")


def ignores_key(mode: str, key: str) -> bool:
    """True when spec.mode `mode` never reads `key`: no-sd builds no drafter and reads no spec.* key."""
    return mode == "no-sd" and key.startswith("spec.") and key != "spec.mode"


@dataclass
class ModelConfig:
    path: str = "smollm2-135m-instruct"  # HF checkpoint dir or a packaged alias (er_sglang.models)
    dtype: str = "float32"  # float32 on CPU (bf16 matmuls are ~6x slower there); bfloat16 on GPU

    def __post_init__(self):
        _require(bool(self.path), "model.path", "a checkpoint directory or alias", self.path)
        _require(self.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", self.dtype)


@dataclass
class SpecConfig:
    mode: str = "argmax"
    gamma: int = 5  # fixed gamma (rtn/toggle) and the starting rung (adaptive)
    gamma_ladder: list[int] = field(default_factory=lambda: [5, 7, 9, 11])
    roofline: str = "configs/roofline/a100_tp1_qwen2.5-7b.json"  # calibrated cost model (JSON)
    margin: float = 0.05
    rampup_batch: int = 32
    hysteresis: float = 0.03
    min_dwell_steps: int = 8
    drafter_backend: str = "auto"
    group_size: int = 128
    bs_max: int | None = None  # GPU: no gamma > 0 graphs above this batch (default: from the roofline)
    argmax_gammas: list[int] = field(default_factory=lambda: list(ARGMAX_GAMMAS))  # argmax's candidates (+ 0)
    probe_every: int = 256  # argmax: one smallest-gamma probe after this many plain steps (0: never)
    draft_vocab: int = 0  # draft head scores only the K most frequent token ids, q = 0 elsewhere (0: all)
    draft_vocab_counts: str = "soft"  # what ranks them: target p summed over emitted positions, or token counts
    draft_head: str = "shared"  # the draft head's rows: the target's (shared), int8 or int4 (RTN g128) copies
    # grid + kernel of the int4 draft linears: auto = marlin on engine=sglang, the float-zero tinygemm grid on
    # engine=reference; marlin / gemlite = the integer-zero grid on both engines (int4_linear.IntZeroInt4Linear on CPU)
    draft_kernel: str = "auto"

    def __post_init__(self):
        _require(self.mode in SPEC_MODES, "spec.mode", f"one of {SPEC_MODES}", self.mode)
        ladder = list(self.gamma_ladder)
        _require(len(ladder) > 0 and all(g > 0 for g in ladder) and ladder == sorted(set(ladder)),
                 "spec.gamma_ladder", "a non-empty increasing list of positive ints", ladder)
        _require(self.gamma > 0, "spec.gamma", "a positive int", self.gamma)
        if self.mode == "adaptive":
            _require(self.gamma in ladder, "spec.gamma", f"a rung of spec.gamma_ladder {ladder}", self.gamma)
        _require(0.0 <= self.margin < 1.0, "spec.margin", "a float in [0, 1)", self.margin)
        _require(self.rampup_batch >= 0, "spec.rampup_batch", "an int >= 0", self.rampup_batch)
        _require(self.hysteresis >= 0.0, "spec.hysteresis", "a float >= 0", self.hysteresis)
        _require(self.min_dwell_steps >= 1, "spec.min_dwell_steps", "an int >= 1", self.min_dwell_steps)
        _require(self.drafter_backend in DRAFTER_BACKENDS, "spec.drafter_backend",
                 f"one of {DRAFTER_BACKENDS}", self.drafter_backend)
        _require(self.group_size in (32, 64, 128, 256), "spec.group_size", "32, 64, 128 or 256",
                 self.group_size)
        cands = list(self.argmax_gammas)
        _require(len(cands) > 0 and all(g > 0 for g in cands) and cands == sorted(set(cands)),
                 "spec.argmax_gammas", "a non-empty increasing list of positive ints", cands)
        _require(self.probe_every >= 0, "spec.probe_every", "an int >= 0", self.probe_every)
        _require(self.draft_vocab >= 0, "spec.draft_vocab", "an int >= 0 (0 = the full vocabulary)",
                 self.draft_vocab)
        _require(self.draft_vocab_counts in ("soft", "tokens"), "spec.draft_vocab_counts",
                 "one of ('soft', 'tokens')", self.draft_vocab_counts)
        _require(self.draft_head in DRAFT_HEADS, "spec.draft_head", f"one of {DRAFT_HEADS}", self.draft_head)
        _require(self.draft_kernel in ("auto", *DRAFT_KERNELS), "spec.draft_kernel",
                 f"one of {DRAFT_KERNELS} or 'auto'", self.draft_kernel)
        if self.bs_max is not None:
            _require(self.bs_max >= 0, "spec.bs_max", "an int >= 0 or null", self.bs_max)
        if self.mode in ("toggle", "adaptive", "argmax"):
            _require(resolve_path(self.roofline).is_file(), "spec.roofline", "an existing roofline JSON file",
                     self.roofline)


@dataclass
class SamplingConfig:
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        _require(self.max_new_tokens >= 1, "sampling.max_new_tokens", "an int >= 1", self.max_new_tokens)
        _require(self.temperature >= 0.0, "sampling.temperature", "a float >= 0", self.temperature)
        _require(0.0 < self.top_p <= 1.0, "sampling.top_p", "a float in (0, 1]", self.top_p)


@dataclass
class DataConfig:
    # dataset spec (er_sglang.data.load_dataset); the default job: one-digit sums a 135M model can learn
    train: str = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1"
    size: int = 2048  # examples generated by a procedural dataset (reasoning_gym); files are used whole
    template: str = "chatml-brief"
    prompts_per_step: int = 3
    samples_per_prompt: int = 8  # G: a larger group gives more prompts a non-zero advantage
    seed: int = 0

    def __post_init__(self):
        _require(bool(self.train), "data.train", "a dataset spec or file", self.train)
        _require(self.template in TEMPLATES, "data.template", f"one of {TEMPLATES}", self.template)
        _require(self.size >= 1, "data.size", "an int >= 1", self.size)
        _require(self.prompts_per_step >= 1, "data.prompts_per_step", "an int >= 1", self.prompts_per_step)
        _require(self.samples_per_prompt >= 1, "data.samples_per_prompt", "an int >= 1",
                 self.samples_per_prompt)


@dataclass
class RolloutJob:
    """`er-rollout`: generate rollouts for `data.prompts_per_step` prompts x `samples_per_prompt`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: str = "reference"
    sglang: dict[str, Any] = field(default_factory=dict)  # passed to SGLang ServerArgs (engine: sglang)
    seed: int = 0

    def __post_init__(self):
        _require(self.engine in ENGINES, "engine", f"one of {ENGINES}", self.engine)
        if self.sglang and self.engine != "sglang":
            raise ConfigError("sglang: only used with engine=sglang; remove it or set engine=sglang")
        _check_spec_on_engine(self.spec, self.engine)
        vocab = _known_vocab_size(self.model.path) if self.spec.draft_vocab else None
        if vocab is not None:  # else the engine checks it once the model is on disk
            _require(self.spec.draft_vocab <= vocab, "spec.draft_vocab",
                     f"an int in [0, {vocab}] (0 = the full vocabulary of model.path)", self.spec.draft_vocab)


BAD_INPUT = (ConfigError, ValueError, FileNotFoundError)


def _check_spec_on_engine(spec: SpecConfig, engine: str) -> None:
    """Spec settings the SGLang worker lacks (its int4 group size, soft draft-vocab counts: draft_head.py) are
    refused, not ignored."""
    if engine != "sglang" or spec.mode == "no-sd":
        return
    if spec.group_size != 128:  # the GPU's int4 kernels (marlin_int4.GROUP_SIZE) quantize in groups of 128 only
        raise ConfigError(f"spec.group_size: engine=sglang runs int4 groups of 128 only, got {spec.group_size}; "
                          "set spec.group_size=128 (other sizes run on engine=reference)")
    if spec.draft_vocab and spec.draft_vocab_counts == "soft":
        raise ConfigError("spec.draft_vocab_counts: 'soft' runs on engine=reference only (the SGLang worker "
                          "counts tokens); set spec.draft_vocab_counts=tokens with engine=sglang")


def _known_vocab_size(model_path: str) -> int | None:
    """vocab_size in config.json of a checkpoint dir or an alias already converted; None if not on disk
    (validation never converts a model)."""
    import json

    from er_sglang.models import ALIASES, cache_dir

    path = Path(model_path).expanduser()
    files = [path / "config.json"]
    if model_path in ALIASES:
        converted = f"{model_path}-{ALIASES[model_path].sha256[:12]}*/config.json"  # any dtype's dir
        files += sorted((cache_dir() / "models").glob(converted))
    for file in files:
        if file.is_file():
            try:
                return int(json.loads(file.read_text())["vocab_size"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def reject_options(argv: list[str], usage: str) -> None:
    """CLIs take [CONFIG.yaml] key=value ...: any other dash option is bad input."""
    bad = [a for a in argv if a.startswith("-")]
    if bad:
        raise ConfigError(f"{bad[0]}: unknown option ({usage}; --help lists the keys)")


def report_bad_input(exc: Exception) -> int:
    """One `error:` line on stderr and exit code 2 (no traceback)."""
    print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
    return 2


def resolve_path(path: str) -> Path:
    """A relative path is looked up from the working directory, then from the project root."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p


def load_config(schema: type, argv: list[str], base: str | Path | None = None, ignore: tuple = ()):
    """[CONFIG.yaml] [key=value ...] -> validated instance of `schema`; raises ConfigError (one line).

    Layers, later wins: the schema defaults, `base` (a run's saved config.yaml when it is resumed),
    CONFIG.yaml without its top-level keys in `ignore`, then the key=value overrides.
    """
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if len(files) > 1:
        raise ConfigError(f"expected at most one config file, got {files}")
    layers = [(str(base), _load_yaml(str(base)))] if base else []
    if files:
        from_file = _load_yaml(files[0])
        for key in ignore:
            from_file.pop(key, None)
        layers.append((files[0], from_file))
    try:
        layers.append(("", OmegaConf.from_dotlist(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{_omegaconf_message(exc, schema)} (in key=value overrides)") from None
    merged = OmegaConf.structured(schema)
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{source}: {_omegaconf_message(exc, schema)}" if source
                              else _omegaconf_message(exc, schema)) from None
    try:
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc, schema)) from None
    except ValueError as exc:  # __post_init__ of a nested dataclass wrapped by OmegaConf
        raise ConfigError(str(exc).splitlines()[0]) from None


def foreign_keys(schema: type, path: str) -> list[str]:
    """Top-level keys of the YAML file `path` (with its defaults) that `schema` does not have."""
    names = {f.name for f in dataclasses.fields(schema)}
    return [str(k) for k in _load_yaml(path) if str(k) not in names]


def _load_yaml(path: str, seen: tuple = ()):
    """Load a YAML file; a top-level `defaults: [base.yaml, ...]` list (paths relative to the file) is
    merged first, so experiment files can share a base."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found" if not p.exists() else f"{path}: not a file")
    if p.resolve() in seen:
        raise ConfigError(f"{path}: defaults include themselves")
    try:
        cfg = OmegaConf.load(p)
    except yaml.MarkedYAMLError as exc:  # line and column of the problem, as an editor counts them
        mark, opened = exc.problem_mark or exc.context_mark, exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        context = f"; {exc.context} at line {opened.line + 1}, column {opened.column + 1}" if opened else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({exc.problem or exc.context}{context})") from None
    except Exception as exc:  # noqa: BLE001 - unreadable file, bad encoding: report the file and the first line
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not OmegaConf.is_dict(cfg):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    bases = cfg.pop("defaults", None)
    bases = [] if bases is None else bases
    if not (isinstance(bases, list) or OmegaConf.is_list(bases)):
        raise ConfigError(f"{path}: defaults: expected a list of YAML files")
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _load_yaml(str(p.parent / str(base)), seen + (p.resolve(),)))
    return OmegaConf.merge(merged, cfg)


def _omegaconf_message(exc: OmegaConfBaseException, schema: type) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        keys = [k for k, _, _, _ in schema_fields(schema)]
        leaf = key.rsplit(".", 1)[-1]
        same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]  # lr= -> train.lr
        hint = f"; did you mean {same_leaf[0]}?" if same_leaf else did_you_mean(key, keys)
        return f"{key}: unknown key{hint} (--help lists the keys)"
    cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
    if cause:
        return str(cause)
    return f"{key}: {msg}" if key else msg


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def schema_fields(schema: type, prefix: str = ""):
    """(dotted key, dataclass field, the dataclass that owns it, default) for every leaf key of `schema`."""
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from schema_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, schema, default


def schema_help(schema: type, usage: str) -> str:
    """`--help`: every key by section with its type, default, allowed values (asked of the schema's own
    validation, so they cannot drift from it) and the comment its field carries in the source."""
    lines = [usage, "", "CONFIG.yaml holds these keys (configs/ has examples); key=value overrides it.",
             "key  type = default  (allowed values)  # what it is"]
    sections: dict[str, list[str]] = {"top level": []}
    for key, f, owner, default in schema_fields(schema):
        allowed = _allowed_values(owner, f, key)
        comment = _field_comment(owner, f.name)
        sections.setdefault(key.split(".")[0] if "." in key else "top level", []).append(
            f"  {key:<26} {f.type} = {_show(default)}" + (f"  ({allowed})" if allowed else "")
            + (f"  # {comment}" if comment else ""))
    for name, rows in sections.items():
        lines += ["", f"{name}:", *rows]
    return "\n".join(lines)


_PROBES = {"str": "\0", "int": -10**18, "float": -1e18, "int | None": -10**18, "list[int]": [-1]}


def _allowed_values(owner: type, f: dataclasses.Field, key: str) -> str:
    """What the validator expects of `key`: build `owner` with a value it must reject and read the message."""
    probe = _PROBES.get(str(f.type))
    if probe is None:
        return ""
    try:
        owner(**{f.name: probe})
    except ConfigError as exc:
        msg = str(exc)
        if msg.startswith(key) and ": expected " in msg:
            expected = msg.split(": expected ", 1)[1].rsplit(", got ", 1)[0]
            return re.sub(r"\(('[^)]*')\)", lambda m: m.group(1).replace("'", "").replace(", ", "|"), expected)
    except Exception:  # noqa: BLE001 - a probe another check trips over says nothing about this key
        return ""
    return ""


def _field_comment(owner: type, name: str) -> str:
    for cls in owner.__mro__:
        if dataclasses.is_dataclass(cls):
            for line in inspect.getsource(cls).splitlines():
                match = re.match(rf"\s+{name}: [^=]+=.*?  # (.*)$", line)
                if match:
                    return match.group(1)
    return ""


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return value or "''"
    return str(value)
