"""Staging a model for the device (no network there): its GGUF cut into chunk folders small enough for one device
call each, the converted tokenizer gzipped into the last; `assemble` joins them, checks every sha256 and converts
to a safetensors checkpoint. The commands are accept_real.py's `stage` and `assemble` (its docstring)."""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import time
from pathlib import Path

BLOCK = 1 << 24


def _pieces(files: list[Path], chunk_bytes: int):
    """The files' concatenation as (chunk index, bytes) pieces, none crossing a chunk boundary."""
    offset = 0
    for file in files:
        with open(file, "rb") as f:
            while piece := f.read(min(BLOCK, chunk_bytes - offset % chunk_bytes)):
                yield offset // chunk_bytes, piece
                offset += len(piece)


def split_chunks(files: list[Path], stage: Path, chunk_bytes: int) -> dict:
    """Cut the concatenation of `files` into stage/c00/part, c01/part, ... of chunk_bytes each (the
    last shorter); returns {"sha256", "bytes", "chunks": [{"name", "bytes", "sha256"}]}."""
    total, chunks, digests = hashlib.sha256(), [], []
    for index, piece in _pieces(files, chunk_bytes):
        if index == len(chunks):
            chunks.append({"name": f"c{index:02d}", "bytes": 0})
            digests.append(hashlib.sha256())
            (stage / chunks[-1]["name"]).mkdir(parents=True)  # fresh: appending below starts from empty
        with open(stage / chunks[-1]["name"] / "part", "ab") as out:
            out.write(piece)
        chunks[-1]["bytes"] += len(piece)
        digests[-1].update(piece)
        total.update(piece)
    for chunk, digest in zip(chunks, digests):
        chunk["sha256"] = digest.hexdigest()
    return {"sha256": total.hexdigest(), "bytes": sum(c["bytes"] for c in chunks), "chunks": chunks}


def join_chunks(stage: Path, manifest: dict, dest: Path) -> Path:
    """Concatenate stage/<chunk>/part in manifest order into `dest`; ValueError naming the first chunk
    that is missing or whose size or sha256 differs from the manifest, or a whole-file mismatch."""
    total = hashlib.sha256()
    with open(dest, "wb") as out:
        for chunk in manifest["chunks"]:
            part = stage / chunk["name"] / "part"
            if not part.is_file():
                raise ValueError(f"chunk {chunk['name']} missing: {part} (stage it with a device call "
                                 f"carrying .stage/{chunk['name']})")
            digest, size = hashlib.sha256(), 0
            with open(part, "rb") as f:
                while block := f.read(BLOCK):
                    digest.update(block)
                    total.update(block)
                    out.write(block)
                    size += len(block)
            if size != chunk["bytes"] or digest.hexdigest() != chunk["sha256"]:
                raise ValueError(f"chunk {chunk['name']} ({part}): {size} bytes, sha256 {digest.hexdigest()[:16]}.., "
                                 f"manifest says {chunk['bytes']} bytes, {chunk['sha256'][:16]}..")
    if total.hexdigest() != manifest["sha256"]:
        raise ValueError(f"assembled file sha256 {total.hexdigest()} != manifest {manifest['sha256']}")
    return dest


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def stage_tokenizer(src: Path, chunk_dir: Path) -> dict:
    """Gzip the converted checkpoint's tokenizer files into chunk_dir/tokenizer/ (11 MiB of tokenizer.json
    becomes ~3 MiB, room the last GGUF chunk has): the device then needs no tokenizer parse of the GGUF
    (er-train and bench_rollout encode prompts with it). -> {"chunk", "files": {name: sha256 of the file}}."""
    dest = chunk_dir / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in TOKENIZER_FILES:
        data = (src / name).read_bytes()
        files[name] = hashlib.sha256(data).hexdigest()
        with gzip.open(dest / f"{name}.gz", "wb", compresslevel=9) as f:
            f.write(data)
    return {"chunk": chunk_dir.name, "files": files}


def restore_tokenizer(stage: Path, info: dict, out: Path) -> None:
    """Unzip stage_tokenizer's files into `out`; ValueError naming a file that is missing or differs."""
    for name, sha in info["files"].items():
        packed = stage / info["chunk"] / "tokenizer" / f"{name}.gz"
        if not packed.is_file():
            raise ValueError(f"tokenizer file {name} missing: {packed} (stage it with chunk {info['chunk']})")
        with gzip.open(packed, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != sha:
            raise ValueError(f"tokenizer file {name} ({packed}): sha256 differs from the manifest")
        (out / name).write_bytes(data)


def cmd_stage(args) -> None:
    from er_sglang.models import ALIASES, _locate_parts, resolve_model_path

    if args.model not in ALIASES:
        raise ValueError(f"--model {args.model!r}: not an alias ({', '.join(ALIASES)})")
    src = ALIASES[args.model]
    stage = Path(args.dir)
    for old in stage.glob("c[0-9][0-9]"):  # a previous staging's chunks must not travel by mistake
        shutil.rmtree(old)
    stage.mkdir(parents=True, exist_ok=True)
    split = split_chunks(_locate_parts(args.model, src), stage, int(args.chunk_mib * 2**20))
    if split["sha256"] != src.sha256:
        raise ValueError(f"--model {args.model}: GGUF sha256 {split['sha256']} != expected {src.sha256}")
    # the config travels in the manifest: the device then parses the GGUF's metadata once, not three times
    config = json.loads((resolve_model_path(args.model) / "config.json").read_text())
    manifest = {"alias": args.model, **split, "config": config,
                "tokenizer": stage_tokenizer(resolve_model_path(args.model), stage / split["chunks"][-1]["name"])}
    for chunk in manifest["chunks"]:  # a copy in every chunk: whichever call comes last has it
        _write_json(stage / chunk["name"] / "manifest.json", manifest)
    _write_json(stage / "manifest.json", manifest)
    print(f"staged {manifest['bytes'] / 2**20:.1f} MiB in {len(manifest['chunks'])} chunks under {stage}: "
          + " ".join(c["name"] for c in manifest["chunks"]))


def cmd_assemble(args) -> None:
    from er_sglang.models import convert_gguf

    stage, out = Path(args.stage), Path(args.out)
    manifest_file = Path(args.manifest) if args.manifest else next(iter(sorted(stage.glob("c*/manifest.json"))),
                                                                     stage / "manifest.json")
    if not manifest_file.is_file():
        raise ValueError(f"--manifest: {manifest_file} does not exist")
    manifest = json.loads(manifest_file.read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        gguf = join_chunks(stage, manifest, tmp / "model.gguf")
        join_s = time.perf_counter() - t0
        convert_gguf(gguf, tmp, args.dtype, {"alias": manifest["alias"], "gguf_sha256": manifest["sha256"],
                                             "staged_chunks": len(manifest["chunks"])},
                     config_json=manifest.get("config"), tokenizer=args.tokenizer)
        if not args.tokenizer and manifest.get("tokenizer"):
            restore_tokenizer(stage, manifest["tokenizer"], tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed run leaves nothing
    print(f"assembled {manifest['alias']} ({len(manifest['chunks'])} chunks, sha256 ok, {join_s:.1f} s), "
          f"converted to {args.dtype} at {out} in {time.perf_counter() - t0:.1f} s")


def _write_json(path, data: dict, indent: int | None = 1) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=indent) + "\n")
