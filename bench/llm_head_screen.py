"""The greedy pick of a decode step's LM head: the full head and its argmax against the screens that
pick the same tokens from a cheaper copy of the head (workers/llm/logit_screen.py), same process.

    python -m bench.llm_head_screen [--models opt llama] [--rows 64] [--no-write]

The head's input is what a decode step feeds it: the final normed hidden state at the last position
of --rows prompts of the throughput benchmark (bench/llm_throughput.py: the same random checkpoints
and prompts), from transformers' forward. Each variant picks every row's token and must give the
full head's picks; timings are the best of repeated calls, each after a read of 256 MiB of other
data (untimed), so that the head and its copies come from memory every call, as in a decode step,
whose weights and KV cache far exceed the caches. Variants, where this CPU runs them:

  bf16 head         the engine's bf16 head (AMX tiles on an AMX CPU, else the AVX-512 kernel) + argmax
  bf16 head, argmax fused  AmxHeadArgmax: the AMX head with its argmax in the epilogue (AMX CPUs)
  bf16 head, AVX-512  the AVX-512 kernel's bf16 head + argmax (the head a CPU without AMX runs)
  int8 screen       Int8LogitScreen: int8 copy, exact pass over the doubtful logits (AVX512_VNNI)
  int8 screen, AMX  the same for the AMX head: TDPBUSD sums, the exact pass on the bf16 tiles
  fp32 head         the engine's fp32 head + argmax
  bf16 screen       LogitScreen: bf16 copy of the fp32 head, exact pass (AVX512_BF16)
  int8 screen, fp32 head  Int8LogitScreen of the fp32 head (its sums on AMX tiles where there are)

Writes the "LLM greedy head pick, <unit> CPU" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from bench import results
from bench.llm_throughput import checkpoint, make_prompts
from workers.llm import cpu_kernels
from workers.llm.logit_screen import AmxHeadArgmax, Int8LogitScreen, LogitScreen
from workers.llm.model import PackedLinear

TITLE = "LLM greedy head pick"


def hidden_rows(folder: Path, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last position's final normed hidden state of `rows` benchmark prompts `[rows, K]` (fp32),
    and the LM head's weight `[V, K]` (fp32)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    states = []
    with torch.inference_mode():
        for prompt in make_prompts(rows, vocab):
            out = model(torch.tensor([prompt]), output_hidden_states=True)
            states.append(out.hidden_states[-1][0, -1])
    return torch.stack(states), model.get_output_embeddings().weight.detach().clone()


EVICT_MIB = 256


def best_ms(fn: Callable[[], torch.Tensor], evict: torch.Tensor, min_s: float = 1.0) -> tuple[float, int]:
    """The best time of repeated calls of `fn` (ms), each after a read of `evict` (untimed), and how
    many calls were timed."""
    best, calls, start = float("inf"), 0, time.perf_counter()
    while time.perf_counter() - start < min_s:
        evict.sum()
        t = time.perf_counter()
        fn()
        best, calls = min(best, time.perf_counter() - t), calls + 1
    return best * 1e3, calls


def head(weight: torch.Tensor, avx512_only: bool = False) -> PackedLinear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight.data = weight
    if not avx512_only:
        return PackedLinear(linear, batch_hint=64)
    available = cpu_kernels.amx_available
    cpu_kernels.amx_available = lambda: False  # type: ignore[assignment]
    try:
        return PackedLinear(linear, batch_hint=64)
    finally:
        cpu_kernels.amx_available = available  # type: ignore[assignment]


Variant = tuple[str, str, Callable[[], torch.Tensor], Callable[[], int]]


def variants(x: torch.Tensor, weight: torch.Tensor) -> list[Variant]:
    """(name, the full head it stands for, pick, logits recomputed so far) for each variant this CPU
    runs; a full head stands for itself."""
    out: list[Variant] = []
    none: Callable[[], int] = lambda: 0
    xb, wb = x.bfloat16(), weight.bfloat16()
    full = head(wb)
    out.append(("bf16 head", "bf16 head", lambda: cpu_kernels.argmax(full(xb)), none))
    if full.amx:
        fused = AmxHeadArgmax(full)
        out.append(("bf16 head, argmax fused", "bf16 head", lambda: fused(xb), none))
        if cpu_kernels.int8_screen_available(amx=True):
            amx8 = Int8LogitScreen(full, wb)
            out.append(("int8 screen, AMX", "bf16 head", lambda: amx8(xb), lambda: amx8.recomputed))
    if cpu_kernels.avx512_linear_available(torch.bfloat16):
        avx, avx_name = full, "bf16 head"
        if full.amx:
            avx, avx_name = head(wb, avx512_only=True), "bf16 head, AVX-512"
            out.append((avx_name, avx_name, lambda: cpu_kernels.argmax(avx(xb)), none))
        if cpu_kernels.int8_screen_available():
            int8 = Int8LogitScreen(avx, wb)
            out.append(("int8 screen", avx_name, lambda: int8(xb), lambda: int8.recomputed))
    full32 = head(weight)
    out.append(("fp32 head", "fp32 head", lambda: cpu_kernels.argmax(full32(x)), none))
    if full32.avx512 and cpu_kernels.avx512_linear_available(torch.bfloat16):
        screen = LogitScreen(full32, weight)
        out.append(("bf16 screen", "fp32 head", lambda: screen(x), lambda: screen.recomputed))
    if full32.avx512 and cpu_kernels.int8_screen_available():
        int8_32 = Int8LogitScreen(full32, weight)
        out.append(("int8 screen, fp32 head", "fp32 head", lambda: int8_32(x), lambda: int8_32.recomputed))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["opt", "llama"], choices=["opt", "llama"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "genmill-bench-llm")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lines = [
        "| model | variant | ms per pick | vs the full head | logits recomputed per row | same picks |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    evict = torch.ones(EVICT_MIB << 18)  # float32
    for name in args.models:
        x, weight = hidden_rows(checkpoint(args.workdir, name), args.rows)
        runs = variants(x, weight)
        with torch.inference_mode():
            picks: dict[str, torch.Tensor] = {}
            timed: dict[str, float] = {}
            for label, baseline, pick, recomputed in runs:
                picks[label] = pick()
                before = recomputed()
                timed[label], calls = best_ms(pick, evict)
                per_row = (recomputed() - before) / max(1, calls) / args.rows
                same = torch.equal(picks[label], picks[baseline])
                ratio = timed[baseline] / timed[label]
                recomputed_text = f"{per_row:.1f}" if "screen" in label else ""
                lines.append(
                    f"| {name} | {label} | {timed[label]:.2f} | {ratio:.2f}x | {recomputed_text} | {'yes' if same else 'NO'} |"
                )
                print(lines[-1], flush=True)
    body = (
        f"The greedy pick of one decode step's LM head for {args.rows} rows (the final normed hidden "
        "states of the throughput benchmark's prompts, from transformers' forward), "
        f"{args.threads} threads, best of repeated calls, each after a read of {EVICT_MIB} MiB of other "
        "data (untimed): the head and its copies come from memory every call. `vs the full "
        "head`: the time of the full head a screen stands in for (the int8 screen: the AVX-512 bf16 "
        "head, which a CPU without AMX runs; the int8 screen, AMX: the AMX bf16 head; the bf16 "
        "screen and the int8 screen of the fp32 head: the fp32 head) over the screen's, whose "
        "picks must be that head's (`same picks`). `bf16 head` is the engine's on this CPU.\n\n"
        + "\n".join(lines)
    )
    if not args.no_write:
        results.write_section(results.per_cpu(TITLE), body)


if __name__ == "__main__":
    main()
