"""One decoder-only Transformer for the Llama family (Llama, Mistral, Qwen2) and OPT, gpt-fast style.

Static KV cache: per layer `[B, H_kv, max_seq, D]`, written at each row's own positions, so the rows of
a batch can sit at different positions. Rows are stored *right-padded*: cache slot == token position.
The attention mask is therefore just "key slot <= query position" per row; slots past a row's prompt
hold padding garbage until decoding overwrites them, and no query ever reaches them before that.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.llm import cpu_kernels

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*LLAMA_FAMILY, "opt")
OPT_POSITION_OFFSET = 2  # OPT's learned position table starts with two unused rows (fairseq legacy)


@dataclass
class ModelArgs:
    arch: str  # "llama" (whole Llama family) or "opt"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Llama family
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    # OPT
    pre_norm: bool = True  # OPT's do_layer_norm_before (False for opt-350m)
    final_norm: bool = True
    word_embed_proj_dim: int | None = None
    norm_affine: bool = True

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        model_type = cfg.get("model_type")
        if model_type in LLAMA_FAMILY:
            return cls._from_llama_family(cfg, model_type)
        if model_type == "opt":
            return cls._from_opt(cfg)
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )

    @classmethod
    def _from_llama_family(cls, cfg: dict[str, Any], model_type: str) -> ModelArgs:
        n_heads = cfg["num_attention_heads"]
        dim = cfg["hidden_size"]
        # transformers 5 nests RoPE settings in rope_parameters; older configs use rope_theta/rope_scaling
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported RoPE type {rope_type!r} (supported: default, linear, llama3)")
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
        attention_bias = bool(cfg.get("attention_bias", False))
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise ValueError("qwen2 with use_sliding_window=true is not supported")
        return cls(
            arch="llama",
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or dim // n_heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            # Qwen2 always has q/k/v biases (and no flag for them); Llama has one flag for all four
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=cfg.get("hidden_act", "silu"),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_scaling=rope if rope_type != "default" else None,
            sliding_window=cfg.get("sliding_window") if model_type == "mistral" else None,
        )

    @classmethod
    def _from_opt(cls, cfg: dict[str, Any]) -> ModelArgs:
        dim = cfg["hidden_size"]
        n_heads = cfg["num_attention_heads"]
        pre_norm = bool(cfg.get("do_layer_norm_before", True))
        bias = bool(cfg.get("enable_bias", True))
        return cls(
            arch="opt",
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=n_heads,
            head_dim=dim // n_heads,
            intermediate_size=cfg["ffn_dim"],
            max_position_embeddings=cfg["max_position_embeddings"],
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bias,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            hidden_act=cfg.get("activation_function", "relu"),
            pre_norm=pre_norm,
            # same rule as transformers: post-norm OPT (350m) has no final layer norm
            final_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
            word_embed_proj_dim=cfg.get("word_embed_proj_dim") or dim,
            norm_affine=bool(cfg.get("layer_norm_elementwise_affine", True)),
        )

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding and LM head (OPT-350m projects 512 <-> 1024)."""
        return self.word_embed_proj_dim or self.dim

    @property
    def max_context(self) -> int:
        return self.max_position_embeddings


_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}")
    return _ACTIVATIONS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = False  # one pass in workers.llm.cpu_kernels (see enable_cpu_kernels)

    def runs_kernel(self, dtype: torch.dtype) -> bool:
        # the kernel reads the weight in the input's dtype
        return self.kernel and self.weight.dtype == dtype

    def forward(self, x: Tensor) -> Tensor:
        if self.runs_kernel(x.dtype):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        # normalise in float32 and cast back before the weight, as transformers does (matters for bf16)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """OPT's norm; `kernel`: one pass in workers.llm.cpu_kernels (see enable_cpu_kernels)."""

    def __init__(self, dim: int, elementwise_affine: bool = True) -> None:
        super().__init__(dim, elementwise_affine=elementwise_affine)
        self.kernel = False

    def runs_kernel(self, dtype: torch.dtype) -> bool:
        # the kernel reads weight and bias in the input's dtype
        return self.kernel and (self.weight is None or self.weight.dtype == dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.runs_kernel(x.dtype):
            return cpu_kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_seq: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Write k/v `[B, H, T, D]` at per-row positions `input_pos [B, T]` of cache rows `rows [B]`
        (default: rows 0..B-1).

        Returns the cache rows `[B, H, kv_len, D]` to attend over: views for the default rows, a copy
        for explicit ones (prefill of newcomers into free rows, where the copy is cheap next to the work).
        """
        b = k.shape[0]
        own = torch.arange(b, device=k.device) if rows is None else rows
        # index_put_, not scatter_: scatter_ into a bf16 cache is ~500x slower on the CPU
        index = (own[:, None], slice(None), input_pos)
        self.k[index] = k.transpose(1, 2)
        self.v[index] = v.transpose(1, 2)
        if kv_len == k.shape[2]:
            # T positions all below kv_len == T: the rows hold exactly these tokens at 0..T-1 (a
            # prefill from the start), so attend over them directly instead of reading them back
            return k, v
        if rows is None:
            return self.k[:b, :, :kv_len], self.v[:b, :, :kv_len]
        return self.k[rows, :, :kv_len], self.v[rows, :, :kv_len]

    def keep_rows(self, rows: Tensor, kv_len: int) -> None:
        """Move cache rows `rows` to the front (drops finished sequences from the batch)."""
        n = rows.numel()
        self.k[:n, :, :kv_len] = self.k[rows, :, :kv_len]
        self.v[:n, :, :kv_len] = self.v[rows, :, :kv_len]

    def move_rows(self, src: Tensor, dst: Tensor, kv_len: int) -> None:
        """Copy cache rows `src` to rows `dst` (disjoint): fills the holes finished rows leave."""
        self.k[dst, :, :kv_len] = self.k[src, :, :kv_len]
        self.v[dst, :, :kv_len] = self.v[src, :, :kv_len]


def _rope_inv_freq(args: ModelArgs) -> Tensor:
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: Tensor, s: dict[str, Any]) -> Tensor:
    """Llama 3.1 RoPE: stretch low frequencies by `factor`, keep high ones, blend in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: Tensor) -> Tensor:
    # HF checkpoints keep the "two halves" RoPE layout, so no weight permutation is needed
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.wqkv: nn.Module | None = None  # wq, wk and wv as one matmul (see fuse_projections)
        self.kv_cache: KVCache | None = None
        # fp32 RoPE tables [S, D] for the decode kernel; set by Transformer.setup_caches
        self.rope_table: tuple[Tensor, Tensor] | None = None
        # decode steps and prompt attention in workers.llm.cpu_kernels (see enable_cpu_kernels)
        self.kernels = False

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.wqkv is None:
            return self.wq(x), self.wk(x), self.wv(x)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)

    def forward(
        self,
        x: Tensor,
        input_pos: Tensor,
        mask: Tensor | None,
        rope: tuple[Tensor, Tensor] | None,
        cache_rows: Tensor | None = None,
        kv_len: int | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """mask None (with kv_len): the CPU kernels' steps, chosen by Transformer.forward: a few
        tokens per row (t <= FEW_QUERIES: decode steps, speculative verification), or a prompt
        chunk whose rows all sit at positions kv_len-t..kv_len-1.
        keep `[B]`: every position's k/v goes to the cache, but only the query at position keep[b]
        of each row is attended; returns `[B, 1, dim]` (the last layer of a prefill)."""
        b, t, _ = x.shape
        q, k, v = self._project(x)
        scale = self.head_dim**-0.5
        # OPT scales q before the product; doing the same keeps results bit-close to transformers
        q_scale, scale = (scale, 1.0) if self.args.arch == "opt" else (1.0, scale)
        assert self.kv_cache is not None, "call setup_caches() before forward()"
        if mask is None and t <= FEW_QUERIES:
            # a few tokens per row, each an item of the decode kernel: RoPE, the cache write and the
            # attention in one pass (no rope from Transformer.forward: the kernel reads positions
            # and the RoPE tables). Every token takes the arithmetic of a one-token decode step, so
            # a speculative verification scores exactly what plain decoding would.
            cos, sin = self.rope_table or (_NO_ROPE, _NO_ROPE)
            rows = cache_rows if cache_rows is not None else torch.arange(b, device=x.device)
            rows = rows if t == 1 else rows.repeat_interleave(t)
            y = cpu_kernels.decode_step(
                q.reshape(b * t, -1), k.reshape(b * t, -1), v.reshape(b * t, -1), self.kv_cache.k,
                self.kv_cache.v, rows, input_pos.reshape(-1), cos, sin, q_scale, scale,
            )  # fmt: skip
            return self.wo(y.view(b, t, -1))
        if mask is None and keep is None:
            # a prompt chunk on the CPU kernels: RoPE, cache write and causal attention in one pass
            # (~2.5x torch's SDPA for 128-token prompts, and no indexed cache writes)
            cos, sin = self.rope_table or (_NO_ROPE, _NO_ROPE)
            rows = cache_rows if cache_rows is not None else torch.arange(b, device=x.device)
            y = cpu_kernels.prefill_step(
                q, k, v, self.kv_cache.k, self.kv_cache.v, rows, kv_len - t, cos, sin, q_scale, scale
            )
            return self.wo(y)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if q_scale != 1.0:
            q = q * q_scale
        kv_len = mask.shape[-1] if mask is not None else kv_len
        if hasattr(self.kv_cache, "attend"):
            # a cache that attends by itself (the offloaded executor's caches, per GPU batch)
            y = self.kv_cache.attend(input_pos, q, k, v, scale)
            return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        k, v = self.kv_cache.update(input_pos, k, v, kv_len, cache_rows)
        if keep is not None:
            rows = torch.arange(b, device=x.device)
            if mask is None:  # a prompt chunk: the kept query at position p sees slots 0..p
                slots = torch.arange(kv_len, device=x.device)
                mask = (slots[None, :] <= input_pos[rows, keep][:, None])[:, None, None]
            else:
                mask = mask[rows, :, keep][:, :, None]
            y = _attend_few(q[rows, :, keep][:, :, None], k, v, mask, scale)
            return self.wo(y.transpose(1, 2).reshape(b, 1, self.n_heads * self.head_dim))
        if t <= FEW_QUERIES:
            y = _attend_few(q, k, v, mask, scale)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=self.n_kv_heads != self.n_heads
            )
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


_NO_ROPE = torch.empty(0)  # decode_step's "no RoPE" (OPT: learned positions)
FEW_QUERIES = 8  # up to this many query positions per row, attention runs as plain batched matmuls


def _attend_few(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention for a few queries per row (decode): q `[B, H, T, D]`, k/v `[B, H_kv, S, D]`.

    SDPA's CPU kernel is tuned for long query blocks and is ~2x slower than two matmuls when T is 1.
    The query heads that share a kv head are stacked as extra query rows, so GQA needs no k/v copy.
    """
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    group = h // h_kv
    q = q.reshape(b, h_kv, group * t, d)
    if group > 1 and t > 1:
        mask = mask[:, :, None].expand(b, 1, group, t, mask.shape[-1]).reshape(b, 1, group * t, -1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1).to(v.dtype)
    return (probs @ v).view(b, h, t, d)


class FeedForward(nn.Module):
    """SwiGLU (w2(act(w1 x) * w3 x)) for the Llama family; fc1 -> act -> fc2 (w1, w2) for OPT."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.act = _activation(args.hidden_act)
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)
        self.w3 = (
            nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias) if args.arch != "opt" else None
        )
        self.w13: nn.Module | None = None  # [w1; w3] as one matmul (see fuse_projections)
        self.kernel = False  # silu(gate) * up in one pass (workers.llm.cpu_kernels)

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            h = self.w13(x)
            if self.kernel:
                return self.w2(cpu_kernels.silu_mul(h))
            gate, up = h.chunk(2, dim=-1)
            return self.w2(self.act(gate) * up)
        post_op = _ONEDNN_POST_OPS.get(self.act)
        if post_op is not None and isinstance(self.w1, PackedLinear):
            h = self.w1(x, activation=post_op)  # fused: one pass over the widest activation less
        else:
            h = self.act(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)


def _norm(args: ModelArgs) -> nn.Module:
    if args.arch == "opt":
        return LayerNorm(args.dim, elementwise_affine=args.norm_affine)
    return RMSNorm(args.dim, args.norm_eps)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.pre_norm = args.pre_norm
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = _norm(args)
        self.ffn_norm = _norm(args)

    def forward(
        self,
        x: Tensor,
        input_pos: Tensor,
        mask: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        cache_rows: Tensor | None = None,
        kv_len: int | None = None,
        keep: Tensor | None = None,
        delta: Tensor | None = None,
        defer: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """keep `[B]`: compute only position keep[b] of each row past the attention (which still
        writes every position's k/v to the cache); returns `[B, 1, dim]`. A prefill's last layer
        needs nothing more for the next-token logits, and skips most of its work.

        Pre-norm blocks only: `delta`, the block's input is x + delta (the previous block's closing
        residual add, left to this block's norm); `defer`, return (h, delta') for h + delta' and
        leave that add to the next norm the same way. The add and the norm then take one kernel pass
        over the activations, not two; the sum is rounded to the model's dtype first, as torch's add
        does, so no bits change."""

        def kept(t: Tensor) -> Tensor:
            return t if keep is None else t[torch.arange(t.shape[0], device=t.device), keep][:, None]

        if self.pre_norm:
            if delta is None:
                normed_in = self.attention_norm(x)
            else:
                x, normed_in = _add_norm(self.attention_norm, x, delta)
            attended = self.attention(normed_in, input_pos, mask, rope, cache_rows, kv_len, keep)
            h, normed = _add_norm(self.ffn_norm, kept(x), attended)
            out = self.feed_forward(normed)
            return (h, out) if defer else h + out
        # post-norm (OPT-350m)
        x = self.attention_norm(kept(x) + self.attention(x, input_pos, mask, rope, cache_rows, kv_len, keep))
        return self.ffn_norm(x + self.feed_forward(x))


def _add_norm(norm: nn.Module, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """(x + delta, norm(x + delta)): one kernel pass when the norm runs in cpu_kernels."""
    if isinstance(norm, RMSNorm) and norm.runs_kernel(x.dtype):
        return cpu_kernels.add_rms_norm(x, delta, norm.weight, norm.eps)
    if isinstance(norm, LayerNorm) and norm.runs_kernel(x.dtype):
        return cpu_kernels.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)
    h = x + delta
    return h, norm(h)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.embed_dim)
        self.pos_embeddings = (
            nn.Embedding(args.max_position_embeddings + OPT_POSITION_OFFSET, args.dim)
            if args.arch == "opt"
            else None
        )
        needs_proj = args.embed_dim != args.dim
        self.project_in = nn.Linear(args.embed_dim, args.dim, bias=False) if needs_proj else None
        self.project_out = nn.Linear(args.dim, args.embed_dim, bias=False) if needs_proj else None
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = _norm(args) if args.final_norm else None
        self.output = nn.Linear(args.embed_dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.rope_cos: Tensor | None = None
        self.rope_sin: Tensor | None = None
        self.kernels = False  # decode steps and prompt chunks in workers.llm.cpu_kernels (enable_cpu_kernels)
        self.cache_version = 0  # counts setup_caches/release_caches: what holds cache pointers checks it

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype, device) -> None:
        """Allocate the static KV cache (and the RoPE table) for up to `max_batch_size` x `max_seq_length`."""
        if max_seq_length > self.args.max_position_embeddings:
            raise ValueError(
                f"max_seq_length {max_seq_length} exceeds max_position_embeddings "
                f"{self.args.max_position_embeddings}"
            )
        a = self.args
        # free the old cache first (peak memory), and keep no half-built state if allocation fails
        self.release_caches()
        caches = [
            KVCache(max_batch_size, a.n_kv_heads, max_seq_length, a.head_dim, dtype, device)
            for _ in self.layers
        ]
        if a.arch != "opt":
            # same float32 product as transformers computes per step, so values are identical
            freqs = torch.outer(torch.arange(max_seq_length, dtype=torch.float32), _rope_inv_freq(a))
            emb = torch.cat((freqs, freqs), dim=-1).to(device)
            self.rope_cos, self.rope_sin = emb.cos(), emb.sin()
        rope_table = None if self.rope_cos is None else (self.rope_cos, self.rope_sin)
        for layer, cache in zip(self.layers, caches):
            layer.attention.kv_cache = cache
            layer.attention.rope_table = rope_table
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        self.cache_version += 1

    def release_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
            layer.attention.rope_table = None
        self.rope_cos = self.rope_sin = None
        self.max_batch_size = self.max_seq_length = -1
        self.cache_version += 1

    def keep_rows(self, rows: Tensor, kv_len: int) -> None:
        """Compact the KV cache to the sequences in `rows` (indices into the current batch)."""
        for layer in self.layers:
            layer.attention.kv_cache.keep_rows(rows, kv_len)

    def move_rows(self, src: Tensor, dst: Tensor, kv_len: int) -> None:
        """Copy KV cache rows `src` to rows `dst` (the first `kv_len` slots)."""
        for layer in self.layers:
            layer.attention.kv_cache.move_rows(src, dst, kv_len)

    def _mask(self, input_pos: Tensor, kv_len: int) -> Tensor:
        """`[B, 1, T, kv_len]` bool: a query at position p sees cache slots 0..p (of its own row)."""
        slots = torch.arange(kv_len, device=input_pos.device)
        mask = slots[None, None, :] <= input_pos[:, :, None]
        if self.args.sliding_window:
            mask &= slots[None, None, :] > input_pos[:, :, None] - self.args.sliding_window
        return mask[:, None]

    def forward(
        self,
        tokens: Tensor,
        input_pos: Tensor,
        logits_index: Tensor | None = None,
        kv_len: int | None = None,
        cache_rows: Tensor | None = None,
        prompt_chunk: bool = False,
    ) -> Tensor:
        """Run `tokens [B, T]` at per-row positions `input_pos [B, T]`, updating the KV cache.

        logits_index: `[B]` (or `[B, K]`) indices into T; logits are computed only there, giving
            `[B, V]` (or `[B, K, V]`) instead of `[B, T, V]`; prefill needs one position per row,
            and the LM head is the most expensive matmul for a small model with a big vocabulary.
        kv_len: how many cache slots to attend over (> every position in input_pos); defaults to the
            whole cache. The caller knows it without a device sync, and it keeps decode cost
            proportional to the current length instead of the cache size.
        cache_rows: `[B]` cache row of each batch row (default 0..B-1): continuous batching prefills
            newcomers into the rows that finished sequences freed.
        prompt_chunk: the caller's promise that every row sits at positions kv_len-T..kv_len-1 (a
            prompt, or a later chunk of one): attention is then plain causal, which the CPU kernels
            run without a mask.
        """
        if cache_rows is None and tokens.shape[0] > self.max_batch_size:
            raise ValueError(
                f"batch of {tokens.shape[0]} exceeds the KV cache's {self.max_batch_size} rows "
                "(call setup_caches first)"
            )
        kv_len = kv_len or self.max_seq_length
        t = tokens.shape[1]
        # the CPU kernels' steps need no mask: a few tokens per row (which also need no gathered
        # RoPE values), and a prompt chunk
        kernel_step = self.kernels and t <= FEW_QUERIES
        prompt_step = self.kernels and t > FEW_QUERIES and prompt_chunk
        mask = None if kernel_step or prompt_step else self._mask(input_pos, kv_len)
        if kernel_step and cache_rows is None:
            # the decode kernel takes explicit cache rows: built once per step, not once per layer
            cache_rows = torch.arange(tokens.shape[0], device=tokens.device)
        x = self.tok_embeddings(tokens)
        if self.project_in is not None:
            x = self.project_in(x)
        rope = None
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(input_pos + OPT_POSITION_OFFSET)
        elif not kernel_step:
            rope = (
                self.rope_cos[input_pos][:, None].to(x.dtype),
                self.rope_sin[input_pos][:, None].to(x.dtype),
            )
        # one logit position per row of a multi-token forward (a prefill): the last layer computes
        # just those positions past its attention
        keep = (
            logits_index if logits_index is not None and logits_index.dim() == 1 and t > FEW_QUERIES else None
        )
        # pre-norm blocks leave their closing residual add to the next block's norm (see
        # TransformerBlock.forward); the last block's is done here
        delta = None
        for i, layer in enumerate(self.layers):
            last = keep if i == len(self.layers) - 1 else None
            if self.args.pre_norm:
                x, delta = layer(x, input_pos, mask, rope, cache_rows, kv_len, last, delta, defer=True)
            else:
                x = layer(x, input_pos, mask, rope, cache_rows, kv_len, last)
        if delta is not None:
            x = x + delta
        if keep is not None:
            x = x[:, 0]
        elif logits_index is not None:
            x = self._gather_positions(x, logits_index)
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return self.output(x)

    @staticmethod
    def _gather_positions(x: Tensor, index: Tensor) -> Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        if index.dim() == 1:
            return x[rows, index]
        return x[rows[:, None], index]


# activations oneDNN applies inside the linear (a post-op) instead of in a pass of their own
_ONEDNN_POST_OPS = {F.relu: "relu", F.silu: "swish", F.gelu: "gelu"}
_POST_OP_FUNCTIONS = {name: fn for fn, name in _ONEDNN_POST_OPS.items()}


@torch.library.custom_op("genmill::packed_linear", mutates_args=())
def _packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none")


@_packed_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class PackedLinear(nn.Module):
    """A CPU `nn.Linear` whose weight is pre-packed in oneDNN's blocked layout.

    On x86 torch sends float32 linears to MKL, which runs far below the CPU's peak on some CPUs
    (AMD: 2-4x slower than oneDNN here); oneDNN with a packed weight is fast in fp32 and bf16, also
    for the few-row matmuls of decoding. Inference only: `weight` is an opaque oneDNN tensor (same
    shape and element count as the dense one, so parameter counts add up).

    bf16 on a CPU without bf16 instructions (AVX2 only), where oneDNN has no bf16 GEMM and torch's
    own runs at ~10 GFLOP/s against ~110 for fp32: the weight is widened to fp32 once, here (twice
    its bf16 bytes), and each call widens its input and rounds its output back to bf16. A bf16
    value widens exactly and a product of two is exact in fp32, so the result is what a bf16 GEMM
    with fp32 accumulation (oneDNN's, on CPUs that have one) gives, up to the order of the sums.

    bf16 on an AMX CPU: `cpu_kernels.amx_linear` instead, on a weight packed into its tile layout
    (a flat bf16 tensor, rows and columns padded to multiples of 32). Each output sums K in one
    fixed order, so a row's result does not depend on how many rows share the call; oneDNN's bf16
    kernels change blocking with the row count there, and a speculative verification (batch x
    (k+1) rows) could round a token differently from the decode step (batch rows) it stands for.

    fp32 (and widened bf16) on a CPU without AVX-512: `cpu_kernels.fma_linear` instead, on a weight
    packed into panels of 16 output columns. On such CPUs it runs decode-step linears 15-20% faster
    than oneDNN's fp32 kernels, prompt-sized ones from equal to ~7% slower (csrc/fma_linear.h), and
    it too sums each output in one fixed order, whatever the row count.

    fp32 on any AVX-512 CPU, and bf16 on one without AMX (where it has AVX512_BF16):
    `cpu_kernels.avx512_linear`, on a weight packed into panels of 48 output columns. Measured on a
    Zen 5 EPYC: decode-step linears, whose weights stream from memory, 10-20% faster than oneDNN's;
    prompt-sized ones even in fp32 and 2-8% slower in bf16 (csrc/avx512_linear.h). Its rows, too,
    come out the same whatever the row count, which oneDNN's bf16 kernels do not promise. On an
    AMX Xeon (fp32 has no tiles there) it measured 2-8% faster than oneDNN at decode shapes, 25% on
    an LM head, and 7-17% slower on prompt-sized ones alone; whole OPT-125m fp32 runs at batch 64
    came out 6% faster, the decode steps 9% (with the flat decode steps and the LM-head screen that
    the kernel enables, workers/llm/fast_decode.py).
    """

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        self.widened = weight.dtype == torch.bfloat16 and widens_bf16()
        # bf16 on an AMX CPU: GenMill's own tile kernel (cpu_kernels.amx_linear), whose rows come
        # out the same whatever the row count; oneDNN's change from 33 rows on there
        self.amx = weight.dtype == torch.bfloat16 and not self.widened and cpu_kernels.amx_available()
        # fp32 on a CPU without AVX-512: GenMill's FMA tile kernel (faster than oneDNN's there)
        self.fma = (weight.dtype == torch.float32 or self.widened) and cpu_kernels.fma_linear_available()
        # fp32 on an AVX-512 CPU, bf16 on one without AMX: GenMill's AVX-512 tile kernel
        self.avx512 = not self.widened and not self.amx and cpu_kernels.avx512_linear_available(weight.dtype)
        if self.widened:
            weight, bias = weight.float(), None if bias is None else bias.float()
        if self.amx:
            packed = cpu_kernels.amx_pack(weight)
        elif self.fma:
            packed = cpu_kernels.fma_pack(weight)
        elif self.avx512:
            packed = cpu_kernels.avx512_pack(weight)
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # GenMill's bf16 kernels add the bias in fp32, as oneDNN does
        kernel_bias = bias.float() if (self.amx or self.avx512) and bias is not None else None
        self.register_buffer("kernel_bias", kernel_bias, persistent=False)

    def forward(self, x: Tensor, activation: str = "none") -> Tensor:
        """`activation`: "none" or a oneDNN post-op ("relu", "swish", "gelu") applied to the output."""
        if self.amx or self.avx512:
            kernel = cpu_kernels.amx_linear if self.amx else cpu_kernels.avx512_linear
            y = kernel(x, self.weight, self.kernel_bias, self.out_features, activation == "relu")
            return y if activation in ("none", "relu") else _POST_OP_FUNCTIONS[activation](y)
        if self.fma:
            y = cpu_kernels.fma_linear(
                x.float(), self.weight, self.bias, self.out_features, activation == "relu"
            )
            y = y if activation in ("none", "relu") else _POST_OP_FUNCTIONS[activation](y)
            return y.to(x.dtype)
        if self.widened:
            return self._linear(x.float(), activation).to(x.dtype)
        return self._linear(x, activation)

    def _linear(self, x: Tensor, activation: str) -> Tensor:
        if x.dtype == torch.float32 and x.numel() == self.in_features:
            # oneDNN's fp32 one-row path sums in another order than its many-row kernels (seen for
            # K >= 2048), so a row would round differently alone than within a batch, e.g. a decode
            # step vs a speculative verification. Two rows take the batch kernels at the same cost.
            two = x.reshape(1, -1).expand(2, -1).contiguous()
            return self._linear(two, activation)[:1].view(*x.shape[:-1], self.out_features)
        if torch.compiler.is_compiling():
            # an opaque op to inductor: its own oneDNN lowering wants weights it packed itself
            return _packed_linear(x, self.weight, self.bias, activation)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, activation, [], "none")


@functools.cache  # a property of the CPU and the torch build; asked per call by onednn_linear
def _onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs linears of `dtype` here: fp32 wherever it is built, bf16 only on CPUs
    with bf16 instructions (AVX-512 BF16 / AMX; an AVX2-only CPU has no bf16 primitive at all)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def widens_bf16() -> bool:
    """Whether `PackedLinear` runs bf16 as fp32 on widened weights here (no bf16 GEMM in oneDNN)."""
    return not _onednn_supports(torch.bfloat16)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` through oneDNN for a dense (not pre-packed) weight on the CPU, float32 or bf16.

    For weights that arrive per call (offloaded layers, read from disk each step) and so cannot be
    packed ahead: in float32 at a few rows it runs ~2x torch's default path (MKL) on AMD CPUs
    (measured 120 vs 60 GFLOP/s at 8 rows, 185 vs 130 at 32); bf16 already goes to oneDNN."""
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.layout == torch.strided
        and not torch.compiler.is_compiling()
        and _onednn_supports(x.dtype)
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose forward is `onednn_linear` (weights swapped in per call, e.g. by
    `functional_call`)."""

    def forward(self, x: Tensor) -> Tensor:
        return onednn_linear(x, self.weight, self.bias)


def use_onednn_linears(module: nn.Module) -> int:
    """Swap every plain `nn.Linear` of `module` for a `OneDNNLinear` sharing its parameters;
    returns how many were swapped."""

    def onednn(child: nn.Linear) -> OneDNNLinear:
        with torch.device("meta"):
            new = OneDNNLinear(child.in_features, child.out_features, bias=child.bias is not None)
        new.weight, new.bias = child.weight, child.bias
        return new

    return _replace_linears(module, onednn)


def _replace_linears(module: nn.Module, build: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every plain `nn.Linear` (not subclasses, e.g. quantized ones) by `build(linear)`."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, build(child))
                swapped += 1
    return swapped


def cpu_kernels_apply(device: torch.device, dtype: torch.dtype, args: ModelArgs) -> bool:
    """Whether workers.llm.cpu_kernels can run this model's layers: CPU, fp32 or bf16, a supported
    head size, no sliding window (whose mask the kernels do not apply), and a built library."""
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and not args.sliding_window
        and args.head_dim in cpu_kernels.HEAD_DIMS
        and cpu_kernels.available()
    )


def enable_cpu_kernels(model: Transformer) -> bool:
    """Run decode steps, prompt attention, RMSNorm, LayerNorm and the SwiGLU gate in
    workers.llm.cpu_kernels where they apply (`cpu_kernels_apply`). Returns whether they are on."""
    param = next(model.parameters())
    on = cpu_kernels_apply(param.device, param.dtype, model.args)
    model.kernels = on
    for layer in model.layers:
        layer.attention.kernels = on
        layer.feed_forward.kernel = on and model.args.hidden_act in ("silu", "swish")
    for module in model.modules():
        if isinstance(module, (RMSNorm, LayerNorm)):
            module.kernel = on
    return on


def fuse_projections(model: Transformer) -> int:
    """Concatenate each layer's q/k/v projections into one `wqkv`, and the Llama family's gate and
    up projections into one `w13`: one matmul with a wider output instead of three (two) small ones,
    which on the CPU runs the same FLOPs ~10% faster and saves the per-call overhead of decode steps.
    Only plain `nn.Linear`s of one dtype are fused (quantized layers stay as they are). Returns how
    many groups were fused."""
    fused = 0
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        if attn.wqkv is None and _fusable(attn.wq, attn.wk, attn.wv):
            attn.wqkv = _concat_linears(attn.wq, attn.wk, attn.wv)
            attn.wq = attn.wk = attn.wv = None
            fused += 1
        if ffn.w3 is not None and ffn.w13 is None and _fusable(ffn.w1, ffn.w3):
            ffn.w13 = _concat_linears(ffn.w1, ffn.w3)
            ffn.w1 = ffn.w3 = None
            fused += 1
    return fused


def _fusable(*linears: nn.Module | None) -> bool:
    if not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0]
    return all(
        m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device
        and m.in_features == first.in_features
        and (m.bias is None) == (first.bias is None)
        for m in linears
    )


def _concat_linears(*linears: nn.Linear) -> nn.Linear:
    first = linears[0]
    out = sum(m.out_features for m in linears)
    with torch.device("meta"):
        fused = nn.Linear(first.in_features, out, bias=first.bias is not None)
    fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return fused


def can_pack_linears(model: nn.Module) -> bool:
    param = next(model.parameters())
    return (
        param.device.type == "cpu"
        and param.dtype in (torch.float32, torch.bfloat16)
        and _onednn_supports(torch.float32)  # bf16 without bf16 instructions: widened (see PackedLinear)
    )


def pack_linears(model: nn.Module, batch_hint: int = 64) -> int:
    """Swap every plain `nn.Linear` of `model` for a `PackedLinear`; returns how many were swapped.

    Subclasses (e.g. quantized linears) are left alone. The LM head of a tied model gets its own
    packed copy; the embedding keeps the original tensor.
    """
    return _replace_linears(model, lambda child: PackedLinear(child, batch_hint))
