"""Reference engine: lossless end to end, exact target log-probs, shrinking batch, weight updates."""
import pytest
import torch

from er_sglang.drafter import build_drafter
from er_sglang.engine import SamplingParams, state_dict_checksum
from er_sglang.policy import SpecPolicy
from er_sglang.reference import ReferenceEngine
from er_sglang.sampling import verify
from tests.stats import chi2_pvalue
from tests.tiny import ModelDrafter, tiny_llama

PROMPT = [1, 5, 9, 2]


def _engine(mode="rtn", gamma=3, drafter="int4", stops=(), verify_fn=verify, target=None):
    target = target or tiny_llama(0)
    policy = SpecPolicy(mode=mode, gamma=gamma)
    if mode == "no-sd":
        draft = None
    elif drafter == "int4":
        draft = build_drafter(target, group_size=32, backend="rtn")
    else:
        draft = ModelDrafter(tiny_llama(seed=7))  # a very different drafter: many rejections
    return ReferenceEngine(target, policy, draft, stop_token_ids=stops, verify_fn=verify_fn)


@pytest.mark.parametrize("drafter", ["int4", "other"])
def test_reference_greedy_sd_equals_ar(drafter):
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    prompts = [PROMPT, [3, 4], [7, 7, 7, 7, 7, 1]]
    ar = _engine("no-sd").generate(prompts, params)
    sd = _engine("rtn", gamma=4, drafter=drafter).generate(prompts, params)
    assert [r.output_ids for r in sd] == [r.output_ids for r in ar]


@pytest.mark.parametrize("gamma", [1, 5])
def test_reference_logprobs_equal_full_forward(gamma):
    """Returned log-probs equal a fresh teacher-forced forward: KV holes and positions are right."""
    engine = _engine("rtn", gamma=gamma, drafter="other")
    prompts = [PROMPT, [3, 4, 8]]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=40, temperature=1.0, seed=3))
    for r in outs:
        ids = torch.tensor([r.prompt_ids + r.output_ids])
        with torch.no_grad():
            logp = torch.log_softmax(engine.model(ids).logits[0].float(), -1)
        start = len(r.prompt_ids) - 1
        want = logp[start:start + len(r.output_ids)].gather(-1, torch.tensor(r.output_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(r.logprobs), want, atol=1e-4)


def _exact_marginals(model, prompt, steps):
    """Exact distributions of output tokens 1..steps (marginals), by enumerating prefixes."""
    vocab = model.config.vocab_size
    prefixes, weights, marginals = torch.tensor([prompt]), torch.ones(1), []
    with torch.no_grad():
        for _ in range(steps):
            p = torch.softmax(model(prefixes).logits[:, -1].float(), -1)  # [N, V]
            joint = weights[:, None] * p
            marginals.append(joint.sum(0))
            prefixes = torch.cat([prefixes.repeat_interleave(vocab, 0),
                                  torch.arange(vocab).repeat(len(prefixes))[:, None]], 1)
            weights = joint.reshape(-1)
    return marginals


def _sd_pvalues(verify_fn, num=3000):
    engine = _engine("rtn", gamma=2, drafter="other", verify_fn=verify_fn)
    outs = engine.generate([PROMPT] * num, SamplingParams(max_new_tokens=3, seed=11))
    exact = _exact_marginals(engine.model, PROMPT, 3)
    tokens = torch.tensor([r.output_ids for r in outs])
    return [chi2_pvalue(torch.bincount(tokens[:, k], minlength=32), exact[k]) for k in (1, 2)]


def test_reference_sd_preserves_target_distribution():
    assert min(_sd_pvalues(verify)) > 1e-4


def test_reference_sd_test_catches_resampling_from_p():
    def resample_from_p(draft_tokens, draft_probs, target_probs, generator=None):
        return verify(draft_tokens, torch.zeros_like(draft_probs), target_probs, generator)

    # q = 0 accepts every draft whose p > 0: the drafter's proposals leak into the output
    assert min(_sd_pvalues(resample_from_p)) < 1e-6


def test_reference_batch_shrinks_and_stats_add_up():
    seen = []
    engine = _engine("rtn", gamma=3, stops=(0, 1, 2, 3))
    choose = engine.policy.choose_gamma
    engine.policy.choose_gamma = lambda batch, seq: seen.append(batch) or choose(batch, seq)
    outs = engine.generate([PROMPT] * 16, SamplingParams(max_new_tokens=30, seed=5))
    assert seen[0] <= 16 and seen == sorted(seen, reverse=True) and seen[-1] < seen[0]
    stats = engine.stats()
    assert stats.num_drafted == 3 * sum(seen)
    assert sum(stats.accept_len_hist.values()) == sum(seen) == stats.num_seq_steps
    assert stats.num_accepted == sum(r.num_accepted for r in outs)
    assert {r.finish_reason for r in outs} <= {"stop", "length"}
    assert all(len(r.output_ids) <= 30 and len(r.logprobs) == len(r.output_ids) for r in outs)


def test_reference_update_weights_changes_outputs_and_drafter():
    engine = _engine("rtn", gamma=3)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    before = engine.generate([PROMPT], params)[0].output_ids
    new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in engine.model.state_dict().items()}
    timings = engine.update_weights(new_state)
    assert set(timings) == {"load_s", "requant_s"}
    assert engine.weights_checksum() == state_dict_checksum(new_state)
    fresh = build_drafter(engine.model, group_size=32, backend="rtn")
    for name, module in engine.drafter.quantized_linears().items():
        want = fresh.quantized_linears()[name]
        assert all(torch.equal(a, b) for a, b in zip(module.packed_tensors(), want.packed_tensors()))
    assert engine.generate([PROMPT], params)[0].output_ids != before
