"""workers.llm.fast_decode: a decode step as a flat list of kernel calls gives the module path's bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.llm import cpu_kernels
from workers.llm.engine import GenRequest, LLMEngine
from workers.llm.fast_decode import FastDecode
from workers.llm.generate import ensure_caches, prefill
from workers.llm.sampling import SamplingParams
from workers.llm.tiny import build_tiny_checkpoint

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels not built here")

COVERED: dict[str, tuple[str, dict]] = {
    "llama-gqa": ("llama", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {}),
    "opt": ("opt", {}),
    "opt-no-affine-bias": ("opt", {"enable_bias": False}),
}
NOT_COVERED: dict[str, tuple[str, dict]] = {
    "opt-postnorm": ("opt", {"do_layer_norm_before": False}),
    "opt-projected": ("opt", {"word_embed_proj_dim": 32, "tie_word_embeddings": False}),
    "mistral-window": ("mistral", {"sliding_window": 4}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fast_decode")
    variants = {**COVERED, **NOT_COVERED}
    return {
        name: build_tiny_checkpoint(root / name, arch=arch, seed=i, num_hidden_layers=3, **overrides)
        for i, (name, (arch, overrides)) in enumerate(variants.items())
    }


def _caches(model) -> list[torch.Tensor]:
    return [t for layer in model.layers for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", list(COVERED))
def test_decode_steps_give_the_module_paths_logits_and_cache_bit_for_bit(checkpoints, variant, dtype):
    engine = LLMEngine.load(checkpoints[variant], dtype=dtype, max_batch_size=6)
    model = engine.model
    ensure_caches(model, 6, 64)
    torch.manual_seed(0)
    prompts = [torch.randint(4, 300, (n,)).tolist() for n in (5, 17, 9, 12, 3)]
    prefill(model, prompts, pad_id=3)
    fast = FastDecode.build(model)
    assert fast is not None and fast.matches(model)
    start = [c.clone() for c in _caches(model)]
    pos = torch.tensor([len(p) for p in prompts])[:, None]
    tokens = torch.randint(4, 300, (len(prompts), 1))

    def steps(run) -> list[torch.Tensor]:
        for cache, saved in zip(_caches(model), start):
            cache.copy_(saved)  # in place: the fast path holds the cache's pointers
        out = []
        with torch.inference_mode():
            for i in range(4):  # rows at different positions, each step one further
                logits = run(tokens + i, pos + i)
                out.append(logits)
        return out + [c.clone() for c in _caches(model)]

    zero = torch.zeros(len(prompts), dtype=torch.long)
    module = steps(lambda t, p: model(t, p, logits_index=zero, kv_len=int(p.max()) + 1))
    flat = steps(fast)
    for a, b in zip(module, flat):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", list(NOT_COVERED))
def test_models_it_does_not_cover_keep_the_module_path(checkpoints, variant):
    engine = LLMEngine.load(checkpoints[variant], dtype="float32", max_batch_size=2)
    ensure_caches(engine.model, 2, 32)
    assert FastDecode.build(engine.model) is None
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    run = engine.generate([GenRequest(prompt_ids=[5, 6, 7], params=params)])
    assert len(run.outcomes[0].token_ids) == 3


def test_engine_output_is_the_same_with_and_without_it(checkpoints):
    # continuous batching shrinks and refills the batch: the fast path follows the row count and
    # is rebuilt when the cache is reallocated for a bigger batch
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    requests = [
        GenRequest(prompt_ids=[4 + i, 9, 11 + i], params=short if i % 2 else params) for i in range(5)
    ]
    outputs = []
    for fast in (True, False):
        engine = LLMEngine.load(checkpoints["opt"], dtype="bfloat16", max_batch_size=3)
        engine.steps.fast_decode = fast
        first = engine.generate(requests[:1])
        more = engine.generate(requests)
        outputs.append([o.token_ids for o in first.outcomes + more.outcomes])
        assert (engine.steps._fast is not None) == fast
    assert outputs[0] == outputs[1]


def test_a_stale_one_refuses_to_run(checkpoints):
    # it holds the cache's pointers: a reallocated cache (more rows) or too many rows is an error,
    # never a write past the buffers
    engine = LLMEngine.load(checkpoints["llama-gqa"], dtype="float32", max_batch_size=4)
    model = engine.model
    ensure_caches(model, 2, 32)
    fast = FastDecode.build(model)
    tokens, pos = torch.full((3, 1), 5), torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="3 rows for a FastDecode built for 2"):
        fast(tokens, pos)
    ensure_caches(model, 4, 32)
    assert not fast.matches(model)
    with pytest.raises(ValueError, match="older cache"):
        fast(tokens[:1], pos[:1])
    assert FastDecode.build(model)(tokens, pos).shape == (3, model.output.out_features)
