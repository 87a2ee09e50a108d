"""Quantization and compression memory/accuracy on an OPT-125m-shaped random model.

    python -m bench.quant_memory [--prompts 4] [--prompt-len 16] [--new-tokens 32]

Measures, against fp16 storage and fp32 compute:
  (b) 4-bit group-wise weight compression (FlexLLMGen: g64 along the input dim, asymmetric, fp16
      scale/min): weight bytes, logits relative error vs fp32 and greedy-token agreement, with
      transformers' OPTForCausalLM whose nn.Linear layers are swapped for CompressedLinear (the tied
      lm_head shares a CompressedEmbedding's storage; the small positional table is fake-compressed);
      int8 per-channel and int4 g64 weight-only quantization (workers/llm/quantize.py) likewise;
  (c) 4-bit KV cache (g64 along the head dim): bytes for batch 8 x 256 tokens from a real prefill,
      reconstruction error, and the same logits/agreement figures with the cache compressed as it
      fills.
Figures go to bench/RESULTS.md, section "Quantization and compression memory". No dependence on the
GenMill engine. Timings on a shared 2-core box are noisy; the byte counts and errors are not.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section
from workers.llm.compression import (
    KV_CONFIG,
    WEIGHT_CONFIG,
    CompressedEmbedding,
    CompressedKVCache,
    CompressedLinear,
    compress,
    fake_compress,
)
from workers.llm.quantize import Int4Linear, Int8Linear, enable_fast_kernels, quantize_model

TITLE = "Quantization and compression memory"
FP16 = 2


def build_model(seed: int = 0) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig()  # defaults are OPT-125m-shaped: hidden 768, 12 layers, ffn 3072, vocab 50272
    return OPTForCausalLM(cfg).eval()


def _unique_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    out = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        out.append((name, t))
    return out


def _is_weight_matrix(t: torch.Tensor) -> bool:
    return t.ndim == 2 and t.is_floating_point()


# ---------------------------------------------------------------------------------------------------
# memory


@dataclass
class WeightBytes:
    fp16_linear: int
    fp16_total: int
    linear: int
    total: int


def compressed_weight_bytes(model: nn.Module) -> WeightBytes:
    """FlexLLMGen accounting: every weight matrix (linears and embeddings) 4-bit, vectors fp16."""
    fp16_lin = fp16_tot = lin = tot = 0
    # the tied lm_head *is* the token embedding: count it as an embedding, not a linear layer
    linear_ids = {
        id(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n
    }
    for name, t in _unique_tensors(model):
        dense = t.numel() * FP16
        packed = compress(t.detach().half(), WEIGHT_CONFIG).nbytes if _is_weight_matrix(t) else dense
        fp16_tot += dense
        tot += packed
        if id(t) in linear_ids:
            fp16_lin += dense
            lin += packed
    return WeightBytes(fp16_lin, fp16_tot, lin, tot)


def quantized_weight_bytes(qmodel: nn.Module, fp_model: nn.Module) -> WeightBytes:
    """Quantized linears at their stored size; everything else (embeddings, norms, biases) fp16."""
    fp = compressed_weight_bytes(fp_model)
    lin = 0
    for mod in qmodel.modules():
        if isinstance(mod, (Int8Linear, Int4Linear)):
            lin += sum(b.numel() * b.element_size() for n, b in mod.named_buffers() if n != "bias")
            lin += 0 if mod.bias is None else mod.bias.numel() * FP16
    bias_fp16 = sum(
        m.bias.numel() * FP16
        for n, m in fp_model.named_modules()
        if isinstance(m, nn.Linear) and m.bias is not None
    )
    # fp16_linear counts weights only; add their biases on both sides so the ratio is like for like
    return WeightBytes(
        fp.fp16_linear + bias_fp16, fp.fp16_total, lin, fp.fp16_total - fp.fp16_linear - bias_fp16 + lin
    )


def matrix_errors(model: nn.Module, int8_model: nn.Module, int4_model: nn.Module) -> dict[str, float]:
    """Relative Frobenius error ||W - W_hat|| / ||W|| over all 72 decoder projections."""
    num = {"4-bit": 0.0, "int8": 0.0, "int4": 0.0}
    den = 0.0
    q8 = dict(int8_model.named_modules())
    q4 = dict(int4_model.named_modules())
    for name, lin in model.named_modules():
        if type(lin) is not nn.Linear or "lm_head" in name:
            continue
        w = lin.weight.detach()
        den += float(w.pow(2).sum())
        num["4-bit"] += float((fake_compress(w.half(), WEIGHT_CONFIG).float() - w).pow(2).sum())
        num["int8"] += float((q8[name].dequantized_weight() - w).pow(2).sum())
        num["int4"] += float((q4[name].dequantized_weight() - w).pow(2).sum())
    return {k: (v / den) ** 0.5 for k, v in num.items()}


# ---------------------------------------------------------------------------------------------------
# model variants (all compute in fp32; only the stored weights differ)


def compressed_variant(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear for a CompressedLinear built from the fp16 weight (what would be stored)."""
    m = copy.deepcopy(model)
    dec = m.model.decoder
    emb = CompressedEmbedding.from_embedding(dec.embed_tokens, WEIGHT_CONFIG, dtype=torch.float16)
    for name, lin in [(n, x) for n, x in m.named_modules() if type(x) is nn.Linear and "lm_head" not in n]:
        parent, _, child = name.rpartition(".")
        setattr(
            m.get_submodule(parent), child, CompressedLinear.from_linear(lin, WEIGHT_CONFIG, torch.float16)
        )
    dec.embed_tokens = _Fp32Out(emb)
    m.lm_head = emb.as_linear()  # tied: shares the packed embedding
    with torch.no_grad():  # OPT's learned positions subclass nn.Embedding with an offset; fake-quantize it
        pos = dec.embed_positions.weight
        pos.copy_(fake_compress(pos.half(), WEIGHT_CONFIG).float())
    return m


class _Fp32Out(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids).float()


def fp16_weights_variant(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


# ---------------------------------------------------------------------------------------------------
# generation and metrics


KVHook = Callable[[object], None]


def kv_compress_hook() -> tuple[KVHook, dict[str, int]]:
    """After each forward, replace the cache's new positions by their 4-bit (fp16-param) round trip:
    numerically what a cache stored with CompressedKVCache hands back."""
    state = {"done": 0}

    def hook(cache) -> None:
        n = cache.layers[0].keys.shape[-2]
        lo = state["done"]
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                t[..., lo:n, :] = fake_compress(t[..., lo:n, :].half(), KV_CONFIG).float()
        state["done"] = n

    return hook, state


@torch.no_grad()
def greedy(
    model: nn.Module,
    prompt: torch.Tensor,
    n: int,
    hook: KVHook | None = None,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Greedy decode ``n`` tokens with the KV cache. With ``forced`` ([B, n]) the given tokens are fed
    instead of the model's own (teacher forcing), so logits are compared on the same context.
    Returns (tokens, logits [B, n, V], ms per decode step)."""
    out = model(input_ids=prompt, use_cache=True)
    cache = out.past_key_values
    if hook:
        hook(cache)
    logits = [out.logits[:, -1].float()]
    toks = [logits[-1].argmax(-1)]
    t0 = time.perf_counter()
    for i in range(n - 1):
        feed = toks[-1] if forced is None else forced[:, i]
        out = model(input_ids=feed[:, None], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        if hook:
            hook(cache)
        logits.append(out.logits[:, -1].float())
        toks.append(logits[-1].argmax(-1))
    ms = (time.perf_counter() - t0) / max(n - 1, 1) * 1e3
    return torch.stack(toks, 1), torch.stack(logits, 1), ms


@dataclass
class Accuracy:
    rel_err: float
    top1_forced: float
    free_match: float
    first_diverge: float
    ms_step: float


def accuracy(
    model: nn.Module,
    prompt: torch.Tensor,
    ref_tokens: torch.Tensor,
    ref_logits: torch.Tensor,
    hook_factory: Callable[[], KVHook] | None = None,
) -> Accuracy:
    n = ref_tokens.shape[1]
    _, logits, _ = greedy(model, prompt, n, hook_factory() if hook_factory else None, forced=ref_tokens)
    rel = float((logits - ref_logits).norm() / ref_logits.norm())
    top1 = float((logits.argmax(-1) == ref_tokens).float().mean())
    toks, _, ms = greedy(model, prompt, n, hook_factory() if hook_factory else None)
    same = toks == ref_tokens
    first = (~same).float().cumsum(1).eq(0).sum(1).float().mean()  # tokens before the first mismatch
    return Accuracy(rel, top1, float(same.float().mean()), float(first), ms)


@torch.no_grad()
def kv_cache_figures(model: nn.Module, batch: int, seq: int) -> dict[str, float]:
    """Prefill batch x seq random tokens, store every layer's K/V in a CompressedKVCache (fp16)."""
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq))
    cache = model.model.decoder(input_ids=ids, use_cache=True).past_key_values
    packed = dense = 0
    num = den = 0.0
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        b, h, s, d = k.shape
        kv = CompressedKVCache(b, h, s, d, dtype=torch.float16)
        kv.write(0, k, v)
        kk, vv = kv.get(dtype=torch.float32)
        packed += kv.nbytes
        dense += kv.dense_nbytes(torch.float16)
        num += float((kk - k).pow(2).sum() + (vv - v).pow(2).sum())
        den += float(k.pow(2).sum() + v.pow(2).sum())
    return {"packed": packed, "dense": dense, "rel_err": (num / den) ** 0.5, "shape": (batch, h, seq, d)}


def layer_timings(rows: int = 4, reps: int = 20) -> list[tuple[str, float]]:
    """ms per call of one 3072x768 (fc1-shaped) layer; min over reps to damp noise."""
    torch.manual_seed(2)
    lin = nn.Linear(768, 3072)
    x32 = torch.randn(rows, 768)
    xbf = x32.bfloat16()
    comp = CompressedLinear.from_linear(lin, WEIGHT_CONFIG, torch.float16)
    i8, i4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 64)
    wbf, bbf = lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
    i8f, i4f = copy.deepcopy(i8), copy.deepcopy(i4)
    holder = nn.Sequential(i8f, i4f)
    enable_fast_kernels(holder)
    cases: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("fp32 nn.Linear", lambda: lin(x32)),
        ("bf16 F.linear", lambda: F.linear(xbf, wbf, bbf)),
        ("4-bit CompressedLinear (fp32 compute)", lambda: comp(x32)),
        ("int8 Int8Linear (fp32)", lambda: i8(x32)),
        ("int4 Int4Linear dequant+matmul (fp32)", lambda: i4(x32)),
        ("int8 bf16 _weight_int8pack_mm" if i8f.fast_kernel else "int8 bf16 (no kernel)", lambda: i8f(xbf)),
        (
            "int4 bf16 _weight_int4pack_mm_for_cpu" if i4f.fast_kernel else "int4 bf16 (no kernel)",
            lambda: i4f(xbf),
        ),
    ]
    out = []
    with torch.no_grad():
        for name, fn in cases:
            fn()
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            out.append((name, best * 1e3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kv-batch", type=int, default=8)
    ap.add_argument("--kv-seq", type=int, default=256)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core box, 2 OpenMP threads run ~4x slower)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model = build_model()
    mb = 1e6

    # (b) weight memory
    comp_b = compressed_weight_bytes(model)
    int8_model = quantize_model(copy.deepcopy(model), "int8")
    int4_model = quantize_model(copy.deepcopy(model), "int4", group_size=64)
    q8_b, q4_b = quantized_weight_bytes(int8_model, model), quantized_weight_bytes(int4_model, model)
    mat_err = matrix_errors(model, int8_model, int4_model)

    # (c) KV cache memory on real K/V
    kv = kv_cache_figures(model, args.kv_batch, args.kv_seq)

    # accuracy: fp32 greedy reference, then every variant teacher-forced on it and free-running
    torch.manual_seed(3)
    prompt = torch.randint(3, model.config.vocab_size, (args.prompts, args.prompt_len))
    ref_tokens, ref_logits, ref_ms = greedy(model, prompt, args.new_tokens)
    comp_model = compressed_variant(model)
    variants: list[tuple[str, nn.Module, Callable[[], KVHook] | None]] = [
        ("fp16 weights (rounding only)", fp16_weights_variant(model), None),
        ("4-bit weights, g64 (CompressedLinear)", comp_model, None),
        ("int8 weight-only, per channel", int8_model, None),
        ("int4 weight-only, g64", int4_model, None),
        ("4-bit KV cache (fp32 weights)", model, lambda: kv_compress_hook()[0]),
        ("4-bit weights + 4-bit KV cache", comp_model, lambda: kv_compress_hook()[0]),
    ]
    acc = {name: accuracy(m, prompt, ref_tokens, ref_logits, hf) for name, m, hf in variants}
    timings = layer_timings()
    elapsed = time.perf_counter() - t_start

    def ratio(a: int, b: int) -> str:
        return f"{a / b:.1%}"

    def row(*cells: object) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    shape = kv["shape"]
    lines = [
        "OPT-125m-shaped random model (transformers `OPTConfig()` defaults, seed 0, init std 0.02), CPU,",
        f"{args.threads} torch thread(s).",
        "",
        "**(b) Weight memory.** fp16 = 2 bytes/value; 4-bit = packed codes + fp16 scale/min per 64 values;",
        "int8 = int8 + fp32 scale per row; int4 = packed codes + bf16 scale/zero per 64 values.",
        "",
        row("storage", "linear layers (MB)", "vs fp16", "whole model (MB)", "vs fp16"),
        row(*["---"] * 5),
        row("fp16", f"{comp_b.fp16_linear / mb:.1f}", "100%", f"{comp_b.fp16_total / mb:.1f}", "100%"),
    ]
    for name, b in (
        ("4-bit g64, every weight matrix incl. embeddings (FlexLLMGen)", comp_b),
        ("int8 per channel (linears; embeddings fp16)", q8_b),
        ("int4 g64 (linears; embeddings fp16)", q4_b),
    ):
        lines.append(
            row(
                name,
                f"{b.linear / mb:.1f}",
                ratio(b.linear, b.fp16_linear),
                f"{b.total / mb:.1f}",
                ratio(b.total, b.fp16_total),
            )
        )
    lines += [
        "",
        '"Linear layers" = the 72 decoder projections (the tied lm_head is the token embedding);',
        "the int8/int4 linear columns count biases in fp16 on both sides.",
        "",
        (
            f"**(c) KV cache memory**, batch {shape[0]} x {shape[2]} tokens, 12 layers, K and V"
            f" `[B, {shape[1]}, S, {shape[3]}]` from a real prefill: fp16 {kv['dense'] / mb:.1f} MB,"
            f" 4-bit g64 {kv['packed'] / mb:.1f} MB = **{ratio(kv['packed'], kv['dense'])}** of fp16;"
            f" relative reconstruction error of the K/V {kv['rel_err']:.3f}."
        ),
        "",
        (
            f"**Accuracy vs fp32**: {args.prompts} random prompts x {args.prompt_len} tokens,"
            f" {args.new_tokens} greedy tokens. Logits error and top-1 agreement are teacher-forced on the fp32"
            " tokens; free-running = share of generated tokens equal to fp32's, and mean tokens before the"
            " first mismatch."
        ),
        "",
        row(
            "variant",
            "logits rel. error",
            "top-1 agreement (forced)",
            "free-running match",
            "tokens before divergence",
            f"ms / decode step (batch {args.prompts})",
        ),
        row(*["---"] * 6),
        row("fp32 reference", 0, "100%", "100%", args.new_tokens, f"{ref_ms:.0f}"),
    ]
    for name, a in acc.items():
        lines.append(
            row(
                name,
                f"{a.rel_err:.4f}",
                f"{a.top1_forced:.1%}",
                f"{a.free_match:.1%}",
                f"{a.first_diverge:.1f}",
                f"{a.ms_step:.0f}",
            )
        )
    lines += [
        "",
        f"Relative error of the weight matrices themselves (72 projections): 4-bit g64 {mat_err['4-bit']:.3f},",
        f"int8 {mat_err['int8']:.4f}, int4 g64 {mat_err['int4']:.3f}. For a Gaussian group of 64 the",
        "rounding error is ~step/sqrt(12) with step = range/15, i.e. ~0.09 of the weights' rms; on this",
        "random model those errors compound through 12 layers into the logits error above.",
        "Random weights also give nearly flat next-token distributions (top-1 vs top-2 probability gap",
        "~1e-4), so greedy agreement is a harsh test: any perturbation flips near-ties. CompressedLinear",
        "decompresses every weight on every call in fp32 (nothing cached: memory is the point), hence",
        "its per-step cost.",
        "",
        "One fc1-shaped layer (3072x768), batch 4, best of 20 calls (ms; shared machine, noisy):",
        "",
        row("path", "ms"),
        row("---", "---"),
    ]
    lines += [row(name, f"{ms:.2f}") for name, ms in timings]
    lines += ["", f"Bench wall time {elapsed:.0f} s. Script: `python -m bench.quant_memory`."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
