"""scripts/bench_int4_gemv.py (+ _kernels.py) on CPU: shapes and bytes, the packings (AWQ / GPTQ-v1 nibble
order, tinygemm's float zero point), the draft-step sums, and a whole run with fake variants (JSON schema,
skip on error)."""
from __future__ import annotations

import json

import pytest
import torch

from er_sglang.sglang.marlin_int4 import dequantize_rtn, quantize_rtn
from scripts import bench_int4_gemv as bg
from scripts import bench_int4_gemv_kernels as bk
from tests.tiny import one_thread  # noqa: F401 - autouse: one torch thread per test

TINY = {"hidden_size": 256, "intermediate_size": 384, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": 3, "vocab_size": 512}


def test_layer_shapes_qwen7b_llama8b_and_head_dim():
    assert bg.layer_shapes(bg.QWEN7B) == {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584),
                                          "down": (3584, 18944), "lm_head": (152064, 3584)}
    llama = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256}
    assert bg.layer_shapes(llama)["qkv"] == (6144, 4096)
    # explicit head_dim (Qwen3-4B: 32 heads x 128 = 4096 != hidden 2560): o reads K = 4096
    qwen3 = {"hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936}
    assert bg.layer_shapes({"text_config": qwen3})["qkv"] == (6144, 2560)
    assert bg.layer_shapes(qwen3)["o"] == (2560, 4096)


def test_int4_bytes_by_hand():
    # qkv: 4608*3584/2 codes + 4608*28 groups * (2 B scale + 0.5 B zero)
    assert bk.int4_bytes(4608, 3584) == 8_257_536 + 258_048 + 64_512
    assert bk.int4_bytes(152064, 3584) == 272_498_688 + 10_644_480
    assert bk.int4_bytes(4608, 3584, zero_bits=16) == 8_257_536 + 258_048 * 2  # tinygemm: bf16 zero
    assert bk.tensor_bytes({"w": torch.empty(152064, 3584, dtype=torch.bfloat16), "n": 3}) == 1_089_994_752


def test_pack_cols_nibble_orders_by_hand():
    v = torch.arange(1, 9).view(1, 8)
    assert bk.pack_cols(v, bk.SEQ_ORDER).item() == 0x87654321 - 2**32
    # AWQ: nibble i holds column [0, 2, 4, 6, 1, 3, 5, 7][i] -> values 1,3,5,7,2,4,6,8 from the low nibble
    assert bk.pack_cols(v, bk.AWQ_ORDER).item() == 0x86427531 - 2**32
    assert bk.pack_cols(torch.full((2, 16), 15), bk.AWQ_ORDER).tolist() == [[-1, -1], [-1, -1]]


def test_awq_and_gptq_layouts_read_int4_bytes():
    q, s, z = quantize_rtn(torch.randn(256, 512) * 0.02)
    awq = {"qweight": bk.pack_cols(q.t().contiguous(), bk.AWQ_ORDER), "scales": s.t().contiguous(),
           "qzeros": bk.pack_cols(z.t().contiguous(), bk.AWQ_ORDER)}
    assert awq["qweight"].shape == (512, 32) and awq["qzeros"].shape == (4, 32)
    assert bk.tensor_bytes(awq) == bk.int4_bytes(256, 512)


def test_tinygemm_zero_map_by_hand():
    # (q - z) * s = (q - 8) * s + (8 - z) * s: s = 0.5, z = 3 -> zf = 2.5; q = 3 -> 0, q = 15 -> 6
    sz = bk.tinygemm_scales_zeros(torch.tensor([[0.5]]), torch.tensor([[3]], dtype=torch.uint8))
    assert sz.shape == (1, 1, 2) and sz.dtype == torch.bfloat16 and sz[0, 0].tolist() == [0.5, 2.5]
    q = torch.tensor([[3, 15] + [8] * 126], dtype=torch.uint8)
    assert bk.tinygemm_dequant(q, sz)[0, :3].tolist() == [0.0, 6.0, 2.5]


def test_tinygemm_zero_map_within_bf16_rounding_of_rtn():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    q, s, z = quantize_rtn(w)
    sz = bk.tinygemm_scales_zeros(s, z)
    assert sz.shape == (4, 64, 2)
    w_hat = dequantize_rtn(q, s, z).float()
    dev = (bk.tinygemm_dequant(q, sz) - w_hat).abs()
    zf = sz[..., 1].t().float().repeat_interleave(128, dim=1)  # [N, K]: each weight's float zero
    # zf = (8 - z) * s rounded to bf16 (8 significant bits): |error| <= |zf| * 2^-8, w_hat's own bf16 rounding
    assert (dev <= zf.abs() * 2**-8 + w_hat.abs() * 2**-8 + 1e-9).all()
    assert dev.max() > 0  # the rounding is real (the benchmark reports it)


def test_tinygemm_cpu_kernel_matches_rtn_end_to_end():
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("no CPU int4pack ops in this torch")
    L = bk.make_layer("o", 64, 256, "cpu")
    b = bk.build_tinygemm(L)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert bg.rel_err(b.make(b.weights)(x), x, L.w_hat) < 1e-2
    assert b.info["max_dev_over_scale"] <= 8 * 2**-8 + 1e-6  # |8 - z| <= 8 scale steps, bf16 rounding


def test_int8_rowwise_by_hand():
    w8, s = bk.int8_rowwise(torch.tensor([[0.5, -1.27, 0.0, 0.004]]))
    assert s.dtype == torch.bfloat16 and abs(s.item() - 0.01) < 1e-4
    assert w8.tolist() == [[50, -127, 0, 0]]


def _recs(variant, us_by_layer, m=1):
    return [{"variant": variant, "layer": k, "m": m, "us": v} for k, v in us_by_layer.items()]


def test_draft_step_sums_and_composites_by_hand():
    kinds = {"bf16": "bf16", "marlin": "int4", "tinygemm": "int4", "int8_torch": "int8"}
    recs = (_recs("bf16", {"qkv": 10, "o": 8, "gate_up": 40, "down": 20, "lm_head": 100})
            + _recs("marlin", {"qkv": 5, "o": 4, "gate_up": 20, "down": 10, "lm_head": 40})
            + _recs("tinygemm", {"qkv": 6, "o": 3, "gate_up": 25, "down": 9})  # no head: no own row
            + _recs("int8_torch", {"lm_head": 30})
            + [{"variant": "marlin", "layer": "qkv", "m": 2, "error": "boom"}])
    rows = {(r["m"], r["variant"]): r for r in bg.draft_step(recs, kinds, 2, [1, 2])}
    assert rows[(1, "bf16")]["linear_us"] == 2 * 78 + 100 and rows[(1, "bf16")]["ratio_to_bf16"] == 1.0
    assert rows[(1, "marlin")]["linear_us"] == 2 * 39 + 40
    assert (1, "tinygemm") not in rows and (1, "int8_torch") not in rows and (2, "bf16") not in rows
    assert rows[(1, "drafter_now")]["linear_us"] == 2 * 39 + 100  # marlin decoder, bf16 head
    best = rows[(1, "best_int4")]  # qkv marlin 5, o tinygemm 3, gate_up marlin 20, down tinygemm 9, head 40
    assert best["linear_us"] == 2 * 37 + 40
    assert best["parts"] == {"qkv": "marlin", "o": "tinygemm", "gate_up": "marlin", "down": "tinygemm",
                             "lm_head": "marlin"}
    assert rows[(1, "best_int4_int8head")]["linear_us"] == 2 * 37 + 30
    assert rows[(1, "best_int4_int8head")]["ratio_to_bf16"] == round(104 / 256, 4)


def _flaky(L):  # fails at M = 2 only
    def make(t):
        def fn(x):
            if x.shape[0] == 2:
                raise RuntimeError("boom at M=2\nsecond line")
            return torch.nn.functional.linear(x, t["w"])
        return fn
    return bk.Built({"w": L.w}, make, L.w)


def _no_lib(L):
    raise ImportError("No module named 'fakelib'")


def _bad_o(L):
    if L.name == "o":
        raise ValueError("shape refused")
    return bk.build_bf16(L)


REGISTRY = {"bf16": ("bf16", bk.build_bf16), "no_lib": ("int4", _no_lib), "flaky": ("int4", _flaky),
            "bad_o": ("int4", _bad_o), "tinygemm": ("int4", bk.build_tinygemm)}




def _run(tmp_path, *extra):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "res.json"
    args = bg.parse_args(["--model-config", str(cfg), "--json", str(out), "--ms", "1", "2", "--repeats", "1",
                          "--max-calls", "2", "--rotate-mb", "0.1", "--graph-mb", "0.1",
                          "--variants", *REGISTRY, *extra])
    res = bg.run_bench(args, REGISTRY)
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    return res


def test_run_bench_cpu_json_schema_and_skip_on_error(tmp_path):
    res = _run(tmp_path)
    assert set(res) == {"meta", "variants", "records", "draft_step"}
    meta = res["meta"]
    for key in ("device", "versions", "date", "cmd", "budget_s", "elapsed_s", "copy_gb_per_s", "shapes", "ms"):
        assert key in meta
    assert {"torch", "sglang", "torchao", "gemlite"} <= set(meta["versions"]) and meta["num_layers"] == 3
    assert meta["shapes"]["qkv"] == [512, 256]
    assert res["variants"]["no_lib"]["error"] == "ImportError: No module named 'fakelib'"
    recs = {(r["variant"], r["layer"], r["m"]): r for r in res["records"]}
    assert not any(v == "no_lib" for v, _, _ in recs)
    assert len(recs) == 4 * 5 * 2  # every other (variant, layer, M) is recorded, failed or not
    assert recs[("flaky", "qkv", 2)]["error"] == "RuntimeError: boom at M=2" and "us" not in recs[("flaky", "qkv", 2)]
    assert recs[("bad_o", "o", 1)]["error"] == "ValueError: shape refused"
    for key in (("flaky", "qkv", 1), ("bad_o", "down", 2), ("tinygemm", "lm_head", 2)):
        r = recs[key]
        assert r["us"] > 0 and r["bytes"] > 0 and r["gb_per_s"] >= 0 and r["max_rel_err"] < 2e-2
    assert recs[("tinygemm", "qkv", 1)]["bytes"] == bk.int4_bytes(512, 256, zero_bits=16)  # bf16 zeros
    assert recs[("bf16", "lm_head", 1)]["bytes"] == 512 * 256 * 2
    steps = {(r["m"], r["variant"]) for r in res["draft_step"]}
    assert {(1, "bf16"), (2, "bf16"), (1, "flaky"), (1, "best_int4"), (2, "best_int4")} <= steps
    assert (2, "flaky") not in steps and (1, "bad_o") not in steps and (1, "drafter_now") not in steps
    assert "max_dev_over_scale" in res["variants"]["tinygemm"]["info"]["qkv"]


def test_run_bench_budget_exhausted_records_every_point(tmp_path):
    res = _run(tmp_path, "--budget-s", "0")
    assert res["records"] and all(r["error"] == "budget" for r in res["records"])
    assert res["draft_step"] == []


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = {"meta": {"shapes": {"qkv": [512, 256]}, "ms": [1, 2], "num_layers": 3, "group_size": 128,
                    "device": "cpu", "copy_gb_per_s": 4300.0},
           "variants": {"bf16": {}}, "records": _recs("bf16", {"qkv": 3.0}) + _recs("bf16", {"qkv": 4.0}, 2),
           "draft_step": [{"m": 1, "variant": "bf16", "ratio_to_bf16": 1.0}]}
    bg.plot(res, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_run_bench_unknown_variant_is_refused_before_any_work(tmp_path):
    args = bg.parse_args(["--json", str(tmp_path / "r.json"), "--variants", "bf16", "marlinn"])
    with pytest.raises(SystemExit, match="marlinn"):
        bg.run_bench(args)
    assert not (tmp_path / "r.json").exists()
