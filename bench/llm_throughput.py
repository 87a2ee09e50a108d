"""LLM batch throughput: GenMill's LLMEngine against transformers' `generate`, same process.

    python -m bench.llm_throughput [--models opt llama] [--dtypes float32 bfloat16]
                                   [--modes eager decode] [--requests 64] [--new-tokens 64] [--no-write]

Models (random weights, `save_pretrained` safetensors, cached under --workdir):
  opt   - transformers `OPTConfig()` defaults (OPT-125m shape: 768 x 12 layers, ffn 3072, vocab 50272)
  llama - LlamaConfig 768 x 12 layers, 12 heads, intermediate 2048, vocab 32000 (~134M parameters)
Workload: --requests prompts of 110-128 random token ids (seeded), --new-tokens greedy tokens each,
EOS ignored on both sides (ours `ignore_eos`, transformers `min_new_tokens`), so both generate
exactly the same number of tokens. transformers runs the whole batch at once, left-padded; ours gets
the same ids as `prompt_ids` with max_batch_size = --requests. Figures are end to end (prefill +
decode), model load and compilation excluded (a warm-up call compiles); best of --repeats runs, with
transformers and every mode of ours alternating run by run (a shared machine's speed drifts), and
each repeat's own ratio (its transformers run over its run of ours) beside the best-of ratio.
Both sides run under the malloc settings the engine applies on the CPU (workers/llm/malloc.py,
set once before the first run), so the baseline gets the same allocator, not one that
page-faults its big activations while ours reuses them.

The machine's matmul throughput is measured in the same run (torch's default `F.linear` and the
engine's packed linear, fp32 and bf16, at a decode-like 64 x 768 x 3072 and a prefill-like
7680 x 768 x 3072 shape); prefill and decode GFLOP/s are reported as a fraction of the best matmul
rate of the run for that dtype (that table's, or a prefill's if one ran faster). The memory read bandwidth is measured too, and each row reports a
roofline ratio: transformers' time over the least time this machine needs for the matmuls (at the
best GEMM rate) plus the decode steps' KV-cache reads (at the read bandwidth), so that figures from
machines with different matmul units compare. Writes the "LLM batch throughput, <unit> CPU"
section of bench/RESULTS.md (one per matmul unit: AMX, AVX-512 bf16, AVX-512, AVX2).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import per_cpu, write_section
from workers.llm import malloc
from workers.llm.cpu_kernels import (
    amx_available,
    avx512_linear_available,
    fma_linear_available,
    int8_screen_available,
)
from workers.llm.engine import GenRequest, LLMEngine
from workers.llm.model import PackedLinear, widens_bf16
from workers.llm.sampling import SamplingParams

TITLE = "LLM batch throughput"  # one section per matmul unit (see bench.results.per_cpu)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# mode -> engine options; "full-head" (eager, greedy_screen off: every step runs the whole LM head)
# is not run by default, it measures what the greedy screens bring on a CPU where one applies
MODES: dict[str, dict] = {
    "eager": {"compile": False},
    "decode": {"compile": "decode"},
    "all": {"compile": "all"},
    "full-head": {"compile": False, "greedy_screen": False},
}
PROMPT_LENGTHS = (110, 128)
FIRST_ID = 4  # ids 0-3 are the tiny tokenizer's specials


# ---- checkpoints ----


def model_config(name: str) -> Any:
    import transformers as tf

    if name == "opt":
        return tf.OPTConfig()
    return tf.LlamaConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=2048,
        vocab_size=32000,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def checkpoint(root: Path, name: str) -> Path:
    """Build (once) a random checkpoint folder; the tiny SentencePiece tokenizer only serves decoding."""
    import transformers as tf

    from workers.llm.tiny import build_tiny_tokenizer

    folder = root / name
    if (folder / "model.safetensors").is_file():
        return folder
    cls = tf.OPTForCausalLM if name == "opt" else tf.LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(model_config(name)).eval()
    model.save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return folder


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ID, vocab) for _ in range(rng.randint(*PROMPT_LENGTHS))] for _ in range(n)]


# ---- matmul throughput ----


def _best_seconds(fn: Any, min_s: float = 0.5) -> float:
    """Best time of repeated calls of fn over about min_s seconds (after one warm-up call)."""
    fn()
    best = float("inf")
    deadline = time.perf_counter() + min_s
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _gflops(fn: Any, flop: float) -> float:
    return flop / _best_seconds(fn) / 1e9


def _packed_linear(weight: torch.Tensor, batch_hint: int) -> PackedLinear:
    """The engine's packed linear (no bias) over `weight` `[N, K]`."""
    with torch.device("meta"):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return PackedLinear(linear, batch_hint)


def matmul_table(dtypes: list[str]) -> dict[tuple[str, str, str], float]:
    """GFLOP/s per (dtype, shape, method); methods: torch's F.linear and the engine's `PackedLinear`
    (oneDNN with a packed weight, or GenMill's FMA kernel in fp32 on a CPU without AVX-512; for bf16,
    the AMX kernel on an AMX CPU, fp32 on a widened weight on a CPU without bf16 instructions)."""
    shapes = {"64x768x3072": (64, 768, 3072), "7680x768x3072": (7680, 768, 3072)}
    out: dict[tuple[str, str, str], float] = {}
    for dtype in dtypes:
        for label, (m, k, n) in shapes.items():
            x = torch.randn(m, k, dtype=DTYPES[dtype])
            weight = torch.randn(n, k, dtype=DTYPES[dtype])
            packed = _packed_linear(weight, m)
            flop = 2.0 * m * k * n
            with torch.inference_mode():
                out[dtype, label, "torch F.linear"] = _gflops(lambda x=x, w=weight: F.linear(x, w), flop)
                out[dtype, label, "packed"] = _gflops(lambda x=x, p=packed: p(x), flop)
    return out


def streamed_matmul(dtypes: list[str], ring_mib: int = 512, min_s: float = 1.0) -> dict[str, float]:
    """GFLOP/s of the engine's packed linear at the decode shape (64 x 768 x 3072) when its weight
    comes from memory, not cache: a ring of distinct weights, `ring_mib` in all, called in turn. A
    decode step reads every weight once and its KV cache in between, far more than the caches hold,
    so this is the rate its projections can expect; the matmul table's decode row reuses one weight."""
    m, k, n = 64, 768, 3072
    out: dict[str, float] = {}
    for dtype in dtypes:
        x = torch.randn(m, k, dtype=DTYPES[dtype])
        count = max(2, (ring_mib << 20) // (n * k * x.element_size()))
        ring = [_packed_linear(torch.randn(n, k, dtype=DTYPES[dtype]), m) for _ in range(count)]

        def round_trip(x: torch.Tensor = x, ring: list = ring) -> None:
            for packed in ring:
                packed(x)

        with torch.inference_mode():
            out[dtype] = 2.0 * m * k * n * count / _best_seconds(round_trip, min_s) / 1e9
        del ring
    return out


# ---- FLOP model ----


def read_bandwidth(mib: int = 512, min_s: float = 1.0) -> float:
    """The machine's memory read bandwidth (GB/s): best of repeated sums of a buffer far larger than
    the caches, as a plain read reaches it (an optimistic figure for strided reads)."""
    x = torch.ones(mib << 18)  # float32
    return x.numel() * 4 / _best_seconds(x.sum, min_s) / 1e9


@dataclass
class Flops:
    prefill: float
    decode: float
    decode_matmul: float  # the projections and LM head of the decode steps (no attention)
    kv_bytes: float  # KV cache read by the decode steps' attention


def count_flops(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> Flops:
    """Multiply-adds x 2 of the work actually needed: real prompt tokens (no padding), logits at the
    last prompt token only, attention over the causal prefix."""
    a = engine.model.args
    head = a.vocab_size * a.embed_dim
    linear = sum(
        m.in_features * m.out_features
        for name, m in engine.model.named_modules()
        if hasattr(m, "in_features") and name != "output"
    )
    attn = 2 * 2 * a.n_layers * a.n_heads * a.head_dim  # q.k and p.v per (query, key) pair
    prefill = sum(2 * linear * len(p) + 2 * head + attn * len(p) * (len(p) + 1) / 2 for p in prompts)
    decode = sum(2 * (linear + head) + attn * (len(p) + i + 1) for p in prompts for i in range(1, new_tokens))
    decode_matmul = 2 * (linear + head) * len(prompts) * (new_tokens - 1)
    kv_row = 2 * a.n_layers * a.n_kv_heads * a.head_dim * next(engine.model.parameters()).element_size()
    kv_bytes = sum(kv_row * (len(p) + i + 1) for p in prompts for i in range(1, new_tokens))
    return Flops(prefill, decode, decode_matmul, kv_bytes)


# ---- runs ----


def run_transformers(
    folder: Path, dtype: str, prompts: list[list[int]], new_tokens: int
) -> tuple[float, list]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 1
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding, as transformers wants for decoder-only batches
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    kwargs = {"do_sample": False, "num_beams": 1, "pad_token_id": pad}
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=2, **kwargs)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs
        )
        wall = time.perf_counter() - t0
    return wall, out[:, width:].tolist()


def requests(prompts: list[list[int]], new_tokens: int) -> list[GenRequest]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return [GenRequest(prompt_ids=p, params=params) for p in prompts]


def run_ours(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list, dict]:
    run = engine.generate(requests(prompts, new_tokens))
    metrics = {m.name: m.value for m in run.metrics}
    return metrics["wall_s"], [o.token_ids for o in run.outcomes], metrics


def agreement(ours: list[list[int]], ref: list[list[int]]) -> float:
    same = sum(a == b for x, y in zip(ours, ref) for a, b in zip(x, y))
    return same / max(1, sum(len(y) for y in ref))


# ---- report ----


def _avx512_kernel() -> bool:
    """Whether the engine's fp32 packed linears run GenMill's AVX-512 kernel here (see PackedLinear)."""
    return avx512_linear_available(torch.float32)


@dataclass
class Result:
    model: str
    dtype: str
    mode: str
    tokens_per_s: float
    ratio: float
    prefill_s: float
    prefill_gflops: float
    decode_s: float
    decode_tokens_per_s: float
    decode_gflops: float
    agreement: float
    compile_s: float
    matmul_flop: float  # prefill + decode matmuls (projections and LM head)
    kv_bytes: float  # the decode steps' KV-cache reads
    hf_s: float
    paired: tuple[float, ...]  # transformers' time over ours, repeat by repeat (the sides alternate)

    def roofline(self, peak: float, bandwidth: float) -> float:
        """transformers' time over the least time for the matmuls at `peak` GFLOP/s plus the KV reads
        at `bandwidth` GB/s, not overlapped."""
        return self.hf_s / (self.matmul_flop / peak / 1e9 + self.kv_bytes / bandwidth / 1e9)


def load_engine(
    folder: Path, dtype: str, mode: str, prompts: list, args: Any
) -> tuple[LLMEngine, Flops, float]:
    """An engine warmed up on the prompts (the warm-up call compiles); its work and compile time."""
    engine = LLMEngine.load(folder, dtype=dtype, max_batch_size=args.requests, **MODES[mode])
    try:
        flops = count_flops(engine, prompts, args.new_tokens)
        _, _, warm = run_ours(engine, prompts, 4)
    except BaseException:
        engine.close()
        raise
    return engine, flops, warm.get("compile_s", 0.0)


def result(
    name: str, dtype: str, mode: str, runs: list, hf_runs: list, flops: Flops, compile_s: float, args: Any
) -> Result:
    """The best of our runs against the best of transformers' runs, and each repeat's pair."""
    wall, tokens, m = min(runs, key=lambda r: r[0])
    hf = min(hf_runs, key=lambda r: r[0])
    if m.get("compile_s"):
        print(f"  warning: the timed run compiled for {m['compile_s']:.0f} s", flush=True)
    total = args.requests * args.new_tokens
    decode_tokens = m["generated_tokens"] - args.requests  # the first token comes from the prefill
    prefill_s = m["prompt_tokens"] / m["prefill_tokens_per_s"]
    decode_s = decode_tokens / m["decode_tokens_per_s"]
    hf_wall, hf_tokens = hf
    return Result(
        name,
        dtype,
        mode,
        total / wall,
        hf_wall / wall,
        prefill_s,
        flops.prefill / prefill_s / 1e9,
        decode_s,
        m["decode_tokens_per_s"],
        flops.decode / decode_s / 1e9,
        agreement(tokens, hf_tokens),
        compile_s,
        flops.prefill + flops.decode_matmul,
        flops.kv_bytes,
        hf_wall,
        tuple(h[0] / r[0] for h, r in zip(hf_runs, runs)),
    )


def measure(folder: Path, name: str, dtype: str, prompts: list, args: Any) -> tuple[float, list[Result]]:
    """transformers and our engine in every mode, alternating run by run (a shared machine's speed
    drifts by 10-30% over minutes: alternating spreads the drift over both sides instead of
    handing it to whichever ran later); best of --repeats each. Returns transformers' tok/s too."""
    engines = {}
    try:
        for mode in args.modes:
            engines[mode] = load_engine(folder, dtype, mode, prompts, args)
        hf_runs: list = []
        runs: dict[str, list] = {mode: [] for mode in args.modes}
        for _ in range(args.repeats):
            hf_runs.append(run_transformers(folder, dtype, prompts, args.new_tokens))
            for mode, (engine, _, _) in engines.items():
                runs[mode].append(run_ours(engine, prompts, args.new_tokens))
    finally:
        for engine, _, _ in engines.values():
            engine.close()
    hf = min(hf_runs, key=lambda r: r[0])
    results = [
        result(name, dtype, mode, runs[mode], hf_runs, *engines[mode][1:], args) for mode in args.modes
    ]
    return args.requests * args.new_tokens / hf[0], results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["opt", "llama"], choices=["opt", "llama"])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["eager", "decode", "all"],
        choices=list(MODES),
        help="eager; decode = compile the decode step; all = compile prefill and decode; full-head = "
        "eager without the greedy screens (not by default)",
    )
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="best of this many timed runs, each side")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (physical cores)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "genmill-bench-llm")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.malloc = malloc.reuse_freed_memory()  # both sides, from the first run on (see the docstring)
    load_before = os.getloadavg()[0]

    print("matmul throughput ...", flush=True)
    gemm = matmul_table(args.dtypes)
    for (dtype, shape, method), v in gemm.items():
        print(f"  {dtype:9} {shape:14} {method:15} {v:7.0f} GFLOP/s", flush=True)
    streamed = streamed_matmul(args.dtypes)
    for dtype, v in streamed.items():
        print(f"  {dtype:9} 64x768x3072    packed, weights from memory {v:7.0f} GFLOP/s", flush=True)
    bandwidth = read_bandwidth()
    print(f"  memory read {bandwidth:.1f} GB/s", flush=True)
    results: list[Result] = []
    baselines: dict[tuple[str, str], float] = {}
    for name in args.models:
        folder = checkpoint(args.workdir, name)
        prompts = make_prompts(args.requests, model_config(name).vocab_size)
        for dtype in args.dtypes:
            baselines[name, dtype], rows = measure(folder, name, dtype, prompts, args)
            print(f"{name} {dtype} transformers: {baselines[name, dtype]:7.1f} tok/s", flush=True)
            for r in rows:
                results.append(r)
                print(
                    f"{name} {dtype} ours/{r.mode}: {r.tokens_per_s:7.1f} tok/s = {r.ratio:.2f}x "
                    f"(prefill {r.prefill_s:.2f} s, {r.prefill_gflops:.0f} GFLOP/s; decode {r.decode_s:.2f} s, "
                    f"{r.decode_tokens_per_s:.0f} tok/s, {r.decode_gflops:.0f} GFLOP/s; same tokens as "
                    f"transformers {r.agreement:.1%}; compile {r.compile_s:.0f} s)",
                    flush=True,
                )
    body = report(args, gemm, streamed, bandwidth, baselines, results, (load_before, os.getloadavg()[0]))
    print(body)
    if not args.no_write:
        write_section(per_cpu(TITLE), body)


def report(
    args: argparse.Namespace,
    gemm: dict,
    streamed: dict[str, float],
    bandwidth: float,
    baselines: dict,
    results: list[Result],
    load: tuple[float, float],
) -> str:
    # the best matmul rate seen in this run: the table's, or a prefill's where one ran faster (a
    # shared machine's clock moves between the table and the runs; a ceiling below an achieved
    # rate would be no ceiling)
    peak = {
        d: max(
            [v for (dt, _, _), v in gemm.items() if dt == d]
            + [r.prefill_gflops for r in results if r.dtype == d]
        )
        for d in args.dtypes
    }
    lines = [
        (
            f"{args.requests} requests, prompts of {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]} random token ids, "
            f"{args.new_tokens} greedy tokens each (EOS ignored), batch {args.requests}, CPU, "
            f"{args.threads} torch threads, torch {torch.__version__}, best of {args.repeats} run(s) per "
            "side, the sides alternating run by run. "
            "End to end (prefill + decode); model load and compilation excluded. Random weights: token "
            "agreement with transformers is a sanity check (bf16 near-ties flip easily), not an accuracy "
            f"figure. Load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f} (a shared machine "
            "moves both sides by 10-30% between runs). malloc: "
            + (
                "blocks up to 256 MiB reused from the heap on both sides (workers/llm/malloc.py)."
                if args.malloc == "reuse"
                else f"{args.malloc} on both sides."
            )
        ),
        "",
        (
            "**Machine matmul throughput** (GFLOP/s, measured in this run; best of repeated calls; the "
            "engine's packed linear is oneDNN with a packed weight, or in fp32 on a CPU without AVX-512 "
            f"GenMill's AVX2 FMA tile kernel{' (the case here)' if fma_linear_available() else ''}; "
            "in fp32 on an AVX-512 CPU and in bf16 on one without AMX, GenMill's AVX-512 tile kernel"
            f"{' (the case here)' if _avx512_kernel() else ''}; in bf16, GenMill's AMX tile kernel "
            f"on a CPU with AMX{' (the case here)' if amx_available() else ''}, and fp32 on a weight "
            "widened once on a CPU without bf16 instructions"
            f"{' (the case here)' if widens_bf16() else ''}):"
        ),
        "",
        "| dtype | shape (MxKxN) | torch F.linear | engine's packed linear |",
        "| --- | --- | --- | --- |",
    ]
    for dtype in args.dtypes:
        for shape in ("64x768x3072", "7680x768x3072"):
            lines.append(
                f"| {dtype} | {shape} | {gemm[dtype, shape, 'torch F.linear']:.0f} "
                f"| {gemm[dtype, shape, 'packed']:.0f} |"
            )
    lines += [
        "",
        (
            "**The decode shape with its weights coming from memory** (the engine's packed linear over a "
            "ring of distinct 64x768x3072 weights, 512 MiB in all, as in a decode step, whose weights and "
            "KV cache far exceed the caches; the table's row reuses one cached weight): "
            + ", ".join(
                f"{d} {v:.0f} GFLOP/s ({v / gemm[d, '64x768x3072', 'packed']:.0%} of the cached rate, "
                f"{v / (2 * 64) * DTYPES[d].itemsize:.1f} GB/s of weights)"  # 2 x 64 FLOP per weight
                for d, v in streamed.items()
            )
            + "."
        ),
        "",
        f"**Memory read bandwidth**: {bandwidth:.1f} GB/s (best sum over a 512 MiB float32 buffer).",
    ]
    peaks = ", ".join(f"{d} {v:.0f} GFLOP/s" for d, v in peak.items())
    lines += [
        "",
        (
            "**Throughput** (generated tokens/s; ratio = ours / transformers `generate`, same model, "
            "dtype, prompts and batch, same process; mode: eager, decode = decode step compiled, all = "
            "prefill and decode compiled, full-head = eager with every step's whole LM head; GFLOP/s of the work actually needed (no padding, logits only "
            "where sampled) and its share of the best matmul rate of this run for that dtype (the table "
            f"above, or a prefill where one ran faster: {peaks}); roofline = the ratio a run would reach "
            "in the time the machine needs at least for the matmuls (prefill, decode projections and LM "
            "head at that best rate) plus the decode steps' KV-cache reads (at the read bandwidth above), "
            "without overlapping the two"
            + "".join(
                f"; in {dtype} here, all-greedy decode steps pick their tokens from {copy} of the LM head, "
                "exactly (workers/llm/logit_screen.py, eager mode), and their LM head is still counted "
                f"as {dtype} work, so {dtype} decode GFLOP/s and roofline are {dtype}-equivalent figures"
                for dtype, copy, applies in (
                    (
                        "float32",
                        "an int8 copy" if int8_screen_available(amx=True) else "a bf16 copy",
                        avx512_linear_available(torch.bfloat16),
                    ),
                    ("bfloat16", "an int8 copy", int8_screen_available(amx=amx_available())),
                )
                if applies
            )
            + "):"
        ),
        "",
        (
            "| model | dtype | mode | transformers tok/s | GenMill tok/s | ratio | each repeat "
            "| prefill s (GFLOP/s, share) | decode s (tok/s; GFLOP/s, share) | roofline | same tokens "
            "| compile s |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.dtype} | {r.mode} | {baselines[r.model, r.dtype]:.0f} | {r.tokens_per_s:.0f} "
            f"| **{r.ratio:.2f}x** | {' / '.join(f'{p:.2f}' for p in r.paired)} | {r.prefill_s:.2f} ({r.prefill_gflops:.0f}, "
            f"{r.prefill_gflops / peak[r.dtype]:.0%}) | {r.decode_s:.2f} ({r.decode_tokens_per_s:.0f}; "
            f"{r.decode_gflops:.0f}, {r.decode_gflops / peak[r.dtype]:.0%}) | {r.roofline(peak[r.dtype], bandwidth):.2f}x "
            f"| {r.agreement:.0%} "
            f"| {r.compile_s:.0f} |"
        )
    target = {"float32": 3.5, "bfloat16": 3.0}
    met = sum(r.ratio >= target.get(r.dtype, 0) for r in results)
    pairs = [p >= target.get(r.dtype, 0) for r in results for p in r.paired]
    lines += [
        "",
        (
            f"Targets: >= 3.5x transformers in float32, >= 3x in bfloat16; met in {met} of {len(results)} "
            f"rows (best run of each side), and in {sum(pairs)} of the {len(pairs)} single repeats (each "
            "repeat: transformers' time over ours in the same round of the alternation)."
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
