"""Continuous batching, dtype and compile options of workers.llm on tiny random checkpoints.

Correctness only (timings live in bench/llm_throughput.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import workers.llm.generate as generate_module
from workers.llm.engine import Completion, GenRequest, LLMEngine
from workers.llm.generate import batch_bucket, prefill_groups
from workers.llm.loader import load_checkpoint
from workers.llm.model import PackedLinear, can_pack_linears, pack_linears, widens_bf16
from workers.llm.sampling import SamplingParams
from workers.llm.tiny import build_tiny_checkpoint

pytest.importorskip("transformers")


PROMPTS = [
    "The mill stood",
    "In spring the river was high and brown with mud from the hills. The wheel began",
    "What is the weather like today?",
    "Please bring me",
    "A careful record is worth more than a clever guess, and",
    "The river",
    "Where the old road meets the water, the miller",
]
MAX_TOKENS = [12, 5, 9, 1, 3, 14, 7]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm_batching")
    return {arch: build_tiny_checkpoint(root / arch, arch=arch, seed=5) for arch in ("llama", "opt")}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def token_ids(engine: LLMEngine, reqs: list[GenRequest]) -> list[list[int]]:
    outcomes = engine.generate(reqs).outcomes
    assert all(isinstance(o, Completion) for o in outcomes), outcomes
    return [o.token_ids for o in outcomes]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_continuous_batching_equals_one_at_a_time(folders, arch, monkeypatch):
    reqs = [GenRequest(prompt=p, params=greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    solo = LLMEngine.load(folders[arch], max_batch_size=1)
    small = LLMEngine.load(folders[arch], max_batch_size=3)
    prefilled: list[list[int]] = []
    real_prefill = generate_module.prefill

    def spy(model, prompts, *args, **kwargs):
        prefilled.append(kwargs.get("cache_rows") or args[2])
        return real_prefill(model, prompts, *args, **kwargs)

    try:
        alone = [token_ids(solo, [r])[0] for r in reqs]
        monkeypatch.setattr(generate_module, "prefill", spy)
        batched = token_ids(small, reqs)
    finally:
        solo.close()
        small.close()
    assert batched == alone
    assert [len(t) for t in batched] == MAX_TOKENS
    # finished rows were refilled: more prefills than batches, into cache rows 0..2 only
    assert len(prefilled) > 3
    assert {row for rows in prefilled for row in rows} <= {0, 1, 2}


def test_sampled_outputs_do_not_depend_on_batch_composition(folders):
    mine = [
        GenRequest(
            prompt=PROMPTS[0], params=SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=42)
        ),
        GenRequest(prompt=PROMPTS[2], params=SamplingParams(max_tokens=6, top_k=30, seed=7)),
    ]
    others = [
        GenRequest(prompt=p, params=SamplingParams(max_tokens=n, seed=i))
        for i, (p, n) in enumerate(zip(PROMPTS[3:], MAX_TOKENS[3:]))
    ]
    wide = LLMEngine.load(folders["llama"], max_batch_size=8)
    narrow = LLMEngine.load(folders["llama"], max_batch_size=2)
    try:
        alone = [token_ids(wide, [r])[0] for r in mine]
        crowd = token_ids(wide, [others[0], mine[0], *others[1:], mine[1]])
        queued = token_ids(narrow, [*others, *mine])
    finally:
        wide.close()
        narrow.close()
    assert [crowd[1], crowd[-1]] == alone
    assert queued[-2:] == alone


def test_bfloat16_agrees_with_float32_on_most_greedy_tokens(folders):
    reqs = [GenRequest(prompt=p, params=greedy(8)) for p in PROMPTS]
    fp32 = LLMEngine.load(folders["opt"], dtype="float32")
    bf16 = LLMEngine.load(folders["opt"], dtype="bfloat16")
    try:
        a, b = token_ids(fp32, reqs), token_ids(bf16, reqs)
    finally:
        fp32.close()
        bf16.close()
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert same >= 0.75 * sum(len(r) for r in a), (a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("k", "n"), [(2048, 64), (768, 2304)])
def test_packed_linear_gives_a_row_the_same_bits_in_any_batch(dtype, k, n):
    # a speculative verification (batch x (k+1) rows) must score a token exactly as the decode
    # step (batch rows) it stands for; oneDNN's fp32 one-row path and its bf16 kernels from 33 rows
    # on round differently on some CPUs, which PackedLinear works around (see its docstring)
    if not can_pack_linears(torch.nn.Linear(k, n).to(dtype)):
        pytest.skip("oneDNN packing is not available here")
    from workers.llm import cpu_kernels

    own_bf16 = cpu_kernels.amx_available() or cpu_kernels.avx512_linear_available(torch.bfloat16)
    if dtype == torch.bfloat16 and not (own_bf16 or widens_bf16()):
        pytest.skip("bf16 runs oneDNN's own kernels here, which promise nothing across row counts")
    torch.manual_seed(0)
    packed = PackedLinear(torch.nn.Linear(k, n).to(dtype), batch_hint=8)
    x = torch.randn(45, k).to(dtype)
    with torch.inference_mode():
        full = packed(x)
        for m in (1, 2, 8, 40):
            assert torch.equal(packed(x[:m]), full[:m]), m
        assert torch.equal(packed(x[0]), full[0])  # a single row as a 1-D input


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_linears_match_dense_logits(folders, dtype):
    dense = load_checkpoint(folders["llama"], dtype=dtype).model
    packed = load_checkpoint(folders["llama"], dtype=dtype).model
    if not can_pack_linears(packed):
        pytest.skip("oneDNN packing is not available here")
    n_params = sum(p.numel() for p in dense.parameters())
    assert pack_linears(packed, batch_hint=4) == 2 * 7 + 1  # q, k, v, o, w1, w2, w3 per layer + head
    assert isinstance(packed.layers[0].attention.wq, PackedLinear)
    assert sum(p.numel() for p in packed.parameters()) == n_params
    tokens = torch.tensor([[1, 45, 57, 50, 76, 268], [1, 35, 269, 6, 7, 8]])
    pos = torch.arange(6).expand(2, 6)
    models = [dense, packed] + ([] if dtype == "float32" else [load_checkpoint(folders["llama"]).model])
    outs = []
    for model in models:
        model.setup_caches(2, 16, next(model.parameters()).dtype, "cpu")
        with torch.inference_mode():
            outs.append(model(tokens, pos).float())
    if dtype == "float32":
        torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    else:
        # bf16 roundings differ between GEMMs (oneDNN's bf16 one, or fp32 on widened weights where
        # the CPU has no bf16 instructions); packed must be as close to the fp32 model as dense is
        dense_err, packed_err = ((out - outs[2]).abs() for out in outs[:2])
        assert packed_err.mean() <= 1.25 * dense_err.mean(), (packed_err.mean(), dense_err.mean())
        assert packed_err.max() <= 1.25 * dense_err.max() + 0.02, (packed_err.max(), dense_err.max())


def test_engine_options_are_validated(folders):
    folder = folders["opt"]
    bad = [
        ({"dtype": "float64"}, "float64"),
        ({"compile": "sometimes"}, "compile"),
        ({"max_batch_tokens": 0}, "max_batch_tokens"),
        ({"prefill_chunk_tokens": True}, "prefill_chunk_tokens"),
        ({"packed_linears": "yes"}, "packed_linears"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            LLMEngine.load(folder, **options)


def test_max_batch_tokens_limits_cache_rows(folders, monkeypatch):
    engine = LLMEngine.load(folders["opt"], max_batch_size=8, max_batch_tokens=128)
    rows: list[int] = []
    setup = engine.model.setup_caches
    monkeypatch.setattr(engine.model, "setup_caches", lambda b, *a: (rows.append(b), setup(b, *a)))
    try:
        got = token_ids(engine, [GenRequest(prompt=p, params=greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS)])
    finally:
        engine.close()
    assert [len(t) for t in got] == MAX_TOKENS
    assert rows == [2]  # 128 cache slots / 64 (cache length, rounded up to 64 on the CPU) = 2 rows


def test_prefill_groups_split_on_padding_and_budget():
    # small groups take padding rather than run smaller matmuls
    assert prefill_groups([10, 11, 12, 11], max_tokens=1000) == [[0, 1, 3, 2]]
    # big ones split: 1300 with the others would be 17% padding
    assert prefill_groups([1000, 1300, 1010, 1020], max_tokens=10**5) == [[0, 2, 3], [1]]
    assert prefill_groups([10] * 5, max_tokens=20) == [[0, 1], [2, 3], [4]]
    assert [batch_bucket(n, 48) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]


def test_stop_string_found_incrementally(folders):
    engine = LLMEngine.load(folders["llama"])
    try:
        full = engine.generate([GenRequest(prompt=PROMPTS[1], params=greedy(30))]).outcomes[0]
        stop = full.text[-6:-3]  # late in the completion: the tail window must still catch it
        cut = full.text.index(stop)
        params = SamplingParams(max_tokens=30, temperature=0, stop=[stop])
        got = engine.generate([GenRequest(prompt=PROMPTS[1], params=params)]).outcomes[0]
    finally:
        engine.close()
    assert got.finish_reason == "stop" and got.text == full.text[:cut]
    assert got.token_ids == full.token_ids[: len(got.token_ids)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["decode", "all"])
def test_compiled_decode_equals_eager(folders, mode):
    """One small model; rows finish at different steps and are refilled, so the compiled step sees
    several batch sizes (on the CPU one graph with a dynamic batch serves them all). Prompts longer
    than 8 tokens take the CPU kernels' prompt path, which "all" compiles too."""
    reqs = [GenRequest(prompt=p, params=greedy(n)) for p, n in zip(PROMPTS[:5], MAX_TOKENS[:5])]
    eager = LLMEngine.load(folders["llama"], max_batch_size=3)
    compiled = LLMEngine.load(folders["llama"], max_batch_size=3, compile=mode)
    try:
        expected = token_ids(eager, reqs)
        first = compiled.generate(reqs)
        again = compiled.generate(reqs[::-1])
    finally:
        eager.close()
        compiled.close()
    assert [o.token_ids for o in first.outcomes] == expected
    assert [o.token_ids for o in again.outcomes] == expected[::-1]
    assert {m.name: m.value for m in first.metrics}.get("compile_s", 0) > 0
    assert "compile_s" not in {m.name for m in again.metrics}  # compiled once, reused by later calls


def _step_logits(model, dtype: torch.dtype) -> torch.Tensor:
    """Prefill 3 right-padded rows in two prompt chunks of 10 positions, then 3 decode steps at
    per-row positions; the logits of every forward."""
    prompts = torch.randint(4, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    lengths = [20, 13, 16]
    model.setup_caches(3, 40, dtype, "cpu")
    out = []
    with torch.inference_mode():
        for start in (0, 10):
            pos = torch.arange(start, start + 10).expand(3, 10)
            last = torch.tensor([min(max(n - 1 - start, 0), 9) for n in lengths])
            chunk = prompts[:, start : start + 10]
            out.append(model(chunk, pos, logits_index=last, kv_len=start + 10, prompt_chunk=True).float())
        for step in range(3):
            pos = torch.tensor([[n + step] for n in lengths])
            tokens = torch.tensor([[11 + step], [12], [13]])
            zero = torch.zeros(3, dtype=torch.long)
            out.append(model(tokens, pos, logits_index=zero, kv_len=int(pos.max()) + 1).float())
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_cpu_kernels_match_torch(folders, arch):
    # decode steps (RoPE, cache write, attention), prompt chunks, RMSNorm and the SwiGLU gate in
    # the CPU kernels give the logits of the torch path: Llama here has GQA (4 heads, 2 kv heads)
    # and RoPE, OPT learned positions and a pre-scaled query
    from workers.llm import cpu_kernels
    from workers.llm.model import enable_cpu_kernels, fuse_projections

    if not cpu_kernels.available():
        pytest.skip("no AVX2/AVX-512 or no g++: the kernels are not built here")
    logits = {}
    for dtype in ("float32", "bfloat16"):
        for kernels in (False, True):
            model = load_checkpoint(folders[arch], dtype=dtype).model
            if kernels:
                assert fuse_projections(model) == (2 if arch == "llama" else 1) * model.args.n_layers
                assert enable_cpu_kernels(model)
            logits[dtype, kernels] = _step_logits(model, getattr(torch, dtype))
    exact = logits["float32", False]
    torch.testing.assert_close(logits["float32", True], exact, atol=1e-4, rtol=1e-4)
    # bf16: the kernels accumulate in fp32, so they stay about as close to fp32 as torch's bf16 path
    err_kernels = (logits["bfloat16", True] - exact).abs().max()
    err_torch = (logits["bfloat16", False] - exact).abs().max()
    assert err_kernels <= 1.25 * err_torch, (err_kernels, err_torch)


def test_length_groups_keep_full_batches_and_split_long_from_short(folders):
    engine = LLMEngine.load(folders["opt"], max_batch_size=2)
    try:
        reqs = [
            GenRequest(prompt_ids=[5] * n, params=greedy(m))
            for n, m in [(3, 1), (100, 100), (4, 2), (90, 100), (2, 2), (80, 90)]
        ]
        items = [engine._prepare(i, r) for i, r in enumerate(reqs)]
        groups = [[it.index for it in g] for g in engine._length_groups(items)]
    finally:
        engine.close()
    # longest first; the short ones (< half the longest) start a new run once a run has a full batch
    assert groups == [[1, 3, 5], [2, 0, 4]]
