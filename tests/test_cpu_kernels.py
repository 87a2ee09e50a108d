"""The CPU kernels against torch on the same inputs: cache writes, attention, norms, gate, argmax."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from workers.llm import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2/AVX-512 or no g++ here")

DTYPES = [torch.float32, torch.bfloat16]
# (heads, kv heads, head dim): multi-head, grouped-query, an odd head count (the decode kernel's
# groups of items end part-full) and wide heads
SHAPES = [(4, 4, 32), (8, 2, 64), (3, 3, 64), (4, 1, 128), (2, 1, 256)]


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope_tables(s, d):
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin, dtype):
    """What the kernels store: RoPE in float32, rounded once to the model dtype."""
    return (x.float() * cos + _rotate_half(x.float()) * sin).to(dtype)


def _tolerance(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("h", "h_kv", "d"), SHAPES)
@pytest.mark.parametrize("rope", [True, False])
def test_decode_step_writes_the_cache_and_attends_up_to_each_rows_position(dtype, h, h_kv, d, rope):
    torch.manual_seed(0)
    b, s = 5, 40
    pos = torch.tensor([3, 17, 0, 39, 25])
    k_cache, v_cache = torch.randn(b, h_kv, s, d, dtype=dtype), torch.randn(b, h_kv, s, d, dtype=dtype)
    qkv = torch.randn(b, (h + 2 * h_kv) * d, dtype=dtype)  # q, k, v as column slices of one output
    q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
    cos, sin = _rope_tables(s, d) if rope else (torch.empty(0), torch.empty(0))
    q_scale = 1.0 if rope else 0.37  # OPT: no RoPE, a pre-scaled query

    qq, kk = q.view(b, h, 1, d), k.view(b, h_kv, 1, d)
    if rope:
        c, sn = cos[pos][:, None, None], sin[pos][:, None, None]
        qq, kk = _rotate(qq, c, sn, dtype), _rotate(kk, c, sn, dtype)
    qq = qq * q_scale
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[torch.arange(b), :, pos] = kk[:, :, 0]
    v_ref[torch.arange(b), :, pos] = v.view(b, h_kv, d)
    mask = (torch.arange(s)[None, :] <= pos[:, None])[:, None, None]
    expected = F.scaled_dot_product_attention(
        qq.float(), k_ref.float(), v_ref.float(), attn_mask=mask, scale=0.125, enable_gqa=True
    ).reshape(b, h * d)

    out = cpu_kernels.decode_step(q, k, v, k_cache, v_cache, torch.arange(b), pos, cos, sin, q_scale, 0.125)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("h", "h_kv", "d"), [(4, 2, 32), (3, 3, 64), (4, 1, 128), (2, 2, 256)])
def test_decode_step_takes_several_tokens_of_a_row_each_seeing_the_slots_up_to_its_own(dtype, h, h_kv, d):
    # speculative verification: 3 tokens of cache row 2 and 3 of cache row 0 in one call give
    # the results of 3 one-token calls per row, bit for bit, however the items fall into groups
    torch.manual_seed(3)
    s = 24
    cos, sin = _rope_tables(s, d)
    k_cache, v_cache = torch.randn(3, h_kv, s, d, dtype=dtype), torch.randn(3, h_kv, s, d, dtype=dtype)
    q, k, v = torch.randn(6, h * d, dtype=dtype), torch.randn(6, h_kv * d, dtype=dtype), torch.randn(6, h_kv * d, dtype=dtype)
    rows, pos = torch.tensor([2, 2, 2, 0, 0, 0]), torch.tensor([7, 8, 9, 4, 5, 6])
    k_one, v_one = k_cache.clone(), v_cache.clone()
    one_at_a_time = torch.cat([
        cpu_kernels.decode_step(q[i : i + 1], k[i : i + 1], v[i : i + 1], k_one, v_one, rows[i : i + 1],
                                pos[i : i + 1], cos, sin, 1.0, 0.2)
        for i in (0, 3, 1, 4, 2, 5)
    ])[[0, 2, 4, 1, 3, 5]]
    together = cpu_kernels.decode_step(q, k, v, k_cache, v_cache, rows, pos, cos, sin, 1.0, 0.2)
    assert torch.equal(together, one_at_a_time)
    assert torch.equal(k_cache, k_one) and torch.equal(v_cache, v_one)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("h", "h_kv", "d"), SHAPES)
@pytest.mark.parametrize("start", [0, 29])
@pytest.mark.parametrize("t", [13, 37])
def test_prefill_step_fills_scattered_cache_rows_and_attends_causally(dtype, h, h_kv, d, start, t):
    # a later chunk (start > 0) attends over what earlier chunks left in the cache rows; 37 tokens
    # span three blocks of 16 query rows (the AMX path's) and keys past one 32-key step
    torch.manual_seed(1)
    b, s = 3, 80
    rows = torch.tensor([3, 0, 4])
    k_cache, v_cache = torch.randn(b + 2, h_kv, s, d, dtype=dtype), torch.randn(b + 2, h_kv, s, d, dtype=dtype)
    qkv = torch.randn(b, t, (h + 2 * h_kv) * d, dtype=dtype)
    q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
    cos, sin = _rope_tables(s, d)

    c, sn = cos[start : start + t][None, None], sin[start : start + t][None, None]
    qq = _rotate(q.reshape(b, t, h, d).transpose(1, 2), c, sn, dtype)
    kk = _rotate(k.reshape(b, t, h_kv, d).transpose(1, 2), c, sn, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[rows, :, start : start + t] = kk
    v_ref[rows, :, start : start + t] = v.reshape(b, t, h_kv, d).transpose(1, 2)
    n = start + t
    mask = (torch.arange(n)[None, :] <= torch.arange(start, n)[:, None])[None, None]
    expected = F.scaled_dot_product_attention(
        qq.float(), k_ref[rows, :, :n].float(), v_ref[rows, :, :n].float(), attn_mask=mask, scale=0.2,
        enable_gqa=True,
    ).transpose(1, 2).reshape(b, t, h * d)

    out = cpu_kernels.prefill_step(q, k, v, k_cache, v_cache, rows, start, cos, sin, 1.0, 0.2)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # other rows untouched
    torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rounds_like_transformers(dtype):
    torch.manual_seed(2)
    x, res, w = torch.randn(7, 100, dtype=dtype), torch.randn(7, 100, dtype=dtype), torch.randn(100, dtype=dtype)

    def reference(y):
        y32 = y.float()
        return w * (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    summed, normed = cpu_kernels.add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(summed, x + res)
    exact = {"atol": 0, "rtol": 0} if dtype == torch.bfloat16 else {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(normed, reference(x + res), **exact)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-6), reference(x), **exact)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_is_torchs_after_the_residual_add(dtype, affine):
    torch.manual_seed(3)
    # 100 columns: whole vectors and a masked tail; an offset mean, as residual streams have
    x, res = torch.randn(7, 100, dtype=dtype) + 3, torch.randn(7, 100, dtype=dtype)
    w, b = (torch.randn(100, dtype=dtype), torch.randn(100, dtype=dtype)) if affine else (None, None)
    summed, normed = cpu_kernels.add_layer_norm(x, res, w, b, 1e-5)
    assert torch.equal(summed, x + res)  # the sum rounded to the model dtype, as torch's add
    # fp32 inside either way; bf16 outputs may differ by one rounding step where torch's fused
    # multiply-adds land on the other side of a tie
    tol = {"atol": 2e-6, "rtol": 2e-6} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    torch.testing.assert_close(normed, F.layer_norm(x + res, (100,), w, b, 1e-5), **tol)
    alone = cpu_kernels.layer_norm(x, w, b, 1e-5)
    torch.testing.assert_close(alone, F.layer_norm(x, (100,), w, b, 1e-5), **tol)


def test_opt_layer_norms_run_the_kernel_once_enabled(tmp_path):
    from workers.llm.model import LayerNorm, ModelArgs, Transformer, enable_cpu_kernels

    args = ModelArgs.from_hf_config(
        {"model_type": "opt", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
         "ffn_dim": 128, "vocab_size": 50, "max_position_embeddings": 64, "word_embed_proj_dim": 64}
    )  # fmt: skip
    model = Transformer(args).eval()
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert len(norms) == 2 * 2 + 1 and not any(n.kernel for n in norms)
    x = torch.randn(3, 64)
    eager = norms[0](x)
    assert enable_cpu_kernels(model) and all(n.kernel for n in norms)
    torch.testing.assert_close(norms[0](x), eager, atol=2e-6, rtol=2e-6)
    # an input in another dtype than the norm's weights takes torch's path, not a misread kernel
    xb = x.bfloat16()
    n0 = norms[0]
    torch.testing.assert_close(n0(xb), F.layer_norm(xb, (64,), n0.weight, n0.bias, n0.eps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_blocks_leaving_their_residual_add_to_the_next_norm_change_no_bits(monkeypatch, dtype, arch):
    # Transformer.forward has pre-norm blocks return (h, delta) and the next block's norm add them
    # (one kernel pass); each block adding its own (torch's add) must give the same bits
    from workers.llm.model import ModelArgs, Transformer, enable_cpu_kernels

    common = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3, "vocab_size": 50,
              "max_position_embeddings": 64}
    extra = ({"model_type": "opt", "ffn_dim": 128, "word_embed_proj_dim": 64} if arch == "opt"
             else {"model_type": "llama", "intermediate_size": 96, "num_key_value_heads": 2})
    args = ModelArgs.from_hf_config({**common, **extra})
    torch.manual_seed(0)
    model = Transformer(args).eval().to(dtype)
    assert args.pre_norm and enable_cpu_kernels(model)
    model.setup_caches(3, 40, dtype, torch.device("cpu"))
    tokens = torch.randint(0, 50, (3, 24))
    pos = torch.arange(24).expand(3, 24)
    last = torch.tensor([23, 23, 23])
    with torch.inference_mode():
        fused = model(tokens, pos, kv_len=24, prompt_chunk=True)
        fused_last = model(tokens, pos, logits_index=last, kv_len=24, prompt_chunk=True)
        monkeypatch.setattr(model.args, "pre_norm", False)  # the model's loop: blocks add their own
        plain = model(tokens, pos, kv_len=24, prompt_chunk=True)
        plain_last = model(tokens, pos, logits_index=last, kv_len=24, prompt_chunk=True)
    assert torch.equal(fused, plain) and torch.equal(fused_last, plain_last)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_swiglus_gate(dtype):
    h = torch.randn(5, 2 * 40, dtype=dtype) * 3
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(h), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [5, 37, 50272])
def test_argmax_picks_the_first_maximum_like_torch(dtype, vocab):
    x = torch.randn(8, vocab).to(dtype)
    x[1, vocab // 3] = x[1].max() + 1
    x[1, vocab - 1] = x[1, vocab // 3]  # a tie: the first one wins
    x[2, min(4, vocab - 1)] = float("nan")  # NaN counts as the maximum, as in torch.max
    x[3] = float("-inf")
    x[4] = 1.0
    assert torch.equal(cpu_kernels.argmax(x), x.max(dim=-1).indices)


def test_the_library_is_built_for_the_instruction_set_chosen_here():
    assert cpu_kernels.built_for() == cpu_kernels.instruction_set()


def _has_avx512() -> bool:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next(line for line in lines if line.startswith("flags")).split()
    return {"avx512f", "avx512bw", "avx512vl"} <= set(flags)


@pytest.mark.parametrize("choice", ["off", "avx2", "auto", None])
def test_genmill_cpu_kernels_picks_the_build(monkeypatch, choice):
    if choice is None:
        monkeypatch.delenv("GENMILL_CPU_KERNELS", raising=False)
    else:
        monkeypatch.setenv("GENMILL_CPU_KERNELS", choice)
    widest = "avx512" if _has_avx512() else "avx2"
    expected = {"off": None, "avx2": "avx2", "auto": widest, None: widest}[choice]
    assert cpu_kernels.instruction_set() == expected


def test_genmill_cpu_kernels_rejects_an_unknown_choice(monkeypatch):
    monkeypatch.setenv("GENMILL_CPU_KERNELS", "sse9")
    with pytest.raises(ValueError, match="GENMILL_CPU_KERNELS='sse9'"):
        cpu_kernels.instruction_set()


@pytest.mark.skipif(cpu_kernels.instruction_set() != "avx512", reason="no AVX-512 here: the AVX2 build ran above")
def test_the_avx2_build_passes_these_tests_on_an_avx512_cpu():
    env = {**os.environ, "GENMILL_CPU_KERNELS": "avx2"}
    # the AMX and AVX-512 linears need AVX-512 (left out of the AVX2 build, see
    # test_amx_is_left_out_of_the_avx2_build)
    select = "not avx512_cpu and not amx_linear and not avx512_linear"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", select]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


# ---- bf16 linear on AMX tiles ----

amx = pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX here (or the OS does not grant it)")


@amx
@pytest.mark.parametrize(("n", "k"), [(96, 64), (100, 72), (40, 2048)])
def test_amx_linear_is_the_bf16_linear_rounded_once(n, k):
    # sizes that are not multiples of the 32-wide blocks are padded inside; products of bf16 values
    # are exact in fp32, so only the order of the fp32 sums separates it from the reference
    torch.manual_seed(0)
    w, bias = (torch.randn(n, k) / k**0.5).bfloat16(), torch.randn(n)
    x = torch.randn(2, 35, k).bfloat16()
    packed = cpu_kernels.amx_pack(w)
    y = cpu_kernels.amx_linear(x, packed, bias, n, False)
    assert y.shape == (2, 35, n) and y.dtype == torch.bfloat16
    ref = (x.float() @ w.float().T + bias).bfloat16()
    torch.testing.assert_close(y, ref, atol=1e-3, rtol=8e-3)
    assert torch.equal(cpu_kernels.amx_linear(x, packed, bias, n, True), torch.relu(y))
    no_bias = cpu_kernels.amx_linear(x, packed, None, n, False)
    torch.testing.assert_close(no_bias, (x.float() @ w.float().T).bfloat16(), atol=1e-3, rtol=8e-3)
    with pytest.raises(TypeError, match="bf16"):
        cpu_kernels.amx_linear(x.float(), packed, bias, n, False)


@amx
@pytest.mark.parametrize(("n", "k"), [(2304, 768), (768, 3072), (200, 72)])
def test_amx_linear_gives_a_row_the_same_bits_in_any_batch(n, k):
    # a speculative verification runs batch x (k+1) rows where a decode step runs batch rows; rows
    # go through in chunks of 256 (K = 768) or 128 (K = 3072), chunk edges must not show either;
    # K = 72 (not whole tile steps): every chunk's rows are copied, padded, between the chunks
    torch.manual_seed(0)
    w, x = torch.randn(n, k).bfloat16(), torch.randn(300, k).bfloat16()
    packed = cpu_kernels.amx_pack(w)
    full = cpu_kernels.amx_linear(x, packed, None, n, False)
    for rows in (slice(0, 1), slice(0, 5), slice(0, 40), slice(0, 257), slice(100, 140), slice(120, 200), slice(299, 300)):
        assert torch.equal(cpu_kernels.amx_linear(x[rows], packed, None, n, False), full[rows]), rows


@amx
@pytest.mark.parametrize(("n", "with_bias"), [(50272, False), (1000, True), (37, False)])
def test_amx_argmax_is_the_argmax_of_the_amx_linear(n, with_bias):
    # the pick from the fused epilogue must be the argmax of the logits amx_linear writes, by torch's
    # rules: first maximum (ties inside a block, across blocks and across the threads' column runs),
    # NaN first, infinities; partial last blocks (37 columns, 1000 = 31 blocks + 8)
    torch.manual_seed(0)
    k = 64
    x = torch.randn(70, k).bfloat16()
    w = torch.randn(n, k).bfloat16()
    w[n // 3] = x[10] * 4  # row 10's largest logit, and below, row 11's
    w[5] = x[11] * 4
    w[n // 2] = w[n // 3]  # equal columns, equal logits: a tie, in the other thread's columns
    w[n - 1] = w[n // 3]  # ... and in the last, partial block
    w[min(n - 1, 20)] = w[5]  # a tie within one block
    bias = None
    if with_bias:
        bias = torch.randn(n)
        bias[n // 2] = bias[n - 1] = bias[n // 3]
        bias[20] = bias[5]
    x[3] = 0  # every logit the bias's (or zero): the first maximum
    x[4, 0] = float("nan")  # every logit NaN: the first column
    x[5, 0] = float("inf")  # infinities of both signs, and NaN where they cancel
    x[6] *= 1e30  # logits past bf16's range: infinities
    packed = cpu_kernels.amx_pack(w)
    logits = cpu_kernels.amx_linear(x, packed, bias, n, False)
    expected = logits.max(dim=-1).indices
    assert torch.equal(cpu_kernels.argmax(logits), expected)
    wide = torch.cat([x, x], dim=1)[:, :k]  # the rows of a strided view (a column slice)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):  # the threads' column runs merge in order
            torch.set_num_threads(threads)
            assert torch.equal(cpu_kernels.amx_argmax(x, packed, bias, n), expected), threads
            assert torch.equal(cpu_kernels.amx_argmax(wide, packed, bias, n), expected), threads
            assert torch.equal(cpu_kernels.amx_argmax(x[7:12], packed, bias, n), expected[7:12]), threads
    finally:
        torch.set_num_threads(before)


def test_amx_is_left_out_of_the_avx2_build():
    # GENMILL_CPU_KERNELS=avx2 must give the AVX2 kernels only, on any CPU
    env = {**os.environ, "GENMILL_CPU_KERNELS": "avx2"}
    code = "from workers.llm import cpu_kernels as k; print(k.built_for(), k.amx_available())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["avx2", "False"]


# ---- fp32 linear on AVX2 + FMA ----


@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 3072, 768), (13, 100, 72), (200, 40, 300), (64, 2304, 768), (1400, 1536, 64)]
)
def test_fma_linear_is_the_fp32_linear(m, n, k):
    # row counts around the 6-row tiles and the 96-row chunks, N off the 16-column panels, K off the
    # 256-value slices, an output over 8 MiB (stored non-temporally); x with a row stride wider
    # than K (a column slice of a wider tensor)
    torch.manual_seed(0)
    w, bias = torch.randn(n, k) / k**0.5, torch.randn(n)
    x = torch.randn(m, k + 5)[:, 2 : 2 + k]
    packed = cpu_kernels.fma_pack(w)
    ref = (x.double() @ w.double().T + bias.double()).float()
    y = cpu_kernels.fma_linear(x, packed, bias, n, False)
    assert y.shape == (m, n)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(cpu_kernels.fma_linear(x, packed, bias, n, True), torch.relu(y))
    no_bias = cpu_kernels.fma_linear(x.reshape(1, m, k), packed, None, n, False)
    expected = (x.double() @ w.double().T).float().reshape(1, m, n)
    torch.testing.assert_close(no_bias, expected, atol=1e-5, rtol=1e-5)


def test_fma_linear_rejects_what_it_cannot_run():
    w = cpu_kernels.fma_pack(torch.randn(40, 64))
    with pytest.raises(TypeError, match="fp32"):
        cpu_kernels.fma_linear(torch.randn(3, 64).bfloat16(), w, None, 40, False)
    with pytest.raises(ValueError, match="do not fit K=32"):
        cpu_kernels.fma_linear(torch.randn(3, 32), w, None, 40, False)
    with pytest.raises(ValueError, match="bias"):
        cpu_kernels.fma_linear(torch.randn(3, 64), w, torch.randn(40).double(), 40, False)


def test_fma_linear_gives_a_row_the_same_bits_in_any_batch():
    # a speculative verification runs batch x (k+1) rows where a decode step runs batch rows
    torch.manual_seed(0)
    w, x = torch.randn(2304, 768), torch.randn(300, 768)
    packed = cpu_kernels.fma_pack(w)
    full = cpu_kernels.fma_linear(x, packed, None, 2304, False)
    for rows in (slice(0, 1), slice(0, 5), slice(0, 40), slice(0, 97), slice(100, 140), slice(299, 300)):
        assert torch.equal(cpu_kernels.fma_linear(x[rows], packed, None, 2304, False), full[rows]), rows


def test_packed_linears_run_the_fma_kernel_where_the_cpu_lacks_avx512():
    from workers.llm.model import PackedLinear

    flags = cpu_kernels._cpu_flags()
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 50)
    packed = PackedLinear(linear, batch_hint=8)
    assert packed.fma == ("avx512f" not in flags)
    x = torch.randn(9, 96)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x, "relu"), torch.relu(linear(x)), atol=1e-5, rtol=1e-5)
        if packed.fma:
            assert torch.equal(packed(x), cpu_kernels.fma_linear(x, packed.weight, linear.bias, 50, False))


# ---- fp32 and bf16 linear on AVX-512 ----


def _avx512_linear(dtype):
    return pytest.mark.skipif(
        not cpu_kernels.avx512_linear_available(dtype), reason=f"no AVX-512 kernel for {dtype} here"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "k"),
    [
        (1, 3072, 768), (13, 100, 72), (200, 40, 300), (64, 2304, 768), (1400, 1536, 64), (9, 17, 63),
        (70, 49, 3072),
    ],
)
def test_avx512_linear_is_the_linear_rounded_once(dtype, m, n, k):
    # row counts around the 8-row tiles and the row chunks, N off the 48-column panels (a narrow last
    # panel), K off the 128-step slices and odd (bf16: a zero completes the last pair), an fp32 output
    # over 8 MiB (stored non-temporally); x with a row stride wider than K
    if not cpu_kernels.avx512_linear_available(dtype):
        pytest.skip(f"no AVX-512 kernel for {dtype} here")
    torch.manual_seed(0)
    w, bias = (torch.randn(n, k) / k**0.5).to(dtype), torch.randn(n)
    x = torch.randn(m, k + 5)[:, 2 : 2 + k].to(dtype)
    packed = cpu_kernels.avx512_pack(w)
    assert packed.numel() == n * (k + k % 2 if dtype == torch.bfloat16 else k)  # nothing padded but K's pair
    ref = (x.double() @ w.double().T + bias.double()).to(dtype)
    y = cpu_kernels.avx512_linear(x, packed, bias, n, False)
    assert y.shape == (m, n) and y.dtype == dtype
    # products of bf16 values are exact in fp32: only the order of the sums (and one rounding) differ
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 8e-3}
    torch.testing.assert_close(y, ref, **tolerance)
    assert torch.equal(cpu_kernels.avx512_linear(x, packed, bias, n, True), torch.relu(y))
    no_bias = cpu_kernels.avx512_linear(x.reshape(1, m, k), packed, None, n, False)
    torch.testing.assert_close(no_bias, (x.double() @ w.double().T).to(dtype).reshape(1, m, n), **tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_avx512_linear_gives_a_row_the_same_bits_in_any_batch(dtype):
    # a speculative verification runs batch x (k+1) rows where a decode step runs batch rows; 700
    # rows span several row chunks
    if not cpu_kernels.avx512_linear_available(dtype):
        pytest.skip(f"no AVX-512 kernel for {dtype} here")
    torch.manual_seed(0)
    w, x = torch.randn(2304, 768).to(dtype), torch.randn(700, 768).to(dtype)
    packed = cpu_kernels.avx512_pack(w)
    full = cpu_kernels.avx512_linear(x, packed, None, 2304, False)
    for rows in (slice(0, 1), slice(0, 5), slice(0, 40), slice(0, 257), slice(100, 140), slice(699, 700)):
        assert torch.equal(cpu_kernels.avx512_linear(x[rows], packed, None, 2304, False), full[rows]), rows


@_avx512_linear(torch.float32)
def test_avx512_linear_rejects_what_it_cannot_run():
    w = cpu_kernels.avx512_pack(torch.randn(40, 64))
    with pytest.raises(TypeError, match="alike"):
        cpu_kernels.avx512_linear(torch.randn(3, 64).bfloat16(), w, None, 40, False)
    with pytest.raises(ValueError, match="does not fit K=32"):
        cpu_kernels.avx512_linear(torch.randn(3, 32), w, None, 40, False)
    with pytest.raises(ValueError, match="bias"):
        cpu_kernels.avx512_linear(torch.randn(3, 64), w, torch.randn(40).double(), 40, False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_linears_run_the_avx512_kernel_in_fp32_and_in_bf16_without_amx(dtype):
    from workers.llm.model import PackedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 50).to(dtype)
    packed = PackedLinear(linear, batch_hint=8)
    amx_bf16 = dtype == torch.bfloat16 and cpu_kernels.amx_available()
    expected = cpu_kernels.avx512_linear_available(dtype) and not amx_bf16
    assert packed.avx512 == expected
    x = torch.randn(9, 96).to(dtype)
    with torch.inference_mode():
        tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
        torch.testing.assert_close(packed(x, "relu"), torch.relu(linear(x)), **tolerance)
        if packed.avx512:
            bias = linear.bias.detach().float()
            assert torch.equal(packed(x), cpu_kernels.avx512_linear(x, packed.weight, bias, 50, False))

