"""scripts/bench_step.py on CPU with a fake engine (issue 9): --variants (parsing, AR once then one SD child per
variant, the time split, a failed variant), the draft-vocab always-ids, the progress prefix, and `table`'s r per
variant and per-step gain against scripts/accept_real.py acceptance."""
from __future__ import annotations

import argparse
import json
import types

import pytest

from scripts import bench_step
from scripts.bench_step_variant import Variant, draft_vocab_always, parse_variant, parse_variants
from tests.test_int4_kernels import SPECS, _FakeEngine, _OomAboveBs16, fake_gpu, in_process_child  # noqa: F401


def test_parse_variant_reads_kernel_vocab_and_head():
    v = parse_variant(" marlin+vocab=32768+head=int4 ")
    assert v == Variant("marlin+vocab=32768+head=int4", "marlin", 32768, "int4")
    assert v.spec() == {"draft_kernel": "marlin", "draft_vocab": 32768, "draft_head": "int4"}
    assert parse_variant("gemlite").spec() == {"draft_kernel": "gemlite", "draft_vocab": 0, "draft_head": "shared"}
    assert parse_variant("tinygemm+vocab=full+head=shared").spec() == parse_variant("tinygemm").spec()  # accept_real


@pytest.mark.parametrize("text, needle", [
    ("marlin,foo", "kernel 'foo'"), ("marlin+head=int5", "bad setting 'head=int5'"),
    ("marlin+vocab=-1", "bad setting 'vocab=-1'"), ("marlin+vocab=8+vocab=9", "bad setting 'vocab=9'"),
    ("marlin+size=3", "bad setting 'size=3'"), ("marlin,", "kernel ''"), ("marlin,marlin", "given twice")])
def test_parse_variants_one_line_error_naming_the_bad_token(text, needle):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        parse_variants(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_draft_vocab_always_empty_without_tokenizer_else_stop_and_special_ids(tmp_path, monkeypatch):
    from er_sglang import models

    (tmp_path / "config.json").write_text("{}")
    assert draft_vocab_always(str(tmp_path)) == []  # `make`'s shapes-only dir
    (tmp_path / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr(models, "load_tokenizer", lambda path: types.SimpleNamespace(all_special_ids=[5, 7]))
    monkeypatch.setattr(models, "model_info", lambda path, tok: types.SimpleNamespace(stop_token_ids=[2, 5]))
    assert draft_vocab_always(str(tmp_path)) == [2, 5, 7]


def _clocked_children(monkeypatch, used_s: list[float]) -> list[float]:
    """bench_step's clock frozen inside a child; each child then takes the next of used_s seconds. -> the
    budgets the children were given."""
    clock, budgets = {"t": 1000.0}, []
    monkeypatch.setattr(bench_step, "time", types.SimpleNamespace(time=lambda: clock["t"], perf_counter=lambda: 0.0))

    def child(args, part, budget_s, bs_max, variant=None):
        budgets.append(round(budget_s, 6))
        out = in_process_child(args, part, budget_s, bs_max, variant)
        clock["t"] += used_s[len(budgets) - 1]
        return out

    monkeypatch.setattr(bench_step, "_child", child)
    return budgets


@pytest.mark.usefixtures("fake_gpu")
def test_bench_step_variants_measure_ar_once_then_one_sd_child_each(tmp_path, monkeypatch):
    from er_sglang.sglang import engine as sgl_engine

    monkeypatch.setattr(sgl_engine, "SGLangEngine", _FakeEngine)
    # AR takes its 150 s; SD's 450 s left: 450 / 3 = 150 to the first (it ends after 50), (450 - 50) / 2 = 200
    # to the second (all of it), the 200 left to the third
    budgets = _clocked_children(monkeypatch, [150, 50, 200, 200])
    (tmp_path / "m").mkdir()
    out, names = tmp_path / "b.json", ["marlin", "gemlite+head=int4", "marlin+vocab=32768"]
    SPECS.clear()
    bench_step.main(["run", "--model", str(tmp_path / "m"), "--json", str(out), "--seqs", "512", "--batches", "1",
                     "--gammas", "0,3", "--limit-s", "600", "--variants", ",".join(names)])
    assert budgets == [150, 150, 200, 200]
    assert [(s["mode"], s.get("draft_kernel"), s.get("draft_vocab"), s.get("draft_head")) for s in SPECS] == [
        ("no-sd", None, None, None), ("argmax", "marlin", 0, "shared"), ("argmax", "gemlite", 0, "int4"),
        ("argmax", "marlin", 32768, "shared")]
    assert SPECS[3]["draft_vocab_always"] == [] and "draft_vocab_always" not in SPECS[1]  # no tokenizer in m/
    doc = json.loads(out.read_text())
    assert [(r["mode"], r["variant"], r["gamma"]) for r in doc["records"]] == [
        ("ar", "ar", 0)] + [("sd", n, g) for n in names for g in (0, 3)]
    assert doc["variants"] == names and list(doc["meta"]["sd"]) == names
    assert doc["meta"]["sd"]["gemlite+head=int4"]["variant"] == "gemlite+head=int4"
    assert doc["meta"]["sd"]["gemlite+head=int4"]["draft_head"] == "int4"


@pytest.mark.usefixtures("fake_gpu")
def test_bench_step_failed_variant_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    from er_sglang.sglang import engine as sgl_engine

    class NoInt4Head(_FakeEngine):
        def __init__(self, model, spec, sglang_args):
            if spec.get("draft_head") == "int4":
                raise RuntimeError("marlin: no kernel for this shape")
            super().__init__(model, spec, sglang_args)

    monkeypatch.setattr(sgl_engine, "SGLangEngine", NoInt4Head)
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit, match=r"part\(s\) sd\[marlin\+head=int4\] failed"):
        bench_step.main(["run", "--json", str(out), "--seqs", "512", "--batches", "1", "--gammas", "0",
                         "--limit-s", "600", "--variants", "marlin+head=int4,tinygemm"])
    doc = json.loads(out.read_text())
    assert list(doc["meta"]["sd_error"]) == ["marlin+head=int4"]
    assert doc["meta"]["sd_error"]["marlin+head=int4"].startswith("child exited 1")
    assert [(r["mode"], r["variant"]) for r in doc["records"]] == [("ar", "ar"), ("sd", "tinygemm")]
    assert "sd_start_error" not in doc["meta"]  # B <= 16: nothing to fall back to


@pytest.mark.usefixtures("fake_gpu")
def test_bench_step_later_variants_start_with_the_fallback_graph_states(tmp_path, monkeypatch):
    from er_sglang.sglang import engine as sgl_engine

    monkeypatch.setattr(sgl_engine, "SGLangEngine", _OomAboveBs16)
    out = tmp_path / "b.json"
    SPECS.clear()
    bench_step.main(["run", "--json", str(out), "--seqs", "512", "--batches", "1,32", "--gammas", "0",
                     "--limit-s", "600", "--variants", "marlin,gemlite", "--parts", "sd"])
    assert [s["bs_max"] for s in SPECS] == [16, 16]  # marlin's retry, then gemlite directly (32 never started)
    doc = json.loads(out.read_text())
    assert doc["meta"]["sd_start_error"] == {"marlin": {"bs_max": 32, "exit": 1}}
    assert {n: m["bs_max"] for n, m in doc["meta"]["sd"].items()} == {"marlin": 16, "gemlite": 16}


def test_bench_step_draft_kernel_flag_is_the_one_variant_case(monkeypatch):
    parsed = []
    monkeypatch.setattr(bench_step, "cmd_run", parsed.append)
    bench_step.main(["run", "--json", "x.json", "--draft-kernel", "tinygemm"])
    bench_step.main(["run", "--json", "x.json"])
    bench_step.main(["run", "--json", "x.json", "--draft-kernel", "tinygemm", "--variants", "gemlite"])  # both: the list wins
    assert [a.variants for a in parsed] == [[Variant("tinygemm", "tinygemm")], [Variant("marlin", "marlin")],
                                            [Variant("gemlite", "gemlite")]]


def test_bench_progress_prefix_counts_points_and_seconds(tmp_path, monkeypatch, capsys):
    """Each generate() call takes 5 s here. AR: 4 calls per point (prefill, 2 x T(1), T(33)), so point k prints at
    20k s; the third starts with exactly 20 s left (the loop stops below 20). SD, gammas 0 and 3: 1 prefill, then
    3 calls per gamma, so point 1 prints at 20 and 35 s, point 2 at 55 and 70 s."""
    from er_sglang.sglang import engine as sgl_engine

    clock = {"t": 0.0}
    monkeypatch.setattr(bench_step, "time", types.SimpleNamespace(time=lambda: clock["t"], perf_counter=lambda: 0.0))

    class Slow(_FakeEngine):
        def generate(self, *a, **kw):
            clock["t"] += 5.0

    monkeypatch.setattr(sgl_engine, "SGLangEngine", Slow)
    ns = {"model": str(tmp_path), "json": str(tmp_path / "b.json"), "backend": "flashinfer", "seqs": [512],
          "gammas": [0, 3], "points": None, "load_format": "dummy"}
    bench_step.Bench(argparse.Namespace(**ns, batches=[1, 2, 4], limit_s=60.0)).run_ar()
    clock["t"] = 0.0
    bench_step.Bench(argparse.Namespace(**ns, batches=[1, 2], limit_s=100.0)).run_sd()
    prefixes = [line.split("]")[0] + "] " + line.split("] ")[1][:2] for line in capsys.readouterr().out.splitlines()]
    assert prefixes == ["[1/3 points, 20/60 s] AR", "[2/3 points, 40/60 s] AR", "[3/3 points, 60/60 s] AR",
                        "[1/2 points, 20/100 s] SD", "[1/2 points, 35/100 s] SD",
                        "[2/2 points, 55/100 s] SD", "[2/2 points, 70/100 s] SD"]


# ---- table: r per variant, acceptance and the per-step gain ----------------------------------------------------
def _sd(variant, draft_step, verify, wall, gamma=3):
    return {"mode": "sd", "variant": variant, "gamma": gamma, "batch": 1, "seq": 512, "ms_per_step": wall,
            "ms_per_step_wall": wall, "t_draft_step_ms": draft_step, "t_verify_ms": verify, "t_decode_ms": None}


def test_table_r_per_variant_and_gain_from_accept_files(tmp_path, capsys):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"records": [
        {"mode": "ar", "variant": "ar", "gamma": 0, "batch": 1, "seq": 512, "ms_per_step": 2.0},
        _sd("marlin", 0.5, 2.5, 5.0), _sd("marlin+head=int4", 0.4, 2.5, 4.6), _sd("tinygemm", 0.6, 2.5, 5.2),
        _sd("gemlite", 0.45, 2.0, 4.0), _sd("marlin+vocab=32768+head=int4", 0.3, 2.5, 4.4)]}))
    marlin = tmp_path / "acc_marlin.json"  # Marlin's integer-zero grid: gemlite's too
    marlin.write_text(json.dumps({"engine": "reference", "draft_kernel": "marlin", "draft_grid": "int_zero",
                                  "gamma": 3, "accept_rate": 0.9, "mean_accept_len": 3.5}))
    cpu = tmp_path / "acc_cpu.json"  # written before draft_kernel existed: the CPU default, float zero (tinygemm)
    cpu.write_text(json.dumps({"engine": "reference", "gamma": 3, "accept_rate": 0.8, "mean_accept_len": 3.2}))
    soft = tmp_path / "acc_soft.json"  # a subset ranked by soft counts: no SGLang variant ranks it that way
    soft.write_text(json.dumps({"engine": "reference", "draft_kernel": "marlin", "draft_vocab": 32768,
                                "draft_head": "int4", "draft_vocab_counts": "soft", "gamma": 3, "accept_rate": 0.7,
                                "mean_accept_len": 3.0}))
    tok = tmp_path / "acc_tok.json"  # the same head, ranked by token counts as SGLang does
    tok.write_text(json.dumps({"engine": "sglang", "draft_kernel": "marlin", "draft_vocab": 32768,
                               "draft_head": "int4", "draft_vocab_counts": "tokens", "gamma": 3, "accept_rate": 0.85,
                               "mean_accept_len": 3.4}))
    bench_step.main(["table", "--json", str(run), "--accept", f"{marlin},{cpu},{soft},{tok}"])
    lines = capsys.readouterr().out.splitlines()
    # r = t_draft_step / T_AR (2.0): 0.5 -> 0.25, 0.4 -> 0.2, 0.6 -> 0.3, 0.45 -> 0.225
    names = ["marlin", "marlin+head=int4", "tinygemm", "gemlite", "marlin+vocab=32768+head=int4"]
    assert f"| S | B | gamma | {' | '.join('r ' + n for n in names)} |" in lines
    assert "| 512 | 1 | 3 | 0.250 | 0.200 | 0.300 | 0.225 | 0.150 |" in lines
    gain = [line for line in lines if line.count("|") == 11 and line.startswith("| 512 ")]
    # marlin: v = 2.5 / 2 = 1.25, G = 3.5 / (3 * 0.25 + 1.25) = 1.75; measured 3.5 * 2 / 5.0 = 1.4
    # gemlite: v = 1.0, G = 3.5 / (0.675 + 1.0) = 2.0896; measured 3.5 * 2 / 4.0 = 1.75
    # tinygemm: G = 3.2 / (0.9 + 1.25) = 1.4884; measured 3.2 * 2 / 5.2 = 1.2308
    # marlin+vocab=32768+head=int4 (token counts; not the soft file's 0.7): G = 3.4 / (0.45 + 1.25) = 2.0;
    # measured 3.4 * 2 / 4.4 = 1.5455. marlin+head=int4: no acceptance measured with that head -> no row
    assert gain == ["| 512 | 1 | gemlite | 3 | 0.900 | 3.500 | 0.225 | 1.000 | 2.090 | 1.750 |",
                    "| 512 | 1 | marlin | 3 | 0.900 | 3.500 | 0.250 | 1.250 | 1.750 | 1.400 |",
                    "| 512 | 1 | marlin+vocab=32768+head=int4 | 3 | 0.850 | 3.400 | 0.150 | 1.250 | 2.000 | 1.545 |",
                    "| 512 | 1 | tinygemm | 3 | 0.800 | 3.200 | 0.300 | 1.250 | 1.488 | 1.231 |"]


def test_table_refuses_two_accept_files_for_the_same_grid_head_and_gamma(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"records": [_sd("marlin", 0.5, 2.5, 5.0)]}))
    acc = {"engine": "sglang", "draft_kernel": "gemlite", "gamma": 3, "accept_rate": 0.9, "mean_accept_len": 3.5}
    (tmp_path / "a.json").write_text(json.dumps(acc))
    (tmp_path / "b.json").write_text(json.dumps(dict(acc, draft_kernel="marlin")))
    with pytest.raises(SystemExit, match="--accept: .*a.json and .*b.json both measured"):
        bench_step.main(["table", "--json", str(run), "--accept", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"])


@pytest.mark.usefixtures("fake_gpu")
def test_bench_step_sglang_args_reach_every_engine_through_the_children(tmp_path, monkeypatch):
    """--sglang KEY=VALUE (JSON values) goes to the AR and every SD engine alike, through child_argv, into meta."""
    from er_sglang.sglang import engine as sgl_engine

    seen = []

    class Recording(_FakeEngine):
        def __init__(self, model, spec, sglang_args):
            seen.append((spec["mode"], sglang_args["enable_torch_compile"], sglang_args["torch_compile_max_bs"],
                         sglang_args["chunked_prefill_size"]))
            super().__init__(model, spec, sglang_args)

    monkeypatch.setattr(sgl_engine, "SGLangEngine", Recording)
    monkeypatch.setattr(bench_step, "_child", in_process_child)
    out = tmp_path / "b.json"
    bench_step.main(["run", "--json", str(out), "--seqs", "512", "--batches", "1", "--gammas", "0", "--limit-s",
                     "600", "--variants", "marlin,gemlite", "--sglang", "enable_torch_compile=true",
                     "--sglang", "torch_compile_max_bs=16", "--sglang", "chunked_prefill_size=8192"])
    assert seen == [("no-sd", True, 16, 8192), ("argmax", True, 16, 8192), ("argmax", True, 16, 8192)]
    assert json.loads(out.read_text())["meta"]["sglang"] == {"enable_torch_compile": True, "torch_compile_max_bs": 16,
                                                             "chunked_prefill_size": 8192}
    for bad in ("enable_torch_compile", "attention_backend=triton"):  # not KEY=VALUE; a key the records carry
        with pytest.raises(SystemExit):  # argparse's one line
            bench_step.main(["run", "--json", str(out), "--sglang", bad])


def test_table_refuses_runs_of_different_server_args(tmp_path, capsys):
    """A torch.compile run's AR is not the eager run's: one table of both is refused in one line (exit 2)."""
    rec = {"mode": "ar", "variant": "ar", "gamma": 0, "batch": 1, "seq": 512, "ms_per_step": 5.0}
    paths = []
    for name, extra in (("eager", {}), ("compile", {"enable_torch_compile": True})):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"records": [rec], "meta": {"sglang": extra}}))
    with pytest.raises(SystemExit) as e:
        bench_step.main(["table", "--json", *map(str, paths)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "compile.json" in err and "enable_torch_compile" in err and len(err.splitlines()) == 1
    bench_step.main(["table", "--json", str(paths[0]), str(paths[0])])  # the same server args: fine
