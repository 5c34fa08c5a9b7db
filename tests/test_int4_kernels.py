"""spec.draft_kernel on CPU: the key (config, engine spec, env), the kernel registry, tinygemm end to end through
torch's CPU int4 op (pack, apply in draft_mode, in-place requant, bitwise check, SelfDrafter), gemlite's packed
layout by hand (and against gemlite's own packer where gemlite is installed), its capture guard, bench_step's
variant field and table. The CUDA kernels themselves: tests/gpu/test_int4_kernels.py."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types

import pytest
import torch

from er_sglang.config import DRAFT_KERNELS, ConfigError, RolloutJob, SpecConfig, load_config
from er_sglang.int4_linear import TorchaoInt4Linear
from er_sglang.int4_linear import dequantize_rtn as tg_dequantize
from er_sglang.int4_linear import quantize_rtn as tg_quantize
from er_sglang.sglang import int4_kernels as ik
from er_sglang.sglang import marlin_int4 as mi
from er_sglang.sglang.gamma import SPEC_ENV
from er_sglang.sglang.selfdraft import SelfDrafter
from scripts import bench_step
from tests.tiny import one_thread  # noqa: F401 - autouse: one torch thread per test

CPU_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
needs_cpu_int4 = pytest.mark.skipif(not CPU_INT4, reason="no CPU int4pack ops in this torch")




class _Dense:
    def apply(self, layer, x, bias=None):
        return x @ layer.weight.t()


def _layer(n=64, k=256, seed=0):
    lay = torch.nn.Module()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    lay.weight = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
    lay.quant_method = _Dense()
    return lay


def _rel(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


# ---- the key ------------------------------------------------------------------------------------------------

def test_draft_kernel_names_agree_across_config_module_and_bench():
    assert DRAFT_KERNELS == ik.KERNELS == bench_step.KERNELS == ("marlin", "tinygemm", "gemlite")


def test_spec_draft_kernel_default_override_and_one_line_error():
    assert SpecConfig().draft_kernel == "auto"
    assert load_config(RolloutJob, ["spec.draft_kernel=gemlite"]).spec.draft_kernel == "gemlite"
    with pytest.raises(ConfigError) as exc:
        load_config(RolloutJob, ["spec.draft_kernel=tinygem"])
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("spec.draft_kernel: expected one of ('marlin', 'tinygemm', 'gemlite')")
    assert "did you mean 'tinygemm'?" in msg


def test_get_kernel_refuses_unknown_name_naming_the_key():
    assert ik.get_kernel("tinygemm").packed == ("qweight", "scales_zeros")
    with pytest.raises(ValueError, match=r"spec.draft_kernel: expected one of \('marlin', 'tinygemm', 'gemlite'\)"):
        ik.get_kernel("exllama")


def test_kernel_from_env_reads_the_spec_json(monkeypatch):
    monkeypatch.delenv(SPEC_ENV, raising=False)
    assert ik.kernel_from_env() == "marlin" and SelfDrafter(model=None).kernel.name == "marlin"
    monkeypatch.setenv(SPEC_ENV, json.dumps({"mode": "rtn"}))  # a spec from before the key existed
    assert ik.kernel_from_env() == "marlin"
    monkeypatch.setenv(SPEC_ENV, json.dumps({"mode": "rtn", "draft_kernel": "gemlite"}))
    assert SelfDrafter(model=None).kernel.name == "gemlite"
    assert SelfDrafter(model=None, kernel="tinygemm").kernel.name == "tinygemm"  # an explicit choice wins


def test_sglang_engine_from_config_passes_draft_kernel_to_the_scheduler(monkeypatch):
    from er_sglang.sglang import engine as sgl_engine
    from er_sglang.sglang.engine import SGLangEngine

    monkeypatch.delenv(SPEC_ENV, raising=False)
    monkeypatch.setattr(sgl_engine, "check_server_args", lambda args: None)  # no SGLang on CPU
    monkeypatch.setattr(SGLangEngine, "_start", staticmethod(lambda kwargs: object()))
    monkeypatch.setattr(SGLangEngine, "warmup", lambda self, *a, **kw: 0.0)  # it decodes through the scheduler
    cfg = {"model": {"path": "/models/x", "dtype": "bfloat16"}, "spec": {"mode": "rtn", "gamma": 3}}
    assert SGLangEngine.from_config(cfg).spec["draft_kernel"] == "marlin"
    cfg["spec"]["draft_kernel"] = "tinygemm"
    eng = SGLangEngine.from_config(cfg)
    assert eng.spec["draft_kernel"] == "tinygemm"
    assert json.loads(os.environ[SPEC_ENV])["draft_kernel"] == "tinygemm"  # what the worker's spec_from_env reads


# ---- tinygemm through torch's CPU int4 op -------------------------------------------------------------------

def test_tinygemm_nibbles_even_column_high_by_hand():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    assert ik.tinygemm_nibbles(codes).tolist() == [[0x12, 0x34], [0xF0, 0x0F]]


def test_tinygemm_qparams_layout_by_hand():
    scale = torch.tensor([[0.5, 0.25], [1.0, 2.0]])  # [N=2, G=2]
    zero = torch.tensor([[3.0, -1.0], [0.125, 4.0]])
    sz = ik.tinygemm_qparams(scale, zero)
    assert sz.shape == (2, 2, 2) and sz.dtype == torch.bfloat16 and sz.is_contiguous()
    assert sz[1, 0].tolist() == [0.25, -1.0] and sz[0, 1].tolist() == [1.0, 0.125]  # [group, row] = (s, zero)


@needs_cpu_int4
def test_tinygemm_twin_runs_in_draft_mode_and_equals_the_cpu_drafters_weights():
    lay = _layer()
    kern = ik.get_kernel("tinygemm")
    nbytes = ik.attach(lay, kern)
    assert nbytes == 64 * 256 // 2 + 64 * 2 * 2 * 2  # codes + (scale, zero) bf16 per row and group
    assert isinstance(lay.quant_method, mi.SelfDraftMethod) and lay.quant_method.int4_apply is ik.tinygemm_apply
    x = torch.randn(2, 3, 256).to(torch.bfloat16)  # [..., K]: leading dims kept
    bias = torch.randn(64).to(torch.bfloat16)
    w_hat = tg_dequantize(*tg_quantize(lay.weight, 128))  # the CPU reference drafter's int4 weight
    assert torch.equal(kern.dequant(lay.weight, 128), w_hat)
    with mi.draft_mode():
        y = lay.quant_method.apply(lay, x)
        yb = lay.quant_method.apply(lay, x, bias)
        eye = lay.quant_method.apply(lay, torch.eye(256, dtype=torch.bfloat16))  # [K, N] = w_kernel^T
    assert y.shape == (2, 3, 64) and _rel(y, x.float() @ w_hat.t()) < 1e-2
    assert torch.equal(yb, y + bias)
    assert torch.allclose(eye.t().float(), w_hat, rtol=2**-8, atol=0)  # bf16 rounding of w_hat only
    # bit for bit the reference engine's own draft linear (drafter backend torchao on CPU)
    assert torch.equal(eye.t().float(), TorchaoInt4Linear(lay.weight, None, 128).dequantize())
    assert torch.equal(lay.quant_method.apply(lay, x), x @ lay.weight.t())  # outside draft_mode: the target


@needs_cpu_int4
def test_tinygemm_requant_in_place_then_check_is_bitwise():
    lay = _layer()
    kern = ik.get_kernel("tinygemm")
    ik.attach(lay, kern)
    ptrs = {n: lay.er_int4[n].data_ptr() for n in kern.packed}
    old = {n: lay.er_int4[n].clone() for n in kern.packed}
    assert ik.is_fresh(lay, kern)
    lay.weight.data.copy_(_layer(seed=1).weight)  # a weight sync: the twin is now stale
    assert not ik.is_fresh(lay, kern)
    ik.requant_(lay, lay.weight.data, kern)
    assert ik.is_fresh(lay, kern)
    for n in kern.packed:
        assert lay.er_int4[n].data_ptr() == ptrs[n] and not torch.equal(lay.er_int4[n], old[n])


@needs_cpu_int4
def test_self_drafter_requantize_check_and_warmup_with_tinygemm():
    d = SelfDrafter(model=None, kernel="tinygemm")
    lays = [_layer(64, 256, 0), _layer(128, 256, 1), _layer(64, 256, 2)]
    for i, lay in enumerate(lays):
        d.int4_bytes += ik.attach(lay, d.kernel)
        d.linears.append((f"l{i}", lay))
    assert d.check() == {"num_linears": 3, "num_equal": 3, "all_equal": True, "is_stale": False}
    lays[1].weight.data.mul_(2)
    d.mark_stale()
    assert d.check()["num_equal"] == 2
    d.refresh_if_stale()
    assert d.check()["all_equal"] and d.num_requant == 1 and not d.is_stale
    assert d.warmup([1, 3]) == 2 * 2  # two distinct (N, K) shapes x two batch sizes


def test_install_draft_method_wraps_once_and_swaps_the_int4_gemm():
    lay = _layer()
    target = lay.quant_method
    mi.install_draft_method(lay, ik.tinygemm_apply)
    mi.install_draft_method(lay, ik.gemlite_apply)
    assert lay.quant_method.target_method is target and lay.quant_method.int4_apply is ik.gemlite_apply
    assert mi.SelfDraftMethod(target).int4_apply is mi._marlin_apply  # Marlin unless told otherwise


# ---- gemlite ------------------------------------------------------------------------------------------------

def test_gemlite_tensors_layout_by_hand():
    q = torch.randint(0, 16, (3, 256), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    s = torch.rand(3, 2).to(torch.bfloat16)
    z = torch.randint(0, 16, (3, 2), dtype=torch.uint8)
    t = ik.gemlite_tensors(q, s, z)
    assert t["W_q"].shape == (32, 3) and t["W_q"].dtype == torch.int32
    word = int(t["W_q"][5, 2]) & 0xFFFFFFFF  # nibble i of word [j, n] holds q[n, 8 j + i], low nibble first
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == q[2, 40:48].tolist()
    assert torch.equal(t["scales"], s.t()) and t["scales"].is_contiguous()
    assert t["zeros"].dtype == torch.bfloat16 and t["zeros"].float().t().tolist() == z.float().tolist()


def _gemlite_bitpack():
    """gemlite's bitpack module without its package __init__ (which needs a GPU); None where gemlite is absent."""
    spec = importlib.util.find_spec("gemlite")
    if spec is None or not spec.submodule_search_locations:
        return None
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "gemlite" or k.startswith("gemlite.")}
    pkg = types.ModuleType("gemlite")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["gemlite"] = pkg
    try:
        return importlib.import_module("gemlite.bitpack")
    except Exception:  # noqa: BLE001 - no triton here: nothing to compare against
        return None
    finally:
        for k in [k for k in sys.modules if k == "gemlite" or k.startswith("gemlite.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_gemlite_w_q_equals_gemlites_own_packer():
    bp = _gemlite_bitpack()
    if bp is None:
        pytest.skip("gemlite not installed (the device kit has it; tests/gpu compare GemLiteLinear.pack)")
    q = torch.randint(0, 16, (16, 256), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    theirs, per_word = bp.pack_weights_over_cols_torch(q, W_nbits=4, packing_bitwidth=32, transpose=True)
    s, z = torch.ones(16, 2), torch.zeros(16, 2)
    assert per_word == 8 and torch.equal(ik.gemlite_tensors(q, s, z)["W_q"], theirs.contiguous())


def test_gemlite_apply_refuses_an_unwarmed_shape_inside_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="M=3, N=64, K=128 never ran eagerly"):
        ik.gemlite_apply({"n": 64, "k": 128}, torch.zeros(3, 128, dtype=torch.bfloat16), None)


# ---- bench_step: --draft-kernel, the variant field, the table ------------------------------------------------

SPECS: list[dict] = []  # what bench_step handed the (fake) engine


class _FakeEngine:
    def __init__(self, model, spec, sglang_args):
        SPECS.append(spec)
        self.engine = types.SimpleNamespace(get_server_info=lambda: {"max_total_num_tokens": 10**7})
        self.gamma = 0

    def rpc(self, op, **kw):
        if op == "set_gamma":
            self.gamma = kw["gamma"]
        timing = [{"kind": k, "gamma": self.gamma, "batch": 1, "ms": ms, "n": 4}
                  for k, ms in (("step", 2.0), ("draft", 3.0 * self.gamma), ("verify", 1.5), ("decode", 1.0))]
        return {"requant_s": 0.1, "int4_bytes": 1, "num_int4_linears": 1, "graphs": {}, "graph_init_s": 0.0,
                "timing": timing, "gamma_hist": {}, "num_steps": 4, "num_emitted": 8, "num_seq_steps": 4}

    def generate(self, *a, **kw):
        return None

    def shutdown(self):
        pass


def test_bench_step_records_name_their_variant_and_table_gives_r_plain(tmp_path, monkeypatch, capsys):
    from er_sglang.sglang import engine as sgl_engine

    monkeypatch.setattr(sgl_engine, "SGLangEngine", _FakeEngine)
    out = tmp_path / "tg.json"
    argv = ["run", "--json", str(out), "--seqs", "512", "--batches", "1", "--gammas", "0,3", "--parts", "sd",
            "--draft-kernel", "tinygemm", "--limit-s", "60"]
    parsed = {}
    monkeypatch.setattr(bench_step, "cmd_run", lambda args: parsed.setdefault("args", args))
    bench_step.main(argv)
    b = bench_step.Bench(parsed["args"])
    b.run_sd()
    b.save()
    assert SPECS[-1]["draft_kernel"] == "tinygemm"
    doc = json.loads(out.read_text())
    assert doc["variant"] == "tinygemm" and doc["meta"]["sd"]["tinygemm"]["draft_kernel"] == "tinygemm"
    assert [r["variant"] for r in doc["records"]] == ["tinygemm", "tinygemm"]
    for r in doc["records"]:
        r["ms_per_step_wall"] = 2.2  # the fake engine takes no time: give the wall clock a value
    out.write_text(json.dumps(doc))
    ar = tmp_path / "ar.json"  # an AR record from another run, and an SD record from before `variant` existed
    ar.write_text(json.dumps({"records": [
        {"mode": "ar", "variant": "ar", "gamma": 0, "batch": 1, "seq": 512, "ms_per_step": 2.0},
        {"mode": "sd", "gamma": 3, "batch": 1, "seq": 512, "ms_per_step": 4.0, "t_draft_step_ms": 1.4,
         "t_verify_ms": 2.5, "t_decode_ms": None}]}))
    capsys.readouterr()
    bench_step.main(["table", "--json", str(out), str(ar)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 512 ")]
    # tinygemm gamma 3: wall 2.2 vs AR 2.0 = 1.1 (events 2.0 not compared); draft step = 9 ms / 3 = 3.0; r vs AR
    # 2.0 = 1.5; r_plain vs its gamma-0 decode 1.0 = 3.0
    assert "| 512 | 1 | tinygemm | 3 | 2.200 | 2.000 | 2.000 | 1.100 | 3.000 | 1.500 | 3.000 | 1.500 | 0.750 |" in rows
    assert any(row.startswith("| 512 | 1 | marlin | 3 |") for row in rows)  # variant-less records ran Marlin


class _OomAboveBs16(_FakeEngine):
    def __init__(self, model, spec, sglang_args):
        if spec.get("bs_max", 0) > 16:
            raise RuntimeError("CUDA out of memory capturing the verify graphs\nTried to allocate 2.00 GiB")
        super().__init__(model, spec, sglang_args)


def in_process_child(args, part, budget_s, bs_max, variant=None):
    """bench_step._child without the process: main(child_argv) here; an exception = a dead child (exit 1)."""
    path = bench_step.child_json(args, part, variant)
    if os.path.exists(path):
        os.remove(path)
    try:
        bench_step.main(bench_step.child_argv(args, part, budget_s, bs_max, variant))
        rc = 0
    except Exception:  # noqa: BLE001 - what a killed child process looks like to the parent
        rc = 1
    if not os.path.exists(path):
        return rc, {}
    with open(path) as f:
        return rc, json.load(f)


@pytest.fixture
def fake_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "fake")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench_step, "calibration_meta", lambda model, f_eff=True: {"f_eff": {"F": 1.0}} if f_eff else {})
    monkeypatch.setattr(bench_step, "_child", in_process_child)


def test_bench_step_runs_ar_first_and_retries_an_sd_start_failure_at_b16(tmp_path, monkeypatch, fake_gpu):
    """A device call is scarce: AR (the baseline) runs first; an SD engine that cannot start with graph states
    for every B retries with states up to B = 16, pinning gamma > 0 only there."""
    from er_sglang.sglang import engine as sgl_engine

    monkeypatch.setattr(sgl_engine, "SGLangEngine", _OomAboveBs16)
    out = tmp_path / "b.json"
    SPECS.clear()
    bench_step.main(["run", "--json", str(out), "--seqs", "512", "--batches", "1,32", "--gammas", "0,3",
                     "--limit-s", "600"])
    doc = json.loads(out.read_text())
    assert [s["mode"] for s in SPECS] == ["no-sd", "argmax"] and SPECS[1]["bs_max"] == 16
    assert doc["meta"]["sd_start_error"] == {"marlin": {"bs_max": 32, "exit": 1}}
    assert doc["meta"]["sd"]["marlin"]["bs_max"] == 16
    assert doc["meta"]["f_eff"] == {"F": 1.0} and doc["device"] == "fake"  # measured by the AR child only
    assert [(r["mode"], r["batch"], r["gamma"]) for r in doc["records"]] == [
        ("ar", 1, 0), ("ar", 32, 0), ("sd", 1, 0), ("sd", 1, 3), ("sd", 32, 0)]
    assert "sd_error" not in doc["meta"]


def test_bench_step_sd_dying_mid_run_keeps_both_parts_records_and_exits_nonzero(tmp_path, monkeypatch, fake_gpu):
    from er_sglang.sglang import engine as sgl_engine

    monkeypatch.setattr(sgl_engine, "SGLangEngine", _FakeEngine)

    def dies_after_one_record(self):
        self.out["records"].append({"mode": "sd", "gamma": 0, "batch": 1, "seq": 512})
        self.save()
        raise RuntimeError("scheduler died")

    monkeypatch.setattr(bench_step.Bench, "run_sd", dies_after_one_record)
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit, match="part\\(s\\) sd\\[marlin\\] failed"):
        bench_step.main(["run", "--json", str(out), "--seqs", "512", "--batches", "1,32", "--gammas", "0,3"])
    doc = json.loads(out.read_text())
    assert doc["meta"]["sd_error"]["marlin"].startswith("child exited 1") and "sd_start_error" not in doc["meta"]
    assert [r["mode"] for r in doc["records"]] == ["ar", "ar", "sd"]  # no retry: the SD engine had started


def test_bench_step_child_process_runs_and_its_failure_is_recorded(tmp_path, capfd):
    """The real child (a subprocess: the argv round trip, the process group) on a machine without CUDA: it
    fails at its first CUDA call, and the parent records that and exits non-zero instead of dying with it."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the failure path, which needs a machine without CUDA")
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit, match="part\\(s\\) ar failed"):
        bench_step.main(["run", "--json", str(out), "--parts", "ar", "--seqs", "512", "--batches", "1",
                         "--limit-s", "60", "--no-f-eff"])
    assert json.loads(out.read_text())["meta"]["ar_error"].startswith("child exited 1")
    assert "Torch not compiled with CUDA enabled" in capfd.readouterr().err  # the child's own traceback
