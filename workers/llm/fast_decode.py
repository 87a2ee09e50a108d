"""A decode step on the CPU kernels without the module tree: one C call per kernel, activations in
buffers allocated once.

Why: a decode step of a 12-layer model is ~70 kernel calls. Through the modules (nn.Module calls,
argument checks, a new output tensor per call, torch's residual adds) they cost ~2.5 ms of Python a
step on a 2-core EPYC, measured on a 12-layer model too small for its kernels to matter: ~8% of a
batch-64 OPT-125m bf16 step, and most of a small batch's. Here the step is a flat list of calls with
their arguments bound once: the weights, the KV cache and every activation buffer stay where they
are between steps, so only the row count and the positions change.

The arithmetic is the modules' own: the same kernels in the same order, with one fusion that
changes no bits, a layer's closing residual add done by the next norm's add+norm kernel (which
rounds the sum to the model dtype first, as torch's add does). `FastDecode.build` returns None for a
model it does not cover (post-norm OPT, projected embeddings, quantized or oneDNN linears, a norm or
activation off the kernels); the caller then keeps the module path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from workers.llm import cpu_kernels, logit_screen
from workers.llm.cpu_kernels import _ptr
from workers.llm.logit_screen import Screen
from workers.llm.model import (
    OPT_POSITION_OFFSET,
    LayerNorm,
    PackedLinear,
    RMSNorm,
    Transformer,
)

Call = tuple[Callable[..., int], tuple[Any, ...]]  # a kernel and its arguments, the row count as ROWS
ROWS = object()  # stands for the step's row count in a bound call's arguments (None is a null pointer)


class FastDecode:
    """One-token-per-row decode steps of `model` (eager, CPU kernels on) for up to its cache's rows.

    Bound to the model's current KV cache and RoPE tables: `matches(model)` tells whether they are
    still the ones it was built for (setup_caches reallocates them, counted by `cache_version`)."""

    def __init__(self, model: Transformer, screen: Screen | None = None, greedy_screen: bool = True) -> None:
        self.model = model
        a = model.args
        self.lib = cpu_kernels._library()
        self.dtype = next(model.parameters()).dtype
        self.code = cpu_kernels._DTYPES[self.dtype]
        self.cache_version = model.cache_version
        cap = model.max_batch_size
        self.rows = torch.arange(cap, dtype=torch.int64)
        self.pos = torch.zeros(cap, dtype=torch.int64)

        def buffer(width: int) -> Tensor:
            return torch.empty(cap, width, dtype=self.dtype)

        attn0, ffn0 = model.layers[0].attention, model.layers[0].feed_forward
        self.x, self.normed, self.h, self.o = (buffer(a.dim) for _ in range(4))
        self.qkv, self.attn = buffer(attn0.wqkv.out_features), buffer(a.n_heads * a.head_dim)
        self.f1 = buffer((ffn0.w13 if ffn0.w13 is not None else ffn0.w1).out_features)
        self.gate = buffer(self.f1.shape[1] // 2) if ffn0.w13 is not None else None
        self.f2 = buffer(a.dim)
        self.vocab = model.output.out_features

        self.layers: list[list[Call]] = []
        norms = [layer.attention_norm for layer in model.layers[1:]] + [model.norm]
        for layer, next_norm in zip(model.layers, norms):
            attn, ffn = layer.attention, layer.feed_forward
            calls = [
                self._linear(attn.wqkv, self.normed, self.qkv),
                self._attention(attn),
                self._linear(attn.wo, self.attn, self.o),
                self._add_norm(layer.ffn_norm, self.x, self.o, self.h, self.normed),
            ]
            if ffn.w13 is not None:
                gate = (self.code, self.f1.data_ptr(), self.gate.data_ptr(), ROWS, self.gate.shape[1])
                calls += [
                    self._linear(ffn.w13, self.normed, self.f1),
                    (self.lib.genmill_silu_mul, gate),
                    self._linear(ffn.w2, self.gate, self.f2),
                ]
            else:
                calls += [
                    self._linear(ffn.w1, self.normed, self.f1, relu=True),
                    self._linear(ffn.w2, self.f1, self.f2),
                ]
            # this layer's closing residual add with the next layer's norm (the final norm after
            # the last layer): x = h + ffn, normed = norm(x)
            calls.append(self._add_norm(next_norm, self.h, self.f2, self.x, self.normed))
            self.layers.append(calls)
        self.first_norm = self._norm(model.layers[0].attention_norm, self.x, self.normed)
        self.head = model.output
        # greedy rows: the LM head from a cheaper copy, exact where it matters (logit_screen.py); it
        # depends on the weights only, so a plan rebuilt for a new cache takes the old one's
        self.screen: Screen | None = None
        if screen is not None and screen.head is model.output:
            self.screen = screen
        elif greedy_screen:
            self.screen = logit_screen.for_model(model)

    @classmethod
    def build(
        cls, model: Transformer, screen: Screen | None = None, greedy_screen: bool = True
    ) -> FastDecode | None:
        """A FastDecode for `model`, or None where it does not apply (see the module docstring);
        `screen`: a previous plan's, reused if it is for this model's LM head; `greedy_screen`
        False: no screen (all-greedy steps take the full head too)."""
        return cls(model, screen, greedy_screen) if supports(model) else None

    def matches(self, model: Transformer) -> bool:
        return model is self.model and model.cache_version == self.cache_version

    def __call__(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """Logits `[B, V]` for `tokens [B, 1]` at `input_pos [B, 1]` (rows 0..B-1 of the cache)."""
        n = self._layers(tokens, input_pos)
        logits = torch.empty(n, self.vocab, dtype=self.dtype)
        self._run(self._linear(self.head, self.normed, logits), n)
        return logits

    def greedy(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """The argmax of the logits `__call__` would return, `[B]`, through `screen` (which must be set)."""
        n = self._layers(tokens, input_pos)
        return self.screen(self.normed[:n])

    def _layers(self, tokens: Tensor, input_pos: Tensor) -> int:
        """Every layer and the final norm (into `normed`); returns the row count."""
        n = tokens.shape[0]
        m = self.model
        if not self.matches(m) or n > self.rows.numel():
            raise ValueError(
                f"{n} rows for a FastDecode built for {self.rows.numel()} (or for an older cache)"
            )
        x = m.tok_embeddings(tokens)
        if m.pos_embeddings is not None:
            x = x + m.pos_embeddings(input_pos + OPT_POSITION_OFFSET)
        self.x[:n].copy_(x.view(n, -1))
        self.pos[:n].copy_(input_pos.view(-1))
        self._run(self.first_norm, n)
        for calls in self.layers:
            for call in calls:
                self._run(call, n)
        return n

    # ---- bound calls: ROWS in the arguments stands for the row count ----

    def _run(self, call: Call, n: int) -> None:
        fn, args = call
        status = fn(*(n if a is ROWS else a for a in args))
        if status != 0:
            raise RuntimeError(f"{fn.__name__} failed (status {status})")

    def _attention(self, attn: nn.Module) -> Call:
        """RoPE, the cache write and the attention of one token per row (the decode kernel), on q, k
        and v as column slices of the qkv buffer."""
        a = self.model.args
        h, h_kv, d = a.n_heads, a.n_kv_heads, a.head_dim
        q_scale, scale = (d**-0.5, 1.0) if a.arch == "opt" else (1.0, d**-0.5)  # as Attention.forward
        q, sq, esize = self.qkv.data_ptr(), self.qkv.stride(0), self.dtype.itemsize
        k, v = q + h * d * esize, q + (h + h_kv) * d * esize
        cache, (cos, sin) = attn.kv_cache, attn.rope_table or (None, None)
        args = (
            self.code, q, sq, k, sq, v, sq, cache.k.data_ptr(), cache.v.data_ptr(), self.rows.data_ptr(),
            self.pos.data_ptr(), _ptr(cos), _ptr(sin), self.attn.data_ptr(), ROWS, h, h_kv, cache.k.shape[2], d,
            q_scale, scale,
        )  # fmt: skip
        return self.lib.genmill_decode_step, args

    def _linear(self, lin: PackedLinear, x: Tensor, y: Tensor, relu: bool = False) -> Call:
        args = (x.data_ptr(), x.stride(0), lin.weight.data_ptr())
        tail = (y.data_ptr(), ROWS, lin.out_features, lin.in_features, int(relu))
        if lin.avx512:
            return self.lib.genmill_avx512_linear, (self.code, *args, _ptr(lin.kernel_bias), *tail)
        if lin.amx:
            return self.lib.genmill_amx_linear, (*args, _ptr(lin.kernel_bias), *tail)
        return self.lib.genmill_fma_linear, (*args, _ptr(lin.bias), *tail)

    def _norm(self, norm: nn.Module, x: Tensor, y: Tensor) -> Call:
        return self._add_norm(norm, x, None, None, y)

    def _add_norm(
        self, norm: nn.Module, x: Tensor, residual: Tensor | None, s: Tensor | None, y: Tensor
    ) -> Call:
        if isinstance(norm, RMSNorm):
            args = (self.code, x.data_ptr(), _ptr(residual), norm.weight.data_ptr(), _ptr(s), y.data_ptr(), ROWS,
                    x.shape[1], norm.eps)  # fmt: skip
            return self.lib.genmill_rms_norm, args
        args = (self.code, x.data_ptr(), _ptr(residual), _ptr(norm.weight), _ptr(norm.bias), _ptr(s),
                y.data_ptr(), ROWS, x.shape[1], norm.eps)  # fmt: skip
        return self.lib.genmill_layer_norm, args


def _kernel_linear(lin: nn.Module, dtype: torch.dtype) -> bool:
    """A PackedLinear on one of GenMill's kernels, its input and output in the model dtype."""
    if not isinstance(lin, PackedLinear) or lin.widened:
        return False
    if lin.avx512:  # bf16 with an odd K: the wrapper pads x per call
        return dtype == torch.float32 or lin.in_features % 2 == 0
    if lin.amx:
        return dtype == torch.bfloat16
    return lin.fma and dtype == torch.float32


def _kernel_norm(norm: nn.Module | None, dtype: torch.dtype) -> bool:
    return isinstance(norm, (RMSNorm, LayerNorm)) and norm.runs_kernel(dtype)


def supports(model: Transformer) -> bool:
    """Whether FastDecode covers `model` as it is now: CPU kernels on, caches set up, pre-norm
    blocks whose projections, norms and gate all run on GenMill's kernels."""
    a = model.args
    dtype = next(model.parameters()).dtype
    if not (model.kernels and model.max_batch_size > 0 and a.pre_norm and model.project_in is None):
        return False
    if not (_kernel_norm(model.norm, dtype) and _kernel_linear(model.output, dtype)):
        return False
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        linears = [attn.wqkv, attn.wo, ffn.w2] + ([ffn.w13] if ffn.w13 is not None else [ffn.w1])
        if not all(_kernel_linear(lin, dtype) for lin in linears):
            return False
        if not (_kernel_norm(layer.attention_norm, dtype) and _kernel_norm(layer.ffn_norm, dtype)):
            return False
        if attn.kv_cache is None or hasattr(attn.kv_cache, "attend") or not attn.kernels:
            return False
        if ffn.w13 is not None and not ffn.kernel:
            return False
        if ffn.w13 is None and (ffn.w3 is not None or ffn.act is not torch.nn.functional.relu):
            return False
    return True
