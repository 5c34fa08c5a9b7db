"""A variant of bench_step.py's SD part (issue 9: r = T_draft_step / T_AR per variant): the draft kernel plus the
draft-head settings of the SGLang engine's spec, named by its --variants token, e.g. 'marlin+vocab=32768+head=int4'.
Stdlib only: `table` parses the names back without torch."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

KERNELS = ("marlin", "tinygemm", "gemlite")  # spec.draft_kernel (er_sglang/sglang/int4_kernels.KERNELS)
HEADS = ("shared", "int8", "int4")  # spec.draft_head (er_sglang/sglang/draft_head.py)


@dataclass(frozen=True)
class Variant:
    """One SD engine of a run: spec.draft_kernel (the draft linears' int4 GEMM), spec.draft_vocab (K draft ids,
    0 = all) and spec.draft_head (the draft lm_head's rows: shared bf16, int8 or int4). name = its --variants
    token, e.g. 'marlin+vocab=32768+head=int4'."""
    name: str
    kernel: str
    vocab: int = 0
    head: str = "shared"

    def spec(self) -> dict:
        return {"draft_kernel": self.kernel, "draft_vocab": self.vocab, "draft_head": self.head}


def parse_variant(token: str) -> Variant:
    """'KERNEL[+vocab=K][+head=H]' -> Variant; ValueError naming the token and its bad part otherwise. vocab=full
    is vocab=0, as scripts/accept_real.py names its runs' variants."""
    name = token.strip()
    kernel, *settings = name.split("+")
    if kernel not in KERNELS:
        raise ValueError(f"variant {name!r}: kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    kw: dict = {}
    for item in settings:
        key, _, value = item.partition("=")
        ok = (key == "vocab" and (value.isdigit() or value == "full")) or (key == "head" and value in HEADS)
        if not ok or key in kw:
            raise ValueError(f"variant {name!r}: bad setting {item!r} (expected vocab=K with K >= 0 or vocab=full, "
                             f"or head={'|'.join(HEADS)}; each at most once)")
        kw[key] = (0 if value == "full" else int(value)) if key == "vocab" else value
    return Variant(name, kernel, **kw)


def parse_variants(text: str) -> list[Variant]:
    """--variants: comma-separated variant tokens, each name once."""
    try:
        out = [parse_variant(token) for token in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    names = [v.name for v in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise argparse.ArgumentTypeError(f"variant {dup!r} given twice")
    return out


def draft_vocab_always(model_dir: str) -> list[int]:
    """The ids a reduced draft vocabulary always keeps, picked as SGLangEngine.from_config picks them (stop ids +
    the tokenizer's special ids) where model_dir has a tokenizer; none for a shapes-only dir like `make`'s (the
    worker's DraftVocab takes an empty list, and HeadedDrafter adds the model config's eos ids itself)."""
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return []
    from er_sglang import models

    tokenizer = models.load_tokenizer(model_dir)
    return models.draft_vocab_always(models.model_info(model_dir, tokenizer).stop_token_ids, tokenizer)


def parse_server_arg(text: str) -> tuple[str, object]:
    """--sglang KEY=VALUE (a ServerArgs field for every engine of a run, e.g. enable_torch_compile=true: what the
    small per-layer ops' fusion does to AR and SD alike) -> (KEY, VALUE as JSON: true, 16, 0.5; else the string)."""
    key, sep, value = text.partition("=")
    if not (sep and key):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE (a ServerArgs field)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
