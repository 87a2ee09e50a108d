"""Offloaded decoding (FlexLLMGen-style) on an OPT-125m-shaped random checkpoint.

    python -m bench.llm_offload [--batch 32] [--prompt-len 128] [--new-tokens 32] [--acc-batch 8] [--quick]

Every configuration runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. The fixed
runtime overhead is that process's RSS after importing torch, transformers and the GenMill modules,
before any weight is read. Runs, on the same prompts (random token ids, all `--prompt-len` long, so
transformers needs no padding) with greedy decoding and EOS ignored:

  hf         transformers OPTForCausalLM.generate, batch `--batch`
  memory     OffloadedGenerator, everything on the compute device (one GPU batch)
  disk       (a) weights and KV cache on disk, zig-zag over GPU batches, overlap on
  disk-sync  the same with overlap off (skipped with --quick)
  accuracy   (b) 4-bit weights, (c) 4-bit KV cache: batch `--acc-batch`, teacher-forced on the fp32
             greedy tokens, so every step's logits compare against fp32 under the same inputs

Targets: (a) disk peak RSS <= 35% of the fp32 weight bytes + overhead, disk throughput >= 50% of
memory; (b) weight bytes <= 30% of fp16, logits relative error and greedy agreement reported;
(c) KV cache bytes <= 30% of fp16. Writes the "LLM offloaded decoding, <unit> CPU"
section of bench/RESULTS.md (one per matmul unit, as the ratios depend on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TITLE = "LLM offloaded decoding"
MiB = 2**20
ALL_DISK = {"w_gpu_percent": 0, "w_cpu_percent": 0, "cache_gpu_percent": 0, "cache_cpu_percent": 0}


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    from workers.llm.offload import peak_rss_bytes  # VmHWM: ru_maxrss would include the parent's

    return peak_rss_bytes()


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randint(4, vocab, (n, length), generator=g).tolist()


# ---------------------------------------------------------------------------------------------
# children (one configuration each)


def child_hf(folder: Path, batch: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    import torch
    import transformers

    overhead = _rss_now()
    model = transformers.OPTForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # run every row the full length, as ignore_eos does
    ids = torch.tensor(_prompts(batch, prompt_len, model.config.vocab_size))
    with torch.inference_mode():  # warm-up: first-call costs (thread pools, kernel selection) stay out
        model.generate(input_ids=ids[:1, :8], max_new_tokens=2, do_sample=False, pad_token_id=1)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "tokens_per_s": batch * new_tokens / wall,
        "overhead_rss": overhead,
        "peak_rss": _peak_rss(),
        "token_ids": out[:, prompt_len:].tolist(),
    }


def child_offload(
    folder: Path, policy: dict, batch: int, prompt_len: int, new_tokens: int, offload_dir: Path
) -> dict[str, Any]:
    import torch  # noqa: F401 - the overhead includes what any worker imports
    import transformers  # noqa: F401

    from workers.llm.offload import OffloadedGenerator, Policy
    from workers.llm.sampling import SamplingParams

    overhead = _rss_now()
    gen = OffloadedGenerator(folder, Policy.from_dict(policy), offload_dir=offload_dir)
    prompts = _prompts(batch, prompt_len, gen.args.vocab_size)
    params = [SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)] * batch
    _warm_up(gen)
    t0 = time.perf_counter()
    outs, stats = gen.generate(prompts, params, frozenset(), lambda ids: "")
    wall = time.perf_counter() - t0
    s = gen.stats
    result = {
        "wall_s": wall,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "tokens_per_s": stats.generated_tokens / wall,
        "decode_tokens_per_s": stats.decode_tokens / stats.decode_s if stats.decode_s else 0.0,
        "bandwidth": s.weight_bytes * stats.decode_steps / stats.decode_s if stats.decode_s else 0.0,
        "overhead_rss": overhead,
        "peak_rss": _peak_rss(),
        "weight_bytes": s.weight_bytes,
        "weight_bytes_resident": s.weight_bytes_resident,
        "cache_bytes": s.cache_bytes,
        "cache_bytes_disk": s.cache_bytes_disk,
        "disk_read_bytes": gen.io.read_bytes,
        "peak_mapped": gen.io.peak_mapped_bytes,
        "token_ids": [o.token_ids for o in outs],
    }
    gen.close()
    return result


def child_accuracy(
    folder: Path, batch: int, prompt_len: int, new_tokens: int, offload_dir: Path
) -> dict[str, Any]:
    import math

    import torch

    from workers.llm.offload import OffloadedGenerator, Policy
    from workers.llm.sampling import SamplingParams

    def run(policy: Policy, teacher: list[list[int]] | None = None) -> dict[str, Any]:
        gen = OffloadedGenerator(folder, policy, offload_dir=offload_dir)
        prompts = _prompts(batch, prompt_len, gen.args.vocab_size)
        steps: dict[int, list[torch.Tensor]] = {}

        def on_logits(ids: list[int], logits: torch.Tensor) -> None:
            for i, row in zip(ids, logits):
                steps.setdefault(i, []).append(row.clone())

        params = [SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)] * batch
        _warm_up(gen)
        t0 = time.perf_counter()
        outs, stats = gen.generate(
            prompts, params, frozenset(), lambda ids: "", on_logits=on_logits, teacher=teacher
        )
        wall = time.perf_counter() - t0
        fp16_weights = sum(2 * math.prod(h.shape) for h in gen.homes.values())
        out = {
            "ids": [o.token_ids for o in outs],
            "logits": torch.stack([torch.stack(steps[i]) for i in range(batch)]),
            "tokens_per_s": stats.generated_tokens / wall,
            "weight_bytes": gen.stats.weight_bytes,
            "fp16_weight_bytes": fp16_weights,
            "cache_bytes": gen.stats.cache_bytes,
            "fp16_cache_bytes": gen.stats.cache_bytes_fp16,
        }
        gen.close()
        return out

    ref = run(Policy(gpu_batch_size=batch))
    result: dict[str, Any] = {"fp32": {k: v for k, v in ref.items() if k not in ("ids", "logits")}}
    for name, policy in (
        ("weights", Policy(gpu_batch_size=batch, compress_weight=True)),
        ("cache", Policy(gpu_batch_size=batch, compress_cache=True)),
    ):
        got = run(policy, teacher=ref["ids"])
        diff = got["logits"] - ref["logits"]
        agree = got["logits"].argmax(-1) == ref["logits"].argmax(-1)
        result[name] = {
            "rel_error": float(diff.norm() / ref["logits"].norm()),
            "rel_error_max_row": float((diff.norm(dim=-1) / ref["logits"].norm(dim=-1)).max()),
            "agreement": float(agree.float().mean()),
            "first_token_agreement": float(agree[:, 0].float().mean()),
            **{k: v for k, v in got.items() if k not in ("ids", "logits")},
        }
    return result


def _warm_up(gen: Any) -> None:
    """One tiny request first, so first-call costs (thread pools, kernel selection) stay out of the timing."""
    from workers.llm.sampling import SamplingParams

    gen.generate([[5] * 8], [SamplingParams(max_tokens=2, temperature=0)], frozenset(), lambda ids: "")


# ---------------------------------------------------------------------------------------------
# parent


def build_checkpoint(folder: Path) -> int:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig()).eval()  # OPT-125m shape: 12 x 768, ffn 3072, vocab 50272
    model.save_pretrained(folder)  # safetensors
    return sum(p.numel() for p in model.parameters())


def spawn(args: argparse.Namespace, config: str, folder: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.llm_offload",
        "--child",
        config,
        "--folder",
        str(folder),
        "--batch",
        str(args.batch),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--acc-batch",
        str(args.acc_batch),
        *extra,
    ]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {config}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return result


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def report(args: argparse.Namespace, params: int, runs: dict[str, dict[str, Any]]) -> str:
    fp32 = 4 * params
    hf, mem, disk = runs["hf"], runs["memory"], runs["disk"]
    lines = [_setup(args, params, fp32), "", *_table(args, runs, fp32), ""]
    lines.append(
        f"Greedy tokens: memory vs transformers {agreement(mem['token_ids'], hf['token_ids']):.3f} "
        f"agreement, disk vs memory {agreement(disk['token_ids'], mem['token_ids']):.3f}."
    )
    lines += ["", "Targets:", "", _target_a(runs, fp32), *_targets_bc(runs["accuracy"]), ""]
    lines.append(_accuracy_note(args, runs["accuracy"]))
    return "\n".join(lines)


def _setup(args: argparse.Namespace, params: int, fp32: int) -> str:
    return (
        f"OPT-125m-shaped random checkpoint ({params / 1e6:.1f} M parameters, fp32 weights "
        f"{fp32 / MiB:.0f} MiB), batch {args.batch}, prompts of {args.prompt_len} random token ids, "
        f"{args.new_tokens} new tokens, greedy, EOS ignored; torch {_torch_version()}, "
        f"{os.cpu_count()} cores (shared with other jobs: timings are noisy, ratios less so). Each row is "
        "a fresh process; overhead = its RSS after imports, before any weight is read. The compute device "
        'is the CPU, so the "gpu" tier is host memory and the disk tier is real files, served by the '
        "page cache after the first step and mapped from it a tensor at a time (no copy; a window's "
        "pages count in RSS while it is mapped)."
    )


def _table(args: argparse.Namespace, runs: dict[str, dict[str, Any]], fp32: int) -> list[str]:
    hf = runs["hf"]
    header = (
        "| run | policy | tokens/s | decode tokens/s | bandwidth | peak RSS | overhead | peak - overhead "
        "| weights resident | KV cache (resident / disk) | disk reads | vs transformers |"
    )
    hf_row = (
        f"| transformers generate | all in memory | {hf['tokens_per_s']:.1f} | - | - | "
        f"{hf['peak_rss'] / MiB:.0f} MiB | {hf['overhead_rss'] / MiB:.0f} MiB | "
        f"{(hf['peak_rss'] - hf['overhead_rss']) / MiB:.0f} MiB | {fp32 / MiB:.0f} MiB | - | - | 1.00 |"
    )
    rows = [_row(name, runs[name], args, hf) for name in ("memory", "disk", "disk-sync") if name in runs]
    return [header, "|---" * 12 + "|", hf_row, *rows]


def _target_a(runs: dict[str, dict[str, Any]], fp32: int) -> str:
    mem, disk = runs["memory"], runs["disk"]
    ratio = disk["tokens_per_s"] / mem["tokens_per_s"]
    decode_ratio = disk["decode_tokens_per_s"] / mem["decode_tokens_per_s"]
    budget = 0.35 * fp32
    above = disk["peak_rss"] - disk["overhead_rss"]
    return (
        f"- (a) all weights on disk: peak RSS - overhead = {above / MiB:.0f} MiB (mapped file windows at "
        f"most {disk.get('peak_mapped', 0) / MiB:.0f} MiB at once) vs budget 35% of fp32 "
        f"weights = {budget / MiB:.0f} MiB: **{_verdict(above <= budget)}**; throughput {ratio:.2f} of "
        f"all-in-memory (decode only {decode_ratio:.2f}) vs >= 0.50: **{_verdict(ratio >= 0.5)}**."
    )


def _targets_bc(acc: dict[str, Any]) -> list[str]:
    w, c = acc["weights"], acc["cache"]
    w_ratio = w["weight_bytes"] / w["fp16_weight_bytes"]
    c_ratio = c["cache_bytes"] / c["fp16_cache_bytes"]
    b = (
        f"- (b) 4-bit weights (g64 along the input dim, fp16 scale/min; vectors stay dense): "
        f"{w['weight_bytes'] / MiB:.1f} MiB = {w_ratio:.3f} of fp16 ({w['fp16_weight_bytes'] / MiB:.1f} MiB) "
        f"vs <= 0.30: **{_verdict(w_ratio <= 0.30)}**; logits relative error vs fp32 {w['rel_error']:.4f} "
        f"(worst row {w['rel_error_max_row']:.4f}), greedy agreement {w['agreement']:.3f} "
        f"(first token {w['first_token_agreement']:.3f})."
    )
    c_line = (
        f"- (c) 4-bit KV cache (g64 along the head dim, fp16 scale/min): {c['cache_bytes'] / MiB:.1f} MiB = "
        f"{c_ratio:.3f} of fp16 ({c['fp16_cache_bytes'] / MiB:.1f} MiB) vs <= 0.30: "
        f"**{_verdict(c_ratio <= 0.30)}**; logits relative error {c['rel_error']:.4f} "
        f"(worst row {c['rel_error_max_row']:.4f}), greedy agreement {c['agreement']:.3f}."
    )
    return [b, c_line]


def _accuracy_note(args: argparse.Namespace, acc: dict[str, Any]) -> str:
    w, c = acc["weights"], acc["cache"]
    return (
        f"(b) and (c) run at batch {args.acc_batch}, teacher-forced on the fp32 run's greedy tokens, so "
        "each step's logits compare under the same inputs (agreement = same argmax). tokens/s at that "
        f"batch: fp32 {acc['fp32']['tokens_per_s']:.1f}, 4-bit weights {w['tokens_per_s']:.1f} "
        f"(decompressed at each layer load), 4-bit cache {c['tokens_per_s']:.1f}. The model is random "
        "(OPT init std 0.02), so its next-token logits are nearly flat and argmax agreement is a harsh "
        "measure; the relative error is the better guide."
    )


def _row(name: str, r: dict[str, Any], args: argparse.Namespace, hf: dict[str, Any]) -> str:
    policy = {
        "memory": f"all on device, 1 x {args.batch}",
        "disk": f"weights + cache on disk, {args.gpu_batch} x {args.batch // args.gpu_batch}, overlap",
        "disk-sync": f"weights + cache on disk, {args.gpu_batch} x {args.batch // args.gpu_batch}, no overlap",
    }[name]
    cache = f"{r['cache_bytes'] / MiB:.0f} / {r['cache_bytes_disk'] / MiB:.0f} MiB"
    return (
        f"| {name} | {policy} | {r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
        f"{r['bandwidth'] / 1e9:.2f} GB/s | {r['peak_rss'] / MiB:.0f} MiB | {r['overhead_rss'] / MiB:.0f} MiB | "
        f"{(r['peak_rss'] - r['overhead_rss']) / MiB:.0f} MiB | {r['weight_bytes_resident'] / MiB:.0f} MiB | "
        f"{cache} | {r['disk_read_bytes'] / 2**30:.1f} GiB | {r['tokens_per_s'] / hf['tokens_per_s']:.2f} |"
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _torch_version() -> str:
    import torch

    return torch.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gpu-batch", type=int, default=8, help="GPU batch size of the disk runs")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--acc-batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="skip the overlap-off disk run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--offload-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_run_child(args)))
        return
    if args.batch % args.gpu_batch:
        ap.error("--batch must be a multiple of --gpu-batch")
    with tempfile.TemporaryDirectory(prefix="genmill-offload-bench-") as tmp:
        folder = Path(tmp) / "opt-125m-random"
        params = spawn(args, "build", folder, [])["params"]  # in a child: the parent stays small
        disk = {**ALL_DISK, "gpu_batch_size": args.gpu_batch, "num_gpu_batches": args.batch // args.gpu_batch}
        configs = {
            "hf": [],
            "memory": ["--policy", json.dumps({"gpu_batch_size": args.batch})],
            "disk": ["--policy", json.dumps(disk)],
            "accuracy": [],
        }
        if not args.quick:
            configs["disk-sync"] = ["--policy", json.dumps({**disk, "overlap": False})]
        runs = {}
        for name, extra in configs.items():
            child = "offload" if name in ("memory", "disk", "disk-sync") else name
            runs[name] = spawn(args, child, folder, [*extra, "--offload-dir", str(Path(tmp) / "offload")])
    body = report(args, params, runs)
    from bench.results import per_cpu, write_section

    write_section(per_cpu(TITLE), body)
    print(body)


def _run_child(args: argparse.Namespace) -> dict[str, Any]:
    if args.child == "build":
        return {"params": build_checkpoint(args.folder)}
    if args.child == "hf":
        return child_hf(args.folder, args.batch, args.prompt_len, args.new_tokens)
    if args.child == "offload":
        return child_offload(
            args.folder,
            json.loads(args.policy),
            args.batch,
            args.prompt_len,
            args.new_tokens,
            args.offload_dir,
        )
    if args.child == "accuracy":
        return child_accuracy(args.folder, args.acc_batch, args.prompt_len, args.new_tokens, args.offload_dir)
    raise SystemExit(f"unknown child {args.child!r}")


if __name__ == "__main__":
    main()
