"""Image-sampling throughput: GenMill's DiffusionEngine against reference implementations.

Same random UNet (diffusers UNet2DModel, 32x32, class-conditional, a few M parameters), same batch,
same number of network evaluations:

1. consistency multistep sampling: our engine vs diffusers' ConsistencyModelPipeline
   (CMStochasticIterativeScheduler), 4 evaluations (ts 0,10,20,30,39 of a 40-step grid);
2. Heun (EDM Algorithm 2): our engine vs k-diffusion's ``sample_heun`` over the same wrapped model;
3. the sampler's own overhead: time outside the network during our runs, per step and as a
   fraction of network time, plus a run with an instant network (pure sampler cost per step).

Each figure is the best of ``--repeats`` runs, ours and the reference alternating; with one
thread the clock is the process's CPU time, which a busy shared machine does not inflate. Prints a table and
replaces the "## Image sampling" section of bench/RESULTS.md (``--no-write`` to skip).

    python bench/diffusion_throughput.py [--threads 1] [--samples 16] [--batch 16]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_section
from workers.diffusion.engine import DiffusionEngine, to_uint8
from workers.diffusion.noise import GlobalNoise
from workers.diffusion.samplers import SamplerParams
from workers.diffusion.tiny import build_tiny_unet

SECTION = "Image sampling"
CM_TS = (0, 10, 20, 30, 39)  # 4 evaluations
CM_TIMESTEPS = [30, 20, 10, 0]  # the same grid points in diffusers' descending form


# With one thread the process's CPU time is the work done, whatever else the machine runs; with more
# threads it would count spinning workers, so wall time is used (``--clock`` chooses otherwise).
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.perf_counter


class TimedNetwork:
    """Wraps the engine's network and adds up the time spent inside it."""

    def __init__(self, net: Callable) -> None:
        self.net, self.seconds = net, 0.0

    def __call__(self, *args):
        start = clock()
        out = self.net(*args)
        self.seconds += clock() - start
        return out


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def interleaved(repeats: int, ours: Callable[[], object], reference: Callable[[], object]) -> tuple[float, float]:
    """Best time of each, the two alternating so that a burst of load on a shared machine hits both."""
    a, b = [], []
    for _ in range(repeats):
        a.append(best_of(1, ours))
        b.append(best_of(1, reference))
    return min(a), min(b)


def load_k_diffusion_sampling() -> types.ModuleType | None:
    """k-diffusion's sampling.py alone (its package __init__ needs torchvision, which has no CPU wheel here)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        return None
    package, utils = types.ModuleType("_kd_bench"), types.ModuleType("_kd_bench.utils")
    package.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    sys.modules.update({"_kd_bench": package, "_kd_bench.utils": utils})
    module_spec = importlib.util.spec_from_file_location("_kd_bench.sampling", Path(spec.origin).parent / "sampling.py")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


def run(args: argparse.Namespace) -> list[str]:
    global clock
    clock = CLOCKS[args.clock or ("cpu" if args.threads == 1 else "wall")]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_unet(Path(tmp) / "unet32", class_conditional=True, image_size=32,
                                 block_out_channels=args.channels, layers_per_block=args.layers,
                                 pipeline_layout=True)
        return measure(args, folder)


def measure(args: argparse.Namespace, folder: Path) -> list[str]:
    load_before = os.getloadavg()[0]
    engine = DiffusionEngine.load(folder, eval_batch=args.batch)
    timed = TimedNetwork(engine.denoiser.net)
    engine.denoiser.net = timed
    params_count = sum(p.numel() for p in timed.net.unet.parameters())
    n, batch = args.samples, args.batch
    labels = [i % 10 for i in range(n)]
    rows: list[tuple[str, float, float]] = []  # (what, ours samples/s, reference samples/s)
    net_seconds: dict[str, list[tuple[float, float]]] = {}  # sampler -> [(wall, inside the network)]

    def ours(params: SamplerParams) -> Callable[[], None]:
        def go() -> None:
            timed.seconds = 0.0
            start = clock()
            engine.sample(range(n), labels, params, seed=0, batch_size=batch)
            wall = clock() - start
            net_seconds.setdefault(params.sampler, []).append((wall, timed.seconds))
        engine.sample(range(batch), labels[:batch], params, seed=0, batch_size=batch)  # warm-up
        return go

    # 1. consistency models: diffusers' pipeline on the same folder
    from diffusers import ConsistencyModelPipeline

    pipe = ConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def pipeline_run(count: int) -> None:
        for lo in range(0, count, batch):
            pipe(batch_size=min(batch, count - lo), class_labels=labels[lo:lo + batch], num_inference_steps=None,
                 timesteps=CM_TIMESTEPS, generator=torch.Generator().manual_seed(lo), output_type="np")

    cm = SamplerParams(sampler="multistep", steps=40, ts=CM_TS)
    with torch.inference_mode():
        pipeline_run(batch)  # warm-up
        mine, theirs = interleaved(args.repeats, ours(cm), lambda: pipeline_run(n))
    rows.append((f"multistep, {cm.model_evals()} evals: ours vs diffusers ConsistencyModelPipeline",
                 n / mine, n / theirs))

    # 2. Heun: k-diffusion's sampler over the same wrapped model
    heun = SamplerParams(sampler="heun", steps=args.heun_steps)
    kd = load_k_diffusion_sampling()
    if kd is not None:
        def kd_run(count: int) -> None:
            sigmas = heun.sigmas().float()
            for lo in range(0, count, batch):
                y = torch.tensor(labels[lo:lo + batch])
                x = torch.randn(len(y), 3, 32, 32) * heun.sigma_max
                out = kd.sample_heun(lambda x, s, y=y: engine.denoiser(x, s, y).clamp(-1, 1), x, sigmas,
                                     disable=True)
                to_uint8(out)

        with torch.inference_mode():
            kd_run(batch)  # warm-up
            mine, theirs = interleaved(args.repeats, ours(heun), lambda: kd_run(n))
        rows.append((f"heun {heun.steps} steps, {heun.model_evals()} evals: ours vs k-diffusion sample_heun",
                     n / mine, n / theirs))
    else:
        mine = best_of(args.repeats, ours(heun))
        rows.append((f"heun {heun.steps} steps (k-diffusion not installed)", n / mine, float("nan")))

    overhead: list[tuple[str, float, float, int]] = []  # (sampler, overhead / network, ms per step, evals)
    for params in (cm, heun):
        wall, net = min(net_seconds[params.sampler])  # the fastest of our runs
        evals = params.model_evals() * -(-n // batch)
        overhead.append((params.sampler, (wall - net) / net, 1e3 * (wall - net) / evals, params.model_evals()))
    model_ms = 1e3 * min(net / (heun.model_evals() * -(-n // batch)) for _, net in net_seconds["heun"])

    # 3. pure sampler cost per step: an instant network, batch x 3 x 32 x 32
    x = torch.randn(batch, 3, 32, 32)
    pure = {}
    for name, p in [("heun", heun), ("ancestral", SamplerParams(sampler="ancestral", steps=args.heun_steps)),
                    ("multistep", cm)]:
        noise = GlobalNoise(0)
        seconds = best_of(args.repeats, lambda p=p, noise=noise: p.run(lambda x, s: x * 0.5, x * 80, noise))
        pure[name] = 1e3 * seconds / p.model_evals()

    lines = [
        (f"`python bench/diffusion_throughput.py --threads {args.threads} --samples {n} --batch {batch}` "
        f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
         f"{'process CPU' if clock is time.process_time else 'wall'} time, best of {args.repeats})."),
        (f"Model: random diffusers UNet2DModel, 32x32, channels {tuple(args.channels)}, "
        f"{args.layers} layer(s) per block, {params_count / 1e6:.1f} M parameters, 10 classes, float32."),
        "",
        "| comparison | ours (samples/s) | reference (samples/s) | ours / reference |",
        "|---|---|---|---|",
        *(f"| {what} | {a:.2f} | {b:.2f} | {a / b:.2f} |" for what, a, b in rows),
        "",
        ("Sampler overhead (everything outside the network: noise streams, preconditioning, sampler "
        "arithmetic, uint8 conversion), measured inside our runs:"),
        "",
        "| sampler | evals/sample | overhead / network time | overhead per step (ms) |",
        "|---|---|---|---|",
        *(f"| {s} | {e} | {f:.2%} | {ms:.2f} |" for s, f, ms, e in overhead),
        "",
        f"Pure sampler cost per step with an instant network (batch {batch}x3x32x32): "
        + ", ".join(f"{k} {v:.3f} ms" for k, v in pure.items())
        + f"; one network evaluation of the batch: {model_ms:.0f} ms "
        f"(heun: {pure['heun'] / model_ms:.3%} of it).",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heun-steps", type=int, default=4)
    parser.add_argument("--channels", type=lambda s: [int(v) for v in s.split(",")], default=[64, 128, 128])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=None,
                        help="default: cpu with --threads 1, else wall")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    body = "\n".join(run(args))
    print(f"## {SECTION}\n\n{body}")
    if not args.no_write:
        write_section(SECTION, body, script="bench/diffusion_throughput.py")


if __name__ == "__main__":
    main()
