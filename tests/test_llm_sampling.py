"""workers.llm.sampling: parameter validation, logits processing, per-row seeded sampling."""

from __future__ import annotations

import math

import pytest
import torch

from workers.llm.sampling import BatchSampler, SamplingParams

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("top_k", 0),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("stop", [""]),
        ("stop", [3]),
        ("seed", -1),
        ("seed", "7"),
        ("ignore_eos", "yes"),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_defaults_and_single_stop_string():
    p = SamplingParams(stop="\n")
    assert p.stop == ["\n"]
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed, p.ignore_eos) == (
        16,
        1.0,
        None,
        1.0,
        None,
        False,
    )
    assert SamplingParams(temperature=0).greedy and not p.greedy


def probs_of(params: list[SamplingParams], logits: torch.Tensor) -> torch.Tensor:
    return BatchSampler(params, CPU).probabilities(logits)


def test_per_row_temperature_top_k_top_p():
    base = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    logits = base.expand(4, 4)
    probs = probs_of(
        [
            SamplingParams(),  # untouched
            SamplingParams(top_k=2),
            SamplingParams(top_p=0.5),  # 0.4 + 0.3 reach 0.5: keep two
            SamplingParams(temperature=2.0),
        ],
        logits,
    )
    torch.testing.assert_close(probs[0], torch.tensor([0.4, 0.3, 0.2, 0.1]))
    torch.testing.assert_close(probs[1], torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))
    torch.testing.assert_close(probs[2], torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))
    torch.testing.assert_close(probs[3], torch.softmax(base / 2, dim=-1))


def test_top_k_then_top_p_compose():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # top_k=3 renormalises to 4/9, 3/9, 2/9; top_p=0.7 then keeps the first two (4/9 < 0.7 <= 7/9)
    probs = probs_of([SamplingParams(top_k=3, top_p=0.7)], logits)
    torch.testing.assert_close(probs[0], torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


def test_seeded_draws_follow_the_distribution():
    target = torch.tensor([0.5, 0.25, 0.15, 0.1])
    sampler = BatchSampler([SamplingParams(seed=123)], CPU)
    logits = torch.log(target)[None]
    counts = torch.bincount(torch.cat([sampler.sample(logits) for _ in range(4000)]), minlength=4)
    freq = counts.float() / counts.sum()
    assert torch.allclose(freq, target, atol=0.03), freq


def test_row_draws_depend_only_on_their_own_seed():
    torch.manual_seed(0)
    steps = [torch.randn(4, 50) for _ in range(30)]
    mine = SamplingParams(seed=7, temperature=0.8, top_p=0.9)
    alone = BatchSampler([mine], CPU)
    crowd = BatchSampler(
        [SamplingParams(seed=1), mine, SamplingParams(temperature=0), SamplingParams(seed=99, top_k=5)], CPU
    )
    alone_tokens = [alone.sample(s[1:2]).item() for s in steps]
    crowd_tokens = [crowd.sample(s)[1].item() for s in steps]
    assert alone_tokens == crowd_tokens
    # and the seed matters: another seed gives another sequence
    other = BatchSampler([SamplingParams(seed=8, temperature=0.8, top_p=0.9)], CPU)
    assert [other.sample(s[1:2]).item() for s in steps] != alone_tokens


def test_keep_rows_follows_compaction():
    torch.manual_seed(1)
    steps = [torch.randn(3, 40) for _ in range(10)]
    params = [SamplingParams(seed=s) for s in (10, 11, 12)]
    full = BatchSampler(params, CPU)
    reference = [full.sample(s)[2].item() for s in steps]
    compacted = BatchSampler(params, CPU)
    got = [compacted.sample(s)[2].item() for s in steps[:4]]
    compacted.keep_rows([2])  # rows 0 and 1 finished
    got += [compacted.sample(s[2:3])[0].item() for s in steps[4:]]
    assert got == reference


def test_greedy_and_top_k_1_are_argmax():
    torch.manual_seed(2)
    logits = torch.randn(3, 100)
    sampler = BatchSampler(
        [SamplingParams(temperature=0), SamplingParams(top_k=1, seed=5), SamplingParams(temperature=0)], CPU
    )
    assert torch.equal(sampler.sample(logits), logits.argmax(-1))
