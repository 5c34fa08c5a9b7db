"""scripts/accept_real.py's pure helpers (prompt selection, GGUF chunk staging and reassembly) and how its
cpu / gpu flags reach the engines (stub engines, no model, no GPU)."""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from er_sglang.data import Example
from er_sglang.engine import Rollout, SpecStats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import accept_real
import model_stage


def _examples(lengths: list[int]) -> list[Example]:
    return [Example(f"math/test/{i}", "x" * n, str(i), {"level": 1}) for i, n in enumerate(lengths)]


def test_select_examples_is_deterministic_and_drops_long_questions():
    examples = _examples([10, 500, 20, 30, 401, 40, 50, 60])  # ids 1 and 4 are over 400 chars
    first = [ex.id for ex in accept_real.select_examples(examples, 4, seed=0, max_chars=400)]
    again = [ex.id for ex in accept_real.select_examples(_examples([10, 500, 20, 30, 401, 40, 50, 60]), 4,
                                                         seed=0, max_chars=400)]
    other = [ex.id for ex in accept_real.select_examples(examples, 4, seed=1, max_chars=400)]
    assert first == again and len(set(first)) == 4
    assert not {"math/test/1", "math/test/4"} & set(first)
    assert first != other  # 6 eligible, 360 ordered draws: seeds 0 and 1 differ
    all_six = accept_real.select_examples(examples, 6, seed=0, max_chars=400)
    assert sorted(ex.id for ex in all_six) == [f"math/test/{i}" for i in (0, 2, 3, 5, 6, 7)]
    with pytest.raises(ValueError, match="--n 7: only 6 questions have <= 400 characters"):
        accept_real.select_examples(examples, 7, seed=0, max_chars=400)


def _staged(tmp_path: Path, chunk_bytes: int = 300):
    """1000 random bytes in two source parts (600 + 400), staged in chunks of 300."""
    data = random.Random(0).randbytes(1000)
    parts = [tmp_path / "part01.bin", tmp_path / "part02.bin"]
    parts[0].write_bytes(data[:600])
    parts[1].write_bytes(data[600:])
    stage = tmp_path / "stage"
    manifest = {"alias": "fake", **model_stage.split_chunks(parts, stage, chunk_bytes)}
    return data, stage, manifest


def test_split_chunks_then_join_round_trips(tmp_path):
    data, stage, manifest = _staged(tmp_path)
    assert [c["name"] for c in manifest["chunks"]] == ["c00", "c01", "c02", "c03"]
    assert [c["bytes"] for c in manifest["chunks"]] == [300, 300, 300, 100]  # c01 spans both source parts
    assert manifest["bytes"] == 1000 and manifest["sha256"] == hashlib.sha256(data).hexdigest()
    for i, chunk in enumerate(manifest["chunks"]):
        assert (stage / chunk["name"] / "part").read_bytes() == data[300 * i:300 * (i + 1)]
        assert chunk["sha256"] == hashlib.sha256(data[300 * i:300 * (i + 1)]).hexdigest()
    out = model_stage.join_chunks(stage, manifest, tmp_path / "joined.gguf")
    assert out.read_bytes() == data


def test_join_chunks_names_the_corrupt_or_missing_chunk(tmp_path):
    _, stage, manifest = _staged(tmp_path)
    part = stage / "c02" / "part"
    head, *rest = part.read_bytes()
    part.write_bytes(bytes([head ^ 0xFF, *rest]))  # same size, first byte flipped
    with pytest.raises(ValueError, match=r"^chunk c02 \(.*c02/part\): 300 bytes, sha256 .* manifest says 300"):
        model_stage.join_chunks(stage, manifest, tmp_path / "joined.gguf")
    (stage / "c01" / "part").unlink()
    with pytest.raises(ValueError, match=r"^chunk c01 missing: .*c01/part \(stage it with a device call "
                                         r"carrying \.stage/c01\)"):
        model_stage.join_chunks(stage, manifest, tmp_path / "joined.gguf")


def test_join_chunks_checks_the_whole_file_sha256(tmp_path):
    _, stage, manifest = _staged(tmp_path)
    fake = dict(manifest, sha256="0" * 64)  # every chunk right, the manifest's total wrong
    with pytest.raises(ValueError, match=r"^assembled file sha256 [0-9a-f]{64} != manifest 0{64}$"):
        model_stage.join_chunks(stage, fake, tmp_path / "joined.gguf")


def test_split_chunks_exact_multiple_has_no_empty_chunk(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(random.Random(1).randbytes(600))
    manifest = model_stage.split_chunks([src], tmp_path / "stage", 300)
    assert [c["bytes"] for c in manifest["chunks"]] == [300, 300]


def test_read_prompts_rejects_another_model(tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"model": "qwen2.5-coder-0.5b-instruct", "gguf_sha256": "ab" * 32,
                                   "stop_token_ids": [7], "prompts": [{"id": "math/test/1", "ids": [1, 2]}]}))
    converted = tmp_path / "q05"  # a staged-and-assembled dir names its GGUF in er_source.json
    converted.mkdir()
    (converted / "er_source.json").write_text(json.dumps({"gguf_sha256": "ab" * 32}))
    assert accept_real.read_prompts(str(prompts), "qwen2.5-coder-0.5b-instruct")["stop_token_ids"] == [7]
    assert len(accept_real.read_prompts(str(prompts), str(converted))["prompts"]) == 1
    with pytest.raises(ValueError, match=r"^--model smollm2-135m-instruct: .*p.json was tokenized for "
                                         r"qwen2.5-coder-0.5b-instruct \(GGUF sha256 abababababab..\)$"):
        accept_real.read_prompts(str(prompts), "smollm2-135m-instruct")
    (converted / "er_source.json").write_text(json.dumps({"gguf_sha256": "cd" * 32}))
    with pytest.raises(ValueError, match="was tokenized for qwen2.5-coder-0.5b-instruct"):
        accept_real.read_prompts(str(prompts), str(converted))


def test_draft_grid_names_the_grid_each_engine_quantizes_to():
    assert accept_real.draft_grid("auto", "sglang") == "int_zero"  # the GPU default: Marlin
    assert accept_real.draft_grid("auto", "reference") == "float_zero"  # the CPU default: torchao's grid
    assert accept_real.draft_grid("marlin", "reference") == "int_zero"
    assert accept_real.draft_grid("gemlite", "sglang") == "int_zero"
    assert accept_real.draft_grid("tinygemm", "sglang") == "float_zero"


def test_cpu_and_gpu_take_a_draft_kernel():
    p = accept_real._parser()
    assert p.parse_args(["cpu", "--model", "m", "--prompts", "p", "--json", "j"]).draft_kernel == "auto"
    assert p.parse_args(["gpu", "--model", "m", "--prompts", "p", "--json", "j"]).draft_kernel == "marlin"
    with pytest.raises(SystemExit):
        p.parse_args(["gpu", "--model", "m", "--prompts", "p", "--json", "j", "--draft-kernel", "auto4"])


def test_variant_names_kernel_vocab_and_head_as_each_engine_runs_them():
    assert accept_real.variant("marlin", "sglang", 32768, "int4") == "marlin+vocab=32768+head=int4"
    assert accept_real.variant("marlin", "reference", 32768, "int4") == "marlin+vocab=32768+head=int4"  # same run
    assert accept_real.variant("auto", "reference", 0, "shared") == "tinygemm+vocab=full+head=shared"
    assert accept_real.variant("auto", "sglang", 0, "int8") == "marlin+vocab=full+head=int8"
    # soft counts change the subset, so they are named; without a subset they change nothing
    assert accept_real.variant("marlin", "reference", 4096, "shared", "soft") == "marlin+vocab=4096+head=shared+counts=soft"
    assert accept_real.variant("marlin", "reference", 0, "shared", "soft") == "marlin+vocab=full+head=shared"


def test_parser_cpu_and_gpu_take_draft_vocab_and_draft_head():
    p = accept_real._parser()
    base = ["--model", "m", "--prompts", "p", "--json", "j"]
    for cmd in ("cpu", "gpu"):
        args = p.parse_args([cmd, *base])
        assert (args.draft_vocab, args.draft_head) == (0, "shared")
        args = p.parse_args([cmd, *base, "--draft-vocab", "32768", "--draft-head", "int4"])
        assert (args.draft_vocab, args.draft_head) == (32768, "int4")
        with pytest.raises(SystemExit):
            p.parse_args([cmd, *base, "--draft-head", "int2"])
    assert p.parse_args(["cpu", *base]).draft_vocab_counts == "tokens"  # the GPU's only kind: comparable
    assert p.parse_args(["cpu", *base, "--draft-vocab-counts", "soft"]).draft_vocab_counts == "soft"
    with pytest.raises(SystemExit):  # the SGLang worker counts tokens only
        p.parse_args(["gpu", *base, "--draft-vocab-counts", "soft"])


class _Stub:
    """Either engine: records what it was started with, returns one rollout (6 drafted, 3 accepted, 2 steps)."""

    started: ClassVar[dict] = {}

    def __init__(self, *args):
        _Stub.started = {"args": args}
        self.drafter = SimpleNamespace(backend="rtn")

    @classmethod
    def from_config(cls, cfg, progress=False):
        return cls(cfg)

    def generate(self, prompts, params):
        return [Rollout(0, prompts[0], [7, 8, 9, 2, 4], [0.0] * 5, "stop", num_drafted=6, num_accepted=3,
                        num_verify_steps=2)]

    def stats(self, reset=False):
        return SpecStats(num_steps=2, num_spec_steps=2, num_drafted=6, num_accepted=3, num_emitted=5,
                         num_seq_steps=2, accept_len_hist={1: 1, 2: 1}, gamma_hist={3: 2})

    def rpc(self, op, **kwargs):
        return {}

    def shutdown(self):
        pass


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"model": "m", "stop_token_ids": [2, 9], "prompts": [{"id": "a", "ids": [1, 2]}]}))
    return path


def test_cmd_gpu_passes_draft_vocab_and_head_to_the_worker_and_records_them(tmp_path, monkeypatch):
    import torch

    import er_sglang.models
    import er_sglang.sglang.engine

    monkeypatch.setattr(er_sglang.sglang.engine, "SGLangEngine", _Stub)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "stub GPU")
    monkeypatch.setattr(er_sglang.models, "load_tokenizer", lambda path: SimpleNamespace(all_special_ids=[5, 2]))
    out = tmp_path / "gpu.json"
    argv = ["gpu", "--model", "m", "--prompts", str(_prompt_file(tmp_path)), "--json", str(out),
            "--draft-vocab", "32768", "--draft-head", "int4"]
    assert accept_real.main(argv) == 0
    path, spec, _ = _Stub.started["args"]
    assert path == "m"
    assert (spec["draft_vocab"], spec["draft_head"], spec["draft_kernel"]) == (32768, "int4", "marlin")
    assert spec["draft_vocab_always"] == [2, 5, 9]  # stops [2, 9] | special ids [5, 2]
    rec = json.loads(out.read_text())
    assert (rec["draft_vocab"], rec["draft_head"], rec["draft_vocab_counts"]) == (32768, "int4", "tokens")
    assert rec["variant"] == "marlin+vocab=32768+head=int4"
    assert (rec["accept_rate"], rec["mean_accept_len"]) == (0.5, 2.5)  # 3 / 6; 5 emitted / 2 sequence-steps
    assert accept_real.main(argv[:-4]) == 0  # no subset: nothing drafted always, no tokenizer needed
    assert "draft_vocab_always" not in _Stub.started["args"][1]


def test_cmd_cpu_passes_draft_vocab_head_and_counts_to_the_spec_and_records_them(tmp_path, monkeypatch):
    import er_sglang.reference

    monkeypatch.setattr(er_sglang.reference, "ReferenceEngine", _Stub)
    out = tmp_path / "cpu.json"
    argv = ["cpu", "--model", "m", "--prompts", str(_prompt_file(tmp_path)), "--json", str(out),
            "--draft-kernel", "marlin", "--draft-vocab", "32768", "--draft-head", "int4"]
    assert accept_real.main(argv) == 0
    spec = _Stub.started["args"][0].spec
    assert (spec.draft_vocab, spec.draft_head, spec.draft_vocab_counts, spec.draft_kernel) == (
        32768, "int4", "tokens", "marlin")
    rec = json.loads(out.read_text())
    assert rec["variant"] == "marlin+vocab=32768+head=int4"  # the GPU run's variant: comparable
    assert accept_real.main([*argv, "--draft-vocab-counts", "soft"]) == 0
    assert _Stub.started["args"][0].spec.draft_vocab_counts == "soft"
    rec = json.loads(out.read_text())
    assert (rec["draft_vocab_counts"], rec["variant"]) == ("soft", "marlin+vocab=32768+head=int4+counts=soft")


def test_staged_tokenizer_round_trips_and_names_a_corrupt_file(tmp_path):
    src, stage, out = tmp_path / "ckpt", tmp_path / "stage", tmp_path / "out"
    src.mkdir(), out.mkdir()
    payload = {name: (name * 4000).encode() for name in model_stage.TOKENIZER_FILES}
    for name, data in payload.items():
        (src / name).write_bytes(data)
    info = model_stage.stage_tokenizer(src, stage / "c07")
    assert info["chunk"] == "c07" and set(info["files"]) == set(payload)
    assert sum(f.stat().st_size for f in (stage / "c07" / "tokenizer").iterdir()) < sum(map(len, payload.values())) / 10
    model_stage.restore_tokenizer(stage, info, out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == payload
    with gzip.open(stage / "c07" / "tokenizer" / "tokenizer.json.gz", "wb") as f:
        f.write(b"not the tokenizer")
    with pytest.raises(ValueError, match="tokenizer file tokenizer.json .*sha256 differs"):
        model_stage.restore_tokenizer(stage, info, out)
    (stage / "c07" / "tokenizer" / "chat_template.jinja.gz").unlink()
    info["files"].pop("tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer file chat_template.jinja missing"):
        model_stage.restore_tokenizer(stage, info, out)
