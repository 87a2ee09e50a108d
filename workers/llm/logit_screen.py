"""Greedy picks for an LM head from a cheaper copy of it, exact: a bf16 or fp32 head from an int8
copy (`Int8LogitScreen`), an fp32 head from a bf16 one (`LogitScreen`); `for_model` picks the one
that applies.

A greedy row needs only the argmax of its logits, and the LM head is the widest matmul of a decode
step (a fifth of an OPT-125m fp32 step). So the head runs from a copy at half (or a quarter of) its
bytes and on faster instructions, and the few logits whose approximate value leaves a doubt (within
the approximation's rigorous error bound of the best one) are recomputed exactly, with the head's
own arithmetic: the pick is the token the head's logits would give, first maximum included. Rows
that sample, or that ask for logits, still take the full head.

The int8 copy (csrc/int8_screen.h has the bound) is summed with VPDPBUSD on an AVX512_VNNI CPU
(four multiply-adds per lane where VDPBF16PS does two and an fp32 FMA one), or with TDPBUSD on AMX
tiles. Its exact pass is the AVX-512 kernel's arithmetic for a head there (bf16 or fp32), and the
bf16 tiles themselves for a bf16 head on AMX. Costs the int8 copy (a quarter of an fp32 head, half
of a bf16 one), and for an untied head a row-major copy in the head's dtype (a tied one reads the
embedding table).

An fp32 head on a CPU without AMX is screened from a bf16 copy instead (`LogitScreen`,
csrc/logit_screen.h, VDPBF16PS; measured on a Zen 5, where the int8 one is not measured yet); on an
AMX CPU the int8 copy, summed on the tiles, was measured faster than a bf16 copy on them.

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
        """`head`: the bf16 LM head on the AVX-512 kernel or on AMX tiles, or the fp32 head on the
        AVX-512 kernel; `weight`: its `[V, K]` rows in its dtype (the exact pass reads them)."""
        self.head = head
        dtype = head.weight.dtype  # (an AMX head's packed weight is bf16)
        self.weight = weight.detach().to(dtype).contiguous()
        # the int8 sums on AMX tiles where the CPU has them (a bf16 head is on them then)
        amx = head.amx or (dtype == torch.float32 and cpu_kernels.int8_screen_available(amx=True))
        self.int8 = cpu_kernels.int8_screen_pack(self.weight, amx=amx)
        self.recomputed = 0  # logits recomputed exactly so far (a measure of the screen's work)

    @classmethod
    def for_model(cls, model: Transformer) -> Int8LogitScreen | None:
        """A screen for `model`'s LM head where it applies: bf16 on GenMill's AVX-512 kernel or AMX
        tiles, or fp32 on the AVX-512 kernel of a CPU with AMX tiles; no bias, an even K for bf16,
        under 2 GiB, a CPU with AVX512_VNNI and AVX512_BF16."""
        head = _avx512_head(model, torch.bfloat16) or _amx_head(model)
        if head is None and cpu_kernels.int8_screen_available(amx=True):
            # an fp32 head only where the copy's sums run on AMX tiles (measured faster than the bf16
            # copy there; without AMX, where the bf16 copy was measured on a Zen 5, it is not yet)
            head = _avx512_head(model, torch.float32)
        if head is None:
            return None
        bf16 = head.weight.dtype == torch.bfloat16
        if (
            (bf16 and head.in_features % 2)
            or head.out_features * head.in_features * (2 if bf16 else 4) >= 2**31
            or not cpu_kernels.int8_screen_available(amx=head.amx)
        ):
            return None
        return cls(head, _head_rows(model, head))

    def __call__(self, x: Tensor) -> Tensor:
        """The greedy token of each row of `x [n, K]` (the head's dtype, rows may be strided)."""
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
    """The greedy pick for `model`'s LM head: screened from an int8 copy (a bf16 head on the AVX-512
    kernel or AMX tiles, an fp32 head on an AMX CPU), else an fp32 head screened from a bf16 copy,
    else a bf16 head on AMX tiles with its argmax fused in, or None where none applies."""
    return Int8LogitScreen.for_model(model) or LogitScreen.for_model(model) or AmxHeadArgmax.for_model(model)


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
