"""Greedy picks for an LM head from a cheaper copy of it, exact: an fp32 head from a bf16 copy
(`LogitScreen`), a bf16 head from an int8 one (`Int8LogitScreen`); `for_model` picks the one that
applies.

On an AVX-512 CPU with bf16 instructions a bf16 matmul runs about twice the fp32 rate (on AMX tiles
five times), and the LM head is the widest matmul of a decode step (a fifth of an OPT-125m fp32
step). A greedy row needs only the argmax of its logits, so the head runs in bf16 (AMX tiles where
the CPU has them, else VDPBF16PS) and the few logits whose bf16 value leaves
a doubt (within the approximation's rigorous error bound of the best one) are recomputed exactly in
fp32, in the order GenMill's AVX-512 linear sums them: the pick is the token the fp32 logits would
give, first maximum included (csrc/logit_screen.h has the bound). Rows that sample, or that ask for
logits, still take the full fp32 head.

Costs memory: the bf16 copy (half the fp32 head), and for an untied head a row-major fp32 copy (a
tied one reads the embedding table).

A bf16 head is screened the same way from an int8 copy (`Int8LogitScreen`): on GenMill's AVX-512
kernel when the CPU has AVX512_VNNI (VPDPBUSD does four multiply-adds per lane where VDPBF16PS does
two), on AMX tiles with TDPBUSD (half the bytes of the bf16 head, which a decode step reads from
memory); csrc/int8_screen.h has the bound. Costs the int8 copy (half the bf16 head), and for an
untied head a row-major bf16 copy.

A bf16 head on AMX tiles that the int8 screen does not cover (a bias) takes its greedy rows' argmax in
the head's epilogue (`AmxHeadArgmax`), which spares writing a step's logits and reading them back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from workers.llm import cpu_kernels
from workers.llm.model import PackedLinear, Transformer


class LogitScreen:
    def __init__(self, head: PackedLinear, weight: Tensor) -> None:
        """`head`: the fp32 LM head on the AVX-512 kernel; `weight`: its `[V, K]` fp32 rows."""
        self.head = head
        self.weight = weight.detach().contiguous()
        # the bf16 copy on the CPU's fastest bf16 kernel: AMX tiles where there are (there AVX-512's
        # VDPBF16PS runs at a fifth of their rate, slower than the fp32 head itself), else AVX-512
        self.amx = cpu_kernels.amx_available()
        pack = cpu_kernels.amx_pack if self.amx else cpu_kernels.avx512_pack
        self.packed = pack(self.weight.bfloat16())
        # the largest row norm, in float64 a block of rows at a time (not a float64 copy of the head)
        blocks = self.weight.split(4096)
        wmax = max(b.double().norm(dim=1).max().item() for b in blocks)
        self.wmax = cpu_kernels.float32_up(torch.tensor(wmax, dtype=torch.float64)).item()
        self.recomputed = 0  # logits recomputed exactly so far (a measure of the screen's work)

    @classmethod
    def for_model(cls, model: Transformer) -> LogitScreen | None:
        """A screen for `model`'s LM head where it applies: fp32 on GenMill's AVX-512 kernel, no
        bias, a CPU with AVX512_BF16."""
        head = _avx512_head(model, torch.float32)
        if head is None or not cpu_kernels.avx512_linear_available(torch.bfloat16):
            return None
        return cls(head, _head_rows(model, head))

    def approx(self, x: Tensor) -> Tensor:
        """The bf16 logits of `x [n, K]` from the bf16 copy (x rounded to bf16, fp32 sums, bf16 out)."""
        linear = cpu_kernels.amx_linear if self.amx else cpu_kernels.avx512_linear
        return linear(x.bfloat16(), self.packed, None, self.head.out_features, False)

    def __call__(self, x: Tensor) -> Tensor:
        """The greedy token of each row of `x [n, K]` (fp32, rows may be strided)."""
        ids, counts = cpu_kernels.screened_argmax(x, self.approx(x), self.weight, self.wmax)
        self.recomputed += int(counts.sum())
        return _full_head_where_unscreened(ids, x, self.head)


class Int8LogitScreen:
    def __init__(self, head: PackedLinear, weight: Tensor) -> None:
        """`head`: the bf16 LM head on the AVX-512 kernel or on AMX tiles; `weight`: its `[V, K]`
        bf16 rows (the exact pass reads them)."""
        self.head = head
        self.weight = weight.detach().to(torch.bfloat16).contiguous()
        self.int8 = cpu_kernels.int8_screen_pack(self.weight, amx=head.amx)
        self.recomputed = 0  # logits recomputed exactly so far (a measure of the screen's work)

    @classmethod
    def for_model(cls, model: Transformer) -> Int8LogitScreen | None:
        """A screen for `model`'s LM head where it applies: bf16 on GenMill's AVX-512 kernel or AMX
        tiles, no bias, an even K, under 2 GiB, a CPU with AVX512_VNNI (and, for AMX, its tiles)."""
        head = _avx512_head(model, torch.bfloat16) or _amx_head(model)
        if (
            head is None
            or head.in_features % 2
            or head.out_features * head.in_features * 2 >= 2**31
            or not cpu_kernels.int8_screen_available(amx=head.amx)
        ):
            return None
        return cls(head, _head_rows(model, head))

    def __call__(self, x: Tensor) -> Tensor:
        """The greedy token of each row of `x [n, K]` (bf16, rows may be strided)."""
        ids, counts = cpu_kernels.int8_screened_argmax(x, self.int8, self.weight)
        self.recomputed += int(counts.sum())
        return _full_head_where_unscreened(ids, x, self.head)


class AmxHeadArgmax:
    def __init__(self, head: PackedLinear) -> None:
        """`head`: a bf16 LM head on the AMX kernel. Not a screen (the head runs in full): its argmax
        fused into the head's epilogue."""
        self.head = head
        self.recomputed = 0  # (the screens' measure of work: nothing is recomputed here)

    @classmethod
    def for_model(cls, model: Transformer) -> AmxHeadArgmax | None:
        head = model.output
        if isinstance(head, PackedLinear) and head.amx:
            return cls(head)
        return None

    def __call__(self, x: Tensor) -> Tensor:
        """The greedy token of each row of `x [n, K]` (bf16, rows may be strided): the argmax of the
        head's logits, which are never written (cpu_kernels.amx_argmax)."""
        return cpu_kernels.amx_argmax(x, self.head.weight, self.head.kernel_bias, self.head.out_features)


Screen = LogitScreen | Int8LogitScreen | AmxHeadArgmax


def for_model(model: Transformer) -> Screen | None:
    """The greedy pick for `model`'s LM head: fp32 screened from bf16, bf16 screened from int8 (on the
    AVX-512 kernel or AMX tiles), a bf16 head on AMX tiles with its argmax fused in (where the int8
    screen does not apply), or None where none applies."""
    return LogitScreen.for_model(model) or Int8LogitScreen.for_model(model) or AmxHeadArgmax.for_model(model)


def _full_head_where_unscreened(ids: Tensor, x: Tensor, head: PackedLinear) -> Tensor:
    """`ids`, with the rows a screen left to its caller (-1: a NaN or infinity, or too many logits
    in doubt) picked from the full head by the argmax kernel's rules."""
    doubtful = (ids < 0).nonzero().flatten()
    if doubtful.numel():
        ids[doubtful] = cpu_kernels.argmax(head(x[doubtful]))
    return ids


def _avx512_head(model: Transformer, dtype: torch.dtype) -> PackedLinear | None:
    """`model`'s LM head where it runs on GenMill's AVX-512 kernel in `dtype`, without a bias."""
    head = model.output
    if isinstance(head, PackedLinear) and head.avx512 and head.weight.dtype == dtype and head.bias is None:
        return head
    return None


def _amx_head(model: Transformer) -> PackedLinear | None:
    """`model`'s LM head where it runs on AMX tiles (bf16), without a bias."""
    head = model.output
    if isinstance(head, PackedLinear) and head.amx and head.bias is None:
        return head
    return None


def _head_rows(model: Transformer, head: PackedLinear) -> Tensor:
    """The head's `[V, K]` rows, row-major: the tied embedding table, or unpacked from the kernel's layout."""
    tied = model.tok_embeddings.weight
    if model.args.tie_word_embeddings and tied.shape == (head.out_features, head.in_features):
        return tied
    if head.amx:
        return unpack_amx(head.weight, head.out_features, head.in_features)
    return unpack_avx512(head.weight, head.out_features, head.in_features)


def unpack_amx(packed: Tensor, n: int, k: int) -> Tensor:
    """The `[n, k]` rows of a weight packed by `cpu_kernels.amx_pack`."""
    block = cpu_kernels.AMX_BLOCK
    np_, kp = -(-n // block) * block, -(-k // block) * block
    # [nb][ks][t][p][c][e] -> row nb*32 + t*16 + c, column ks*32 + 2*p + e
    w = packed.view(np_ // 32, kp // 32, 2, 16, 16, 2).permute(0, 2, 4, 1, 3, 5)
    return w.reshape(np_, kp)[:n, :k]


def unpack_avx512(packed: Tensor, n: int, k: int) -> Tensor:
    """The `[n, k]` rows of a weight packed by `cpu_kernels.avx512_pack` (fp32, or bf16 with k even)."""
    panel, pair = cpu_kernels.AVX512_PANEL, 2 if packed.dtype == torch.bfloat16 else 1
    rows, offset = [], 0
    for start in range(0, n, panel):
        width = min(panel, n - start)
        block = packed[offset : offset + k * width].view(k // pair, width, pair)  # [steps, columns, pair]
        rows.append(block.permute(1, 0, 2).reshape(width, k))
        offset += k * width
    return torch.cat(rows)
