"""Greedy picks for an fp32 LM head from a bf16 copy of it, exact.

On an AVX-512 CPU with bf16 instructions a bf16 matmul runs about twice the fp32 rate, and the LM
head is the widest matmul of a decode step (a fifth of an OPT-125m fp32 step). A greedy row needs
only the argmax of its logits, so the head runs in bf16 and the few logits whose bf16 value leaves
a doubt (within the approximation's rigorous error bound of the best one) are recomputed exactly in
fp32, in the order GenMill's AVX-512 linear sums them: the pick is the token the fp32 logits would
give, first maximum included (csrc/logit_screen.h has the bound). Rows that sample, or that ask for
logits, still take the full fp32 head.

Costs memory: the bf16 copy (half the fp32 head), and for an untied head a row-major fp32 copy (a
tied one reads the embedding table).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from workers.llm import cpu_kernels
from workers.llm.model import PackedLinear, Transformer


class LogitScreen:
    def __init__(self, head: PackedLinear, weight: Tensor) -> None:
        """`head`: the fp32 LM head on the AVX-512 kernel; `weight`: its `[V, K]` fp32 rows."""
        self.head = head
        self.weight = weight.detach().contiguous()
        self.packed = cpu_kernels.avx512_pack(self.weight.bfloat16())
        # the largest row norm, in float64 a block of rows at a time (not a float64 copy of the head)
        blocks = self.weight.split(4096)
        self.wmax = _float32_up(max(b.double().norm(dim=1).max().item() for b in blocks))
        self.recomputed = 0  # logits recomputed exactly so far (a measure of the screen's work)

    @classmethod
    def for_model(cls, model: Transformer) -> LogitScreen | None:
        """A screen for `model`'s LM head where it applies: fp32 on GenMill's AVX-512 kernel, no
        bias, a CPU with AVX512_BF16."""
        head = model.output
        if not (
            isinstance(head, PackedLinear)
            and head.avx512
            and head.weight.dtype == torch.float32
            and head.bias is None
            and cpu_kernels.avx512_linear_available(torch.bfloat16)
        ):
            return None
        tied = model.tok_embeddings.weight
        if model.args.tie_word_embeddings and tied.shape == (head.out_features, head.in_features):
            return cls(head, tied)
        return cls(head, unpack_avx512(head.weight, head.out_features, head.in_features))

    def __call__(self, x: Tensor) -> Tensor:
        """The greedy token of each row of `x [n, K]` (fp32, rows may be strided)."""
        approx = cpu_kernels.avx512_linear(x.bfloat16(), self.packed, None, self.head.out_features, False)
        ids, counts = cpu_kernels.screened_argmax(x, approx, self.weight, self.wmax)
        self.recomputed += int(counts.sum())
        doubtful = (ids < 0).nonzero().flatten()
        if doubtful.numel():  # a NaN or infinity: the full head, and the argmax kernel's rules
            ids[doubtful] = cpu_kernels.argmax(self.head(x[doubtful]))
        return ids


def unpack_avx512(packed: Tensor, n: int, k: int) -> Tensor:
    """The `[n, k]` fp32 rows of a weight packed by `cpu_kernels.avx512_pack`."""
    panel = cpu_kernels.AVX512_PANEL
    rows, offset = [], 0
    for start in range(0, n, panel):
        width = min(panel, n - start)
        rows.append(packed[offset : offset + k * width].view(k, width).t())
        offset += k * width
    return torch.cat(rows)


def _float32_up(value: float) -> float:
    """The smallest float32 >= value (ctypes rounds a float argument to nearest)."""
    f = torch.tensor(value, dtype=torch.float64).float()
    if f.double().item() < value:
        f = torch.nextafter(f, torch.tensor(math.inf))
    return f.item()
