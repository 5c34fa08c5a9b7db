"""scripts/trace_summary.py on a synthetic chrome trace: busy time, gaps, and the host work inside them."""
from __future__ import annotations

import gzip
import json

import pytest

from scripts.trace_summary import load, summarize


def _ev(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def _trace():
    # two steps of 1000 us; GPU: kernels [0,600) [550,900) (overlap) then idle until 1000; a second step
    # [1000,1500) with a 400 us gap before [1900,2000). Host: a sync inside the first gap, Python in both.
    return {"traceEvents": [
        _ev("kernel", "gemm", 0, 600), _ev("kernel", "attn", 550, 350), _ev("kernel", "gemm", 1000, 500),
        _ev("kernel", "sample", 1900, 100), _ev("gpu_memcpy", "Memcpy DtoH", 1500, 5),
        _ev("cuda_runtime", "cudaStreamSynchronize", 880, 100), _ev("cuda_runtime", "cudaGraphLaunch", 990, 8),
        _ev("python_function", "resolve_seq_lens_cpu", 870, 120),
        _ev("python_function", "init_new", 1500, 400),
        {"ph": "i", "name": "marker", "ts": 5},
    ]}


def test_busy_gaps_and_host_in_gaps():
    s = summarize(_trace(), steps=2, gap_us=50)
    assert s["span_ms_per_step"] == pytest.approx(1.0)
    assert s["gpu_busy_ms_per_step"] == pytest.approx((900 + 505 + 100) / 2 / 1e3)
    assert s["largest_gaps_us"] == [395.0, 100.0]  # 1505..1900 and 900..1000
    assert s["num_gaps_per_step"] == 1.0
    kernels = {k["name"]: k for k in s["top_kernels"]}
    assert kernels["gemm"]["us_per_step"] == 550 and kernels["gemm"]["calls_per_step"] == 1
    blocking = {b["name"]: b["us_per_step"] for b in s["blocking_runtime"]}
    assert blocking == {"cudaStreamSynchronize": 50.0}  # cudaGraphLaunch does not block
    host = {h["name"]: h["us_per_step"] for h in s["host_in_gaps"]}
    assert host["pyt:resolve_seq_lens_cpu"] == pytest.approx(90 / 2)  # 900..990 of its 870..990
    assert host["pyt:init_new"] == pytest.approx(395 / 2)


def test_small_gaps_ignored_and_no_kernels(tmp_path):
    assert summarize(_trace(), steps=2, gap_us=500)["num_gaps_per_step"] == 0
    assert "error" in summarize({"traceEvents": []})
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(), f)
    assert load(str(path)) == _trace()
