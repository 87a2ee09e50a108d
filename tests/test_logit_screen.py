"""workers.llm.logit_screen: greedy picks from a bf16 LM head are the fp32 head's argmax, exactly."""

from __future__ import annotations

import pytest
import torch

from tests.greedy_batches import generate_three_ways, greedy_and_mixed
from workers.llm import cpu_kernels
from workers.llm.engine import GenRequest, LLMEngine
from workers.llm.logit_screen import AmxHeadArgmax, LogitScreen, unpack_avx512
from workers.llm.model import PackedLinear
from workers.llm.sampling import SamplingParams
from workers.llm.tiny import build_tiny_checkpoint

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available() or not cpu_kernels.avx512_linear_available(torch.bfloat16),
    reason="needs the AVX-512 kernels with AVX512_BF16",
)


def _fp32_argmax(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the engine's fp32 LM head and greedy pick give: the AVX-512 linear, then the argmax kernel."""
    logits = cpu_kernels.avx512_linear(x, cpu_kernels.avx512_pack(w), None, w.shape[0], False)
    return cpu_kernels.argmax(logits)


def _screen(w: torch.Tensor) -> LogitScreen:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    head = PackedLinear(linear, batch_hint=8)
    assert head.avx512
    return LogitScreen(head, w)


@pytest.mark.parametrize("seed", range(6))
def test_the_pick_is_the_fp32_argmax_with_few_logits_recomputed(seed):
    g = torch.Generator().manual_seed(seed)
    v, k = 3001, 96  # a narrow last panel, and rows of very different norms
    w = torch.randn(v, k, generator=g) * torch.rand(v, 1, generator=g).mul(3).add(0.05)
    x = torch.randn(11, k, generator=g) * (1 + seed)
    screen = _screen(w)
    assert torch.equal(screen(x), _fp32_argmax(x, w))
    assert 11 <= screen.recomputed < 11 * v // 20


def test_exact_and_near_ties_resolve_as_the_fp32_argmax_does():
    g = torch.Generator().manual_seed(7)
    v, k = 700, 64
    w = torch.randn(v, k, generator=g) * 0.1
    w[300] = w[123]  # an exact tie: the first index wins
    w[500] = w[123]
    w[500, 5] = torch.nextafter(w[123, 5], torch.tensor(10.0))  # one ulp apart: bf16 cannot tell them apart
    w[601] = w[123] * (1 + 2**-20)
    x = torch.stack([w[123] * 40, -w[123] * 40, torch.randn(k, generator=g)])
    screen = _screen(w)
    picks = screen(x)
    assert torch.equal(picks, _fp32_argmax(x, w))
    ids, counts = cpu_kernels.screened_argmax(x, screen.approx(x), w, screen.wmax)
    assert torch.equal(ids, picks) and counts[0] >= 4  # the near-tied rows were all recomputed


@pytest.mark.parametrize("seed", range(4))
def test_a_crowd_of_logits_closer_than_bf16_can_tell_apart_still_gives_the_fp32_pick(seed):
    # 400 rows within 1e-3 of one another: bf16 rounding (~4e-3) reorders them at random, so the
    # bound must keep the whole crowd for the exact pass
    g = torch.Generator().manual_seed(seed)
    k = 128
    base = torch.randn(k, generator=g)
    w = torch.cat([base + 1e-3 * torch.randn(400, k, generator=g), torch.randn(600, k, generator=g)])
    x = torch.stack([base, base * 3 + 0.01 * torch.randn(k, generator=g)])
    screen = _screen(w)
    approx = screen.approx(x)
    assert not torch.equal(cpu_kernels.argmax(approx), _fp32_argmax(x, w))  # bf16 alone gets it wrong
    assert torch.equal(screen(x), _fp32_argmax(x, w))
    assert screen.recomputed >= 2 * 100


def test_a_row_that_bf16_ranks_second_is_picked_when_fp32_ranks_it_first():
    # x = 1; row B's values sit just above bf16 rounding midpoints (each rounds up), row A's half
    # exact, half just below a midpoint (rounding down): fp32 logits A 128.75 > B 128.5, bf16
    # logits A 128 < B 129. Only a bound at least as wide as bf16's error keeps A for the exact pass.
    k, eps = 128, 2.0**-15
    w = torch.randn(8, k, generator=torch.Generator().manual_seed(0)) * 0.01
    w[1] = 1 + 2.0**-8 + eps
    w[3, : k // 2], w[3, k // 2 :] = 1 + 2.0**-7, 1 + 2.0**-8 - eps
    x = torch.ones(1, k)
    screen = _screen(w)
    approx = screen.approx(x)
    assert approx[0, 1].item() == 129 and approx[0, 3].item() == 128
    assert _fp32_argmax(x, w).item() == 3
    assert screen(x).item() == 3


def test_a_row_with_an_infinity_takes_the_full_head():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 32, generator=g)
    x = torch.randn(3, 32, generator=g)
    x[1, 4] = float("inf")
    screen = _screen(w)
    approx = screen.approx(x)
    ids, _ = cpu_kernels.screened_argmax(x, approx, w, screen.wmax)
    assert ids[1] == -1 and ids[0] >= 0 and ids[2] >= 0
    assert torch.equal(screen(x), _fp32_argmax(x, w))


def test_unpack_inverts_the_avx512_packing():
    w = torch.randn(101, 40)
    assert torch.equal(unpack_avx512(cpu_kernels.avx512_pack(w), 101, 40), w)


@pytest.mark.parametrize(("arch", "overrides"), [("opt", {}), ("llama", {"tie_word_embeddings": False})])
def test_greedy_generation_is_unchanged_and_sampled_rows_keep_the_full_head(tmp_path, arch, overrides):
    folder = build_tiny_checkpoint(tmp_path / arch, arch=arch, num_hidden_layers=2, **overrides)
    batches = greedy_and_mixed()
    outputs = {}
    for fast in (True, False):
        engine = LLMEngine.load(folder, dtype="float32", max_batch_size=4, fast_decode=fast)
        for name, requests in batches.items():
            run = engine.generate(requests)
            outputs[fast, name] = [o.token_ids for o in run.outcomes]
        screen = engine.steps._fast.screen if fast else None
        if fast:
            assert screen is not None and screen.recomputed > 0
    assert outputs[True, "greedy"] == outputs[False, "greedy"]
    assert outputs[True, "mixed"] == outputs[False, "mixed"]


def test_a_plan_rebuilt_for_a_bigger_cache_keeps_the_screen(tmp_path):
    # the screen depends on the weights only: a new KV cache must not re-pack the LM head
    folder = build_tiny_checkpoint(tmp_path / "opt", arch="opt", num_hidden_layers=2)
    engine = LLMEngine.load(folder, dtype="float32", max_batch_size=4)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.generate([GenRequest(prompt_ids=[5, 6], params=params)])
    first = engine.steps._fast
    engine.generate([GenRequest(prompt_ids=[5, 6, 7 + i], params=params) for i in range(4)])
    assert engine.steps._fast is not first and engine.steps._fast.screen is first.screen is not None


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX here (or the OS does not grant it)")
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_bf16_greedy_steps_on_amx_take_the_fused_argmax_with_the_same_tokens(tmp_path, monkeypatch, arch):
    # the AMX head's pick where its int8 screen does not apply (a head with a bias, or a CPU without
    # VNNI): here, screens made unavailable
    monkeypatch.setattr(cpu_kernels, "int8_screen_available", lambda amx=False: False)
    folder = build_tiny_checkpoint(tmp_path / arch, arch=arch, num_hidden_layers=2)
    tokens, picks = generate_three_ways(folder, "bfloat16")
    assert isinstance(picks["picked"], AmxHeadArgmax)
    assert picks["full head"] is None and picks["module path"] is None
    assert tokens["picked"] == tokens["full head"] == tokens["module path"]
