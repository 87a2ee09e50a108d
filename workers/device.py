"""Device pinning for a worker process.

CUDA cannot be re-initialised after fork, so each GPU gets its own solo-pool worker process and the
visible device is fixed before torch initialises CUDA. Below start-up, the device is passed down as
an argument; nothing else reads the environment to find it.
"""
from __future__ import annotations

import os
import sys


def parse_device(device: str) -> tuple[str, int | None]:
    device = device.strip().lower()
    if device == "cpu":
        return "cpu", None
    if device == "cuda":
        return "cuda", 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise ValueError(f"--device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


def pin_device(device: str) -> str:
    """Restrict this process to one device; returns the device name torch should use inside it."""
    kind, index = parse_device(device)
    if kind == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_initialized():
            raise RuntimeError("CUDA was initialised before the worker pinned its device")
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    return "cuda:0"  # the one visible device


def set_threads(threads: int | None) -> None:
    """Intra-op threads for this process. Two workers on one CPU should split its cores, or each
    slows the other far more than half (oversubscribed BLAS threads spin against each other)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
