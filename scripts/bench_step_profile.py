"""bench_step.py's `profile`: SGLang's torch profiler over a few decode steps per point, SD at each (B, gamma) and
plain SGLang at each B, each trace summarized by scripts/trace_summary.py (where the host gaps go)."""
from __future__ import annotations

import json
import os
import time

from scripts.bench_step import ROOFLINE, Bench


class Profiler(Bench):
    """SGLang's torch profiler (CPU + GPU, Python stacks) over `--steps` decode steps per point, for SD at each
    (B, gamma) and plain SGLang at each B; each trace summarized by scripts/trace_summary.py."""

    def profile(self, eng, name: str, prompts, new_tokens: int) -> None:
        import glob
        import shutil

        from er_sglang.engine import SamplingParams
        from scripts.trace_summary import load, summarize

        d = os.path.join(self.args.trace_dir, name)
        shutil.rmtree(d, ignore_errors=True)
        eng.engine.start_profile(output_dir=d, num_steps=self.args.steps, activities=["CPU", "GPU"],
                                 profile_id=name)
        eng.generate(prompts, SamplingParams(max_new_tokens=new_tokens), ignore_eos=True)
        path, size, t = None, -1, time.time()
        while time.time() - t < 180:  # the trace is exported after the last profiled step
            found = glob.glob(os.path.join(d, "*.trace.json.gz"))
            if found and os.path.getsize(found[0]) == size:
                path = found[0]
                break
            size = os.path.getsize(found[0]) if found else -1
            time.sleep(2)
        rec = {"name": name, "variant": "ar" if name.startswith("ar_") else self.variant, "trace": path,
               "summary": summarize(load(path), self.args.steps) if path else None}
        self.out["records"].append(rec)
        self.save()
        print("PROFILE", name, json.dumps({k: v for k, v in (rec["summary"] or {}).items()
                                            if not isinstance(v, list)}), flush=True)

    def run_sd(self) -> None:
        from er_sglang.sglang.engine import SGLangEngine

        spec = {"mode": "argmax", "gamma": 3, "gamma_ladder": [g for g in self.args.gammas if g > 0],
                "policy": {"argmax_gammas": [g for g in self.args.gammas if g > 0]},
                "roofline": ROOFLINE, "bs_max": max(self.args.batches), "draft_kernel": self.variant}
        eng = SGLangEngine(self.args.model, spec, self.sglang_args())
        try:
            for b in self.args.batches:
                prompts = self.prompts(self.args.seqs[0], b)
                for g in self.args.gammas:
                    eng.rpc("set_gamma", gamma=g)
                    self.timed(eng, prompts, 8)
                    self.profile(eng, f"sd_b{b}_g{g}", prompts, (self.args.steps + 8) * (g + 1))
        finally:
            eng.shutdown()

    def run_ar(self) -> None:
        from er_sglang.sglang.engine import SGLangEngine

        eng = SGLangEngine(self.args.model, {"mode": "no-sd", "gamma": 0, "gamma_ladder": [1]}, self.sglang_args())
        try:
            for b in self.args.batches:
                prompts = self.prompts(self.args.seqs[0], b)
                self.timed(eng, prompts, 8)
                self.profile(eng, f"ar_b{b}", prompts, self.args.steps + 8)
        finally:
            eng.shutdown()


def cmd_profile(args) -> None:
    import torch

    b = Profiler(args)
    b.out["device"] = torch.cuda.get_device_name(0)
    if "ar" in args.parts:
        b.run_ar()
    if "sd" in args.parts:
        b.run_sd()
    b.save()
