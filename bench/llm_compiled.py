"""LLM decoding: int8/int4 weight-only quantization and speculative decoding vs transformers' generate.

    python -m bench.llm_compiled [--threads 1] [--batches 1 8] [--prompt-len 64] [--new-tokens 64]

Model: an OPT-125m-shaped random checkpoint (transformers `OPTConfig()` defaults, seed 0) saved with
`save_pretrained` (safetensors) plus a word-level tokenizer over its 50,272 ids; prompts are random
token ids fed as `prompt_ids`. Quantized copies come from `quantize_checkpoint` (what `genmill
quantize` runs: int8 per channel, int4 group 64) and load through `LLMEngine.load` like any folder.

Every figure is end to end (prefill + greedy decoding of --new-tokens tokens, EOS ignored) for the
same prompts, batch and dtype, best of --repeats runs after a short warm-up, in this one process:
  (1) transformers `generate` (the baseline) vs our engine on the fp, int8 and int4 folders, in
      float32 and bfloat16 compute;
  (2) speculative decoding (`SpeculativeLLMEngine`, k = 4) vs the plain target: an int4 copy of the
      target as the draft, and the fp target itself as its own draft (every token accepted: the
      mechanism's ceiling at this cost ratio).
Writes the "LLM quantized and speculative decoding" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section
from workers.llm.engine import GenRequest, LLMEngine
from workers.llm.loader import model_bytes
from workers.llm.model import PackedLinear
from workers.llm.quantize import quantize_checkpoint
from workers.llm.sampling import SamplingParams
from workers.llm.speculative import SpeculativeLLMEngine

TITLE = "LLM quantized and speculative decoding"
MODES = ("fp", "int8", "int4")
DTYPES = ("float32", "bfloat16")
SPEC_DTYPE = "bfloat16"  # where the int4 draft runs aten's packed kernel (fp32 int4 dequantizes per call)
WARMUP_TOKENS = 4


# ---- checkpoints ----


def build_checkpoint(folder: Path) -> Path:
    """Random OPT-125m-shaped model + a word-level tokenizer (token i is the word `t{i}`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OPTForCausalLM(OPTConfig()).eval()
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # OPT's special ids: pad 1, bos/eos 2
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t2", eos_token="t2", pad_token="t1", unk_token="t3"
    ).save_pretrained(folder)
    return folder


def checkpoints(root: Path) -> dict[str, Path]:
    folders = {"fp": build_checkpoint(root / "fp")}
    for mode in ("int8", "int4"):
        folders[mode] = root / mode
        quantize_checkpoint(folders["fp"], folders[mode], mode, group_size=64)
    return folders


def make_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=g).tolist()


# ---- timed runs ----


@dataclass
class Run:
    tokens_per_s: float
    tokens: list[list[int]]
    metrics: dict[str, float] = field(default_factory=dict)


def interleaved_best(runners: dict[str, Callable[[], Run]], repeats: int) -> dict[str, Run]:
    """Best run of each runner; the runners take turns, so a load change on this shared machine
    hits every variant alike instead of whichever happened to run at the time."""
    best: dict[str, Run] = {}
    for _ in range(repeats):
        for name, run_once in runners.items():
            run = run_once()
            if name not in best or run.tokens_per_s > best[name].tokens_per_s:
                best[name] = run
    return best


def engine_runner(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> Callable[[], Run]:
    """Warm the engine up (sizes the KV caches for this batch); return one timed generation."""

    def requests(n: int) -> list[GenRequest]:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return [GenRequest(prompt_ids=p, params=params) for p in prompts]

    engine.generate(requests(WARMUP_TOKENS))

    def once() -> Run:
        t0 = time.process_time()
        out = engine.generate(requests(new_tokens))
        cpu = time.process_time() - t0
        tokens = [o.token_ids for o in out.outcomes]
        return Run(len(prompts) * new_tokens / cpu, tokens, {m.name: m.value for m in out.metrics})

    return once


def transformers_runner(model: Any, prompts: list[list[int]], new_tokens: int) -> Callable[[], Run]:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def gen(n: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False
            )

    gen(WARMUP_TOKENS)

    def once() -> Run:
        t0 = time.process_time()
        out = gen(new_tokens)
        cpu = time.process_time() - t0
        return Run(len(prompts) * new_tokens / cpu, out[:, ids.shape[1] :].tolist())

    return once


def load_transformers(folder: Path, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # decode every token, as ignore_eos does on our side
    model.generation_config.pad_token_id = 1
    return model


def step_bytes(model: Any) -> int:
    """Weight bytes one decode step reads: all but the embedding tables, which are only indexed
    (counted when the LM head reads the embedding itself, i.e. tied and not repacked)."""
    total = model_bytes(model)
    head = getattr(model.output, "weight", None)
    for emb in (model.tok_embeddings, model.pos_embeddings):
        if emb is not None and emb.weight is not head:
            total -= emb.weight.numel() * emb.weight.element_size()
    return total


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> float:
    """Share of positions equal to the reference (free-running: a first flip usually ends agreement)."""
    pairs = [(a, b) for x, y in zip(tokens, ref) for a, b in zip(x, y)]
    return sum(a == b for a, b in pairs) / len(pairs)


# ---- the two comparisons ----


def quantization_rows(folders: dict[str, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for dtype in DTYPES:
        hf = load_transformers(folders["fp"], dtype)
        vocab = hf.config.vocab_size
        engines = {
            mode: LLMEngine.load(folders[mode], dtype=dtype, max_batch_size=max(args.batches))
            for mode in MODES
        }
        for batch in args.batches:
            prompts = make_prompts(batch, args.prompt_len, vocab)
            runners = {"hf": transformers_runner(hf, prompts, args.new_tokens)}
            runners |= {mode: engine_runner(engines[mode], prompts, args.new_tokens) for mode in MODES}
            runs = interleaved_best(runners, args.repeats)
            base = runs["hf"]
            for mode in MODES:
                size = step_bytes(engines[mode].model)
                rows.append(
                    {
                        "dtype": dtype,
                        "batch": batch,
                        "variant": mode,
                        "tok_s": runs[mode].tokens_per_s,
                        "hf_tok_s": base.tokens_per_s,
                        "fp_tok_s": runs["fp"].tokens_per_s,
                        "bytes": size,
                        # each decode step reads every weight once
                        "gb_s": size * runs[mode].tokens_per_s / batch / 1e9,
                        "match_hf": agreement(runs[mode].tokens, base.tokens),
                        "match_fp": agreement(runs[mode].tokens, runs["fp"].tokens),
                    }
                )
                print(_quant_line(rows[-1]), flush=True)
        for engine in engines.values():
            engine.close()
        del hf
    return rows


def speculative_rows(
    folders: dict[str, Path], args: argparse.Namespace, hf_tok_s: dict[int, float]
) -> list[dict[str, Any]]:
    """hf_tok_s: transformers' tokens/s per batch in SPEC_DTYPE, from table (1) (same prompts)."""
    rows = []
    batch_size = max(args.batches)
    plain = LLMEngine.load(folders["fp"], dtype=SPEC_DTYPE, max_batch_size=batch_size)
    drafts = {"int4 copy of the target": folders["int4"], "the target itself (fp)": folders["fp"]}
    spec = {
        name: SpeculativeLLMEngine.load(
            folders["fp"], dtype=SPEC_DTYPE, draft_model=path, speculate_k=args.k, max_batch_size=batch_size
        )
        for name, path in drafts.items()
    }
    vocab = plain.model.args.vocab_size
    for batch in args.batches:
        alike = rows_round_alike(plain.model, batch, args.k)
        prompts = make_prompts(batch, args.prompt_len, vocab)
        runners = {"plain": engine_runner(plain, prompts, args.new_tokens)}
        runners |= {name: engine_runner(engine, prompts, args.new_tokens) for name, engine in spec.items()}
        runs = interleaved_best(runners, args.repeats)
        base = runs["plain"]
        for name, engine in spec.items():
            run = runs[name]
            m = run.metrics
            rows.append(
                {
                    "batch": batch,
                    "draft": name,
                    "tok_s": run.tokens_per_s,
                    "plain_tok_s": base.tokens_per_s,
                    "hf_tok_s": hf_tok_s[batch],
                    "acceptance": m["acceptance_rate"],
                    "per_round": m["accepted_tokens_per_step"],
                    "hist": [int(m[f"accept_count_{i}"]) for i in range(args.k + 1)],
                    "draft_mb": step_bytes(engine.draft) / 1e6,
                    "exact": run.tokens == base.tokens,
                    "rows_alike": alike,
                }
            )
            print(_spec_line(rows[-1]), flush=True)
    for engine in (plain, *spec.values()):
        engine.close()
    return rows


def rows_round_alike(model: torch.nn.Module, batch: int, k: int) -> tuple[int, int]:
    """(shapes whose rows come out bit-identical, shapes): each distinct linear of `model` on the
    first `batch` rows of a random input, alone (a decode step's call) and within all
    batch x (k+1) rows (a verification forward's). Where a linear's kernel depends on the row count,
    a greedy near-tie can flip between speculative and plain decoding."""
    same, shapes = 0, {}
    for module in model.modules():
        if isinstance(module, PackedLinear):
            shapes.setdefault((module.in_features, module.out_features), module)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for (n_in, _), linear in shapes.items():
            x = torch.randn(batch * (k + 1), n_in, generator=gen).to(dtype)
            same += torch.equal(linear(x[:batch]), linear(x)[:batch])
    return same, len(shapes)


# ---- report ----


def _quant_line(r: dict[str, Any]) -> str:
    return (
        f"| {r['variant']} | {r['dtype']} | {r['batch']} | {r['tok_s']:.1f} | {r['hf_tok_s']:.1f} "
        f"| {r['tok_s'] / r['hf_tok_s']:.2f} | {r['tok_s'] / r['fp_tok_s']:.2f} | {r['bytes'] / 1e6:.1f} "
        f"| {r['gb_s']:.2f} | {r['match_fp']:.0%} | {r['match_hf']:.0%} |"
    )


def _spec_line(r: dict[str, Any]) -> str:
    return (
        f"| {r['draft']} | {r['batch']} | {r['tok_s']:.1f} | {r['plain_tok_s']:.1f} "
        f"| {r['tok_s'] / r['plain_tok_s']:.2f} | {r['tok_s'] / r['hf_tok_s']:.2f} "
        f"| {r['acceptance']:.2f} | {r['per_round']:.2f} "
        f"| {r['hist']} | {r['draft_mb']:.0f} | {'yes' if r['exact'] else 'NO'} |"
    )


def _spec_summary(spec: list[dict[str, Any]]) -> str:
    def figures(draft: str) -> str:
        rows = [r for r in spec if r["draft"] == draft]
        return ", ".join(
            f"x{r['tok_s'] / r['plain_tok_s']:.2f} at batch {r['batch']} (acceptance {r['acceptance']:.2f})"
            for r in rows
        )

    exact = all(r["exact"] for r in spec)
    alike = ", ".join(
        f"{r['rows_alike'][0]} of {r['rows_alike'][1]} at batch {r['batch']}"
        for r in spec
        if r["draft"] == "the target itself (fp)"
    )
    return (
        "Reading: a round costs k draft steps plus one (k+1)-token target forward and yields "
        "accepted + 1 tokens, so a draft pays off only when it is much cheaper than the target *and* "
        "agrees with it often. The int4 copy is cheaper per step (table 1, bf16) but on random weights "
        "(near-flat next-token distributions) its greedy picks often differ from the fp target's: "
        f"{figures('int4 copy of the target')}. The target as its own draft accepts (nearly) "
        "everything, the mechanism's ceiling for a draft that costs as much as the target: "
        f"{figures('the target itself (fp)')}. The verification forward runs each token's attention "
        "with a one-token step's arithmetic (the CPU kernels), but its linears see batch x (k+1) rows "
        "where a step's see batch rows; some linear kernels round a row by row count, which the "
        "engine's packed linears avoid where they can (README, batch-invariant results). Linear "
        f"shapes whose rows round the same either way, measured in this run: {alike}. Where one does "
        "not, a rare near-tie between the two top logits still flips. A real draft (trained, smaller, "
        "agreeing with the target most of the time) is what speculation needs; these figures "
        "measure the machinery. Greedy speculative output "
        + (
            "equals the plain target's token for token in every run."
            if exact
            else "DIFFERS from the plain target's in some runs (see last column)."
        )
    )


def report(
    quant: list[dict[str, Any]], spec: list[dict[str, Any]], args: argparse.Namespace, wall: float
) -> str:
    lines = [
        (
            f"`python -m bench.llm_compiled --threads {args.threads} --repeats {args.repeats}` "
            f"(torch {torch.__version__}, "
            f"{args.threads} torch thread(s), best of {args.repeats} interleaved runs). OPT-125m-shaped random model "
            "(transformers `OPTConfig()` defaults, seed 0), prompts of "
            f"{args.prompt_len} random token ids, {args.new_tokens} greedy new tokens (EOS ignored), "
            "tokens/s end to end (prefill included), timed on process CPU time: with one thread that is "
            "wall time on an idle machine, minus the time slices other jobs take on this shared box. "
            "Weights MB = what one decode step of our model "
            "reads (the tied LM head has its own packed copy, the embedding table is only "
            "indexed; int8/int4 keep the LM head in the compute dtype); GB/s = weights x steps/s."
        ),
        "",
        (
            "**(1) Weight-only quantization** (`genmill quantize`: int8 per channel, int4 group 64), "
            "loaded by `LLMEngine.load` on the quantized folder, vs transformers `generate` on the fp "
            "model in the same dtype."
        ),
        "",
        (
            "| ours | dtype | batch | tokens/s | transformers tokens/s | vs transformers | vs ours fp "
            "| weights MB | GB/s | tokens = ours fp | tokens = transformers |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_quant_line(r) for r in quant),
        "",
        (
            "float32 int8/int4 dequantize each weight on every call (no fp32 int kernel): that costs about "
            "what int8's smaller weights save, and more for int4, so they run at or below fp32; in bfloat16 aten's packed int8/int4 matmuls run and the smaller weights pay "
            "off at small batch. Token agreement is free-running: random weights give near-flat "
            "next-token distributions, so one flipped near-tie changes the rest of a row (teacher-forced "
            "figures are in the quantization-memory section)."
        ),
        "",
        (
            f"**(2) Speculative decoding**, k = {args.k}, {SPEC_DTYPE}, target = the fp model, vs the "
            "plain target engine on the same prompts (vs transformers: its bf16 `generate` from (1), same "
            "prompts). Acceptance = accepted / proposed draft tokens; "
            "per round = mean accepted; histogram = rounds with 0..k accepted (all batch rows)."
        ),
        "",
        (
            "| draft | batch | tokens/s | plain target tokens/s | speed-up | vs transformers | acceptance "
            "| accepted/round "
            "| histogram | draft MB | output = plain greedy |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
        *(_spec_line(r) for r in spec),
        "",
        _spec_summary(spec),
        "",
        f"Bench wall time {wall:.0f} s. Shared 2-core machine: expect +-20% on any single figure.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="speculate_k")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = ap.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="genmill-bench-") as tmp:
        folders = checkpoints(Path(tmp))
        quant = quantization_rows(folders, args)
        hf = {r["batch"]: r["hf_tok_s"] for r in quant if r["dtype"] == SPEC_DTYPE and r["variant"] == "fp"}
        spec = speculative_rows(folders, args, hf)
    body = report(quant, spec, args, time.perf_counter() - start)
    print(body)
    if not args.no_write:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
