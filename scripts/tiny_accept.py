"""CPU estimate of the GPU tests' tiny model's int4 acceptance (tests/gpu/conftest.make_tiny_qwen2).

    python scripts/tiny_accept.py --embed-scale 30 1 --temperature 1 2

For each embedding scale and sampling temperature: alpha = E[sum_x min(p(x), q(x))] (target p, draft q = the
same model with every decoder linear on Marlin's int4 grid, marlin_int4.quantize_rtn / dequantize_rtn), top-1
and top-3 mass of p, over 64 contexts = the tests' 16-token PROMPT plus 4 tokens sampled from the target.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from er_sglang.sglang.marlin_int4 import dequantize_rtn, quantize_rtn
from tests.gpu.conftest import PROMPT, make_tiny_qwen2


@torch.no_grad()
def estimate(embed_scale: float, temperatures: list[float], contexts: int = 64, positions: int = 4) -> list[dict]:
    from transformers import Qwen2ForCausalLM

    with tempfile.TemporaryDirectory() as d:
        target = Qwen2ForCausalLM.from_pretrained(make_tiny_qwen2(d, embed_scale=embed_scale),
                                                  dtype=torch.bfloat16).eval()
    draft = copy.deepcopy(target)
    for mod in draft.model.modules():  # decoder linears only: embeddings and lm_head are shared, not quantized
        if isinstance(mod, torch.nn.Linear):
            mod.weight.data = dequantize_rtn(*quantize_rtn(mod.weight.data))
    torch.manual_seed(0)
    ctx = torch.tensor([PROMPT] * contexts)
    for _ in range(positions):
        p = torch.softmax(target(ctx).logits[:, -1].float(), -1)
        ctx = torch.cat([ctx, torch.multinomial(p, 1)], 1)
    lt, ld = target(ctx).logits.float()[:, len(PROMPT) - 1:], draft(ctx).logits.float()[:, len(PROMPT) - 1:]
    rows = []
    for t in temperatures:
        p, q = torch.softmax(lt / t, -1), torch.softmax(ld / t, -1)
        rows.append({"embed_scale": embed_scale, "temperature": t,
                     "alpha": round(torch.minimum(p, q).sum(-1).mean().item(), 3),
                     "top1": round(p.max(-1).values.mean().item(), 3),
                     "top3": round(p.topk(3, -1).values.sum(-1).mean().item(), 3)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embed-scale", type=float, nargs="+", default=[30.0, 1.0])
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0, 2.0])
    args = ap.parse_args(argv)
    for s in args.embed_scale:
        for row in estimate(s, args.temperature):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
