"""Group-wise 4-bit compression (workers/llm/compression.py): error bounds, packing, memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from workers.llm.compression import (
    KV_CONFIG,
    WEIGHT_CONFIG,
    CompressedEmbedding,
    CompressedKVCache,
    CompressedLinear,
    CompressionConfig,
    compress,
    decompress,
    fake_compress,
    pack_codes,
    unpack_codes,
)


def _groups(x: torch.Tensor, cfg: CompressionConfig) -> torch.Tensor:
    """``x`` laid out like the compressed groups ``[..., G, group_size]`` (padding by the last value)."""
    y = x.movedim(cfg.group_dim % x.ndim, -1).float()
    pad = -y.shape[-1] % cfg.group_size
    y = torch.cat([y, y[..., -1:].expand(*y.shape[:-1], pad)], -1)
    return y.unflatten(-1, (-1, cfg.group_size))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    "shape,group_dim,group_size",
    [
        ((768, 768), 1, 64),
        ((96, 100), 1, 64),
        ((3, 50, 7), 1, 16),
        ((2, 3, 5, 64), -1, 64),
        ((130, 20), 0, 64),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_within_half_step(shape, group_dim, group_size, symmetric, dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(shape) * 0.7 + 0.1).to(dtype)
    cfg = CompressionConfig(num_bits=4, group_size=group_size, group_dim=group_dim, symmetric=symmetric)
    ct = compress(x, cfg)
    assert ct.data.dtype == torch.uint8 and ct.scale.dtype == dtype
    # Reconstruct in fp32 to check the quantizer itself: |x - x_hat| <= step / 2 per group, where
    # step = 1 / stored scale. The slack only covers fp32 rounding in decompress.
    x_hat = decompress(ct, dtype=torch.float32)
    step = ct.scale.float().reciprocal()
    err = (_groups(x_hat, cfg) - _groups(x, cfg)).abs()
    bound = 0.5 * step * (1 + 1e-5) + 1e-6 * x.float().abs().max()
    assert (err <= bound).all(), (err / step).max()
    # In the tensor's own dtype the result adds at most half an ulp of that dtype.
    out = decompress(ct)
    assert out.shape == x.shape and out.dtype == dtype
    fi = torch.finfo(dtype)
    ulp = fi.eps * torch.maximum(x_hat.abs(), torch.tensor(fi.smallest_normal))  # subnormal spacing too
    assert ((out.float() - x_hat).abs() <= 0.5 * ulp).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_exact(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (5, 3, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 3, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_layout_high_nibble_first() -> None:
    assert pack_codes(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4).tolist() == [0x12, 0xF0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_values_on_grid_round_trip_exactly(dtype: torch.dtype) -> None:
    # Every group holds codes 0..15 (so min/max are recovered) with a power-of-two step and a min
    # that is a multiple of it: all values and parameters are exact in every dtype.
    torch.manual_seed(1)
    rows, groups, gs = 32, 4, 64
    codes = torch.stack([torch.randperm(gs) % 16 for _ in range(rows * groups)]).view(rows, groups, gs)
    step = 2.0 ** torch.randint(-6, 0, (rows, groups, 1)).float()
    mn = torch.randint(-40, 0, (rows, groups, 1)).float() * step
    x = (codes * step + mn).view(rows, groups * gs).to(dtype)
    out = decompress(compress(x, CompressionConfig(group_dim=1)))
    assert torch.equal(out, x)


def test_constant_and_zero_groups_are_exact() -> None:
    x = torch.zeros(4, 128)
    x[1] = 3.25
    x[2, :64] = -1.5
    for cfg in (CompressionConfig(group_dim=1), CompressionConfig(group_dim=1, symmetric=True)):
        out = decompress(compress(x, cfg))
        assert torch.isfinite(out).all()
        assert torch.equal(out, x) if not cfg.symmetric else torch.allclose(out, x, rtol=0, atol=0.11)
    # symmetric keeps exact zeros
    y = torch.randn(8, 64)
    y[:, ::3] = 0
    out = decompress(compress(y, CompressionConfig(group_dim=1, symmetric=True)))
    assert (out[:, ::3] == 0).all()


def test_weight_memory_at_most_30_percent_of_fp16() -> None:
    w = torch.randn(768, 768, dtype=torch.float16)
    ct = compress(w, WEIGHT_CONFIG)
    fp16 = w.numel() * 2
    # 64 values -> 32 bytes of codes + fp16 scale + fp16 min = 36 bytes vs 128: 28.1%.
    assert ct.nbytes == fp16 * 36 // 128
    assert ct.nbytes <= 0.30 * fp16
    # fp32 weights with fp16 parameters give the same footprint.
    ct32 = compress(w.float(), CompressionConfig(group_dim=1, param_dtype=torch.float16))
    assert ct32.nbytes == ct.nbytes


def _predicted_rel_error(ct, w: torch.Tensor) -> float:
    # Rounding error ~ uniform on [-step/2, step/2] -> rms step / sqrt(12) per weight; for a random
    # input independent of W, E||x(W - W_hat)|| / E||xW|| = ||W - W_hat||_F / ||W||_F.
    step = ct.scale.float().reciprocal().expand(*ct.scale.shape[:-1], ct.config.group_size)
    return float(step.pow(2).mean().sqrt() / math.sqrt(12) / w.detach().float().pow(2).mean().sqrt())


def test_compressed_linear_close_to_linear() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(768, 768)
    cl = CompressedLinear.from_linear(lin)
    x = torch.randn(32, 768)
    with torch.no_grad():
        ref = lin(x) - lin.bias
        got = cl(x) - cl.bias
    rel = float((got - ref).norm() / ref.norm())
    predicted = _predicted_rel_error(cl.compressed_weight, lin.weight)
    # nn.Linear init is U(-a, a): range <= 2a -> step <= 2a/15, rms error <= step/sqrt(12), rms weight
    # = a/sqrt(3): relative error <= 1/15. The uniform-error model predicts it within a few percent;
    # 20% covers the sampling noise of 32 x 768 outputs.
    assert rel <= 1.2 * predicted
    assert rel <= 1 / 15 * 1.1
    assert cl(x.bfloat16()).dtype == torch.bfloat16
    # 4-bit packed storage is a quarter of an fp32 weight's... plus group parameters
    assert cl.weight_nbytes == 768 * 12 * (32 + 4 + 4)


def test_compressed_linear_state_and_device_moves() -> None:
    lin = nn.Linear(64, 32).half()
    cl = CompressedLinear.from_linear(lin)
    assert set(cl.state_dict()) == {"weight_data", "weight_scale", "weight_min", "bias"}
    moved = cl.to("cpu")
    x = torch.randn(3, 64, dtype=torch.float16)
    assert torch.equal(moved(x), cl(x))


def test_compressed_embedding_lookup_and_tied_head() -> None:
    torch.manual_seed(3)
    emb = nn.Embedding(100, 64)
    ce = CompressedEmbedding.from_embedding(emb, dtype=torch.float16)
    ids = torch.tensor([[1, 5, 99], [0, 0, 42]])
    full = decompress(ce.compressed_weight)
    assert torch.equal(ce(ids), full[ids])
    head = ce.as_linear()
    assert head.weight_data.data_ptr() == ce.weight_data.data_ptr()
    h = torch.randn(2, 64, dtype=torch.float16)
    torch.testing.assert_close(head(h), h @ full.T, rtol=1e-2, atol=1e-2)


def test_kv_cache_matches_per_vector_compression() -> None:
    torch.manual_seed(4)
    b, h, s, d, max_len = 2, 3, 10, 64, 16
    k = torch.randn(b, h, s + 2, d)
    v = torch.randn(b, h, s + 2, d)
    cache = CompressedKVCache(b, h, max_len, d, dtype=torch.float32)
    cache.write(0, k[:, :, :s], v[:, :, :s])  # prefill
    assert cache.length == s
    k1, _ = cache.update(torch.tensor([s]), k[:, :, s : s + 1], v[:, :, s : s + 1])  # one decode step
    assert k1.shape == (b, h, s + 1, d)
    cache.write(torch.tensor([s + 1]), k[:, :, s + 1 :], v[:, :, s + 1 :])
    kk, vv = cache.get()
    # Groups run along the head dim, so the cache equals compressing the whole tensor at once.
    assert torch.equal(kk, fake_compress(k, KV_CONFIG))
    assert torch.equal(vv, fake_compress(v, KV_CONFIG))
    assert torch.equal(cache.get(upto=4)[0], kk[:, :, :4])
    assert cache.get(dtype=torch.bfloat16)[1].dtype == torch.bfloat16
    # the whole static buffer is readable: unwritten slots are zeros, never NaN
    k_all, _ = cache.get(upto=max_len)
    assert torch.equal(k_all[:, :, s + 2 :], torch.zeros(b, h, max_len - s - 2, d))
    # error bound: half a step per (b, h, s) vector
    step = (k.amax(-1) - k.amin(-1)) / 15
    assert ((kk - k).abs().amax(-1) <= 0.5 * step * (1 + 1e-3) + 1e-6).all()


def test_kv_cache_memory_at_most_30_percent_of_fp16() -> None:
    cache = CompressedKVCache(8, 12, 256, 64, dtype=torch.float16)
    assert cache.dense_nbytes(torch.float16) == 2 * 8 * 12 * 256 * 64 * 2
    assert cache.nbytes <= 0.30 * cache.dense_nbytes(torch.float16)
    assert cache.nbytes == cache.dense_nbytes(torch.float16) * 36 // 128


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        CompressionConfig(num_bits=3)
    with pytest.raises(ValueError):
        CompressionConfig(num_bits=4, group_size=63)
    with pytest.raises(TypeError):
        compress(torch.zeros(4, 64, dtype=torch.int32))
