"""The GPU worker's host-side bookkeeping (no SGLang needed): per-step stats and the host profiler."""
from __future__ import annotations

from er_sglang.sglang.stats import HostProfiler, WorkerStats


def test_worker_stats_denominator_follows_each_steps_gamma():
    st = WorkerStats()
    st.observe(3, [3, 1])  # two sequences, gamma 3: 4 of 6 drafts accepted
    st.observe(0, [0, 0])  # a plain decode step drafts nothing
    st.observe(5, [9])  # counts above gamma are clamped (a finished request's padding)
    d = st.as_dict()
    assert (d["num_drafted"], d["num_accepted"]) == (3 * 2 + 5, 4 + 5)
    assert (d["num_steps"], d["num_spec_steps"]) == (3, 2)
    assert d["num_emitted"] == (4 + 2) + (0 + 2) + (5 + 1)
    assert d["gamma_hist"] == {3: 1, 0: 1, 5: 1}
    assert d["accept_len_hist"] == {3: 1, 1: 1, 5: 1}


def test_worker_stats_skip_a_step_that_served_no_sequence():
    st = WorkerStats()
    st.observe(3, [2])
    st.observe(3, [])  # the overlap scheduler's step past the last token: every request already finished
    d = st.as_dict()
    assert (d["num_steps"], d["num_spec_steps"], d["num_drafted"], d["num_emitted"]) == (1, 1, 3, 3)
    assert d["gamma_hist"] == {3: 1} and d["accept_len_hist"] == {2: 1}


def test_host_profiler_writes_stats_after_its_window(tmp_path, monkeypatch):
    out = tmp_path / "prof.txt"
    monkeypatch.setenv("ER_PROFILE_STEPS", f"1,2,{out}")
    prof = HostProfiler.from_env()
    for _ in range(3):
        prof.tick()
        sum(range(1000))
        assert not out.exists()
    prof.tick()  # step skip + count: the window closes
    assert "function calls" in out.read_text()
    monkeypatch.delenv("ER_PROFILE_STEPS")
    assert HostProfiler.from_env() is None


def test_control_draft_check_refreshes_a_draft_a_sync_marked_stale():
    """A sync marks the draft stale (re-quantized lazily, before the next decode step); a check right after the
    sync must judge the draft that step will use, not the stale one (else spec/draft_ok reports a false 0)."""
    from types import SimpleNamespace

    from er_sglang.sglang.control import handle

    class Drafter:
        is_stale = True

        def refresh_if_stale(self):
            self.is_stale = False

        def check(self):
            return {"all_equal": not self.is_stale, "num_linears": 2, "num_equal": 0 if self.is_stale else 2}

    assert handle(SimpleNamespace(drafter=Drafter()), "draft_check")["all_equal"] is True


def test_step_timer_reports_the_share_of_forwards_that_replayed_a_graph(monkeypatch):
    """CUDA events stubbed: 2 ms each; graph=None (a whole step) leaves graph_frac None."""
    import types

    from er_sglang.sglang import stats

    class Event:
        def __init__(self, enable_timing=True):
            pass

        def record(self):
            pass

        def elapsed_time(self, end):
            return 2.0

    monkeypatch.setattr(stats, "torch", types.SimpleNamespace(
        cuda=types.SimpleNamespace(Event=Event, synchronize=lambda: None)))
    timer = stats.StepTimer(True)
    for graph in (True, True, False):
        timer.stop(timer.start(), "verify", 3, 16, graph=graph)
    timer.stop(timer.start(), "step", 3, 16)
    rows = {r["kind"]: r for r in timer.summary()}
    assert rows["verify"]["graph_frac"] == 2 / 3 and rows["verify"]["n"] == 3 and rows["verify"]["ms"] == 2.0
    assert rows["step"]["graph_frac"] is None
