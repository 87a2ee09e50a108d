"""Weight-only int8/int4 quantization and safetensors checkpoints (workers/llm/quantize.py)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from workers.llm.quantize import (
    QUANT_SIDECAR,
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    enable_fast_kernels,
    load_quantized,
    quantize_checkpoint,
    quantize_int4,
    quantize_int8,
    quantize_model,
    save_quantized,
)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_within_half_step_per_row(scale_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 200) * torch.rand(96, 1)
    q, scales = quantize_int8(w, scale_dtype)
    assert q.dtype == torch.int8 and scales.dtype == scale_dtype and q.abs().max() <= 127
    err = (dequantize_int8(q, scales) - w).abs()
    # scales are rounded up before quantizing, so nothing is clamped: error <= scale / 2
    assert (err <= 0.5 * scales.float()[:, None] * (1 + 1e-5)).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("in_features", [256, 100])
def test_int4_within_half_step_per_group(group_size: int, in_features: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(48, in_features) * 0.05 + 0.01
    packed, scales, zeros = quantize_int4(w, group_size)
    groups = -(-in_features // group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (48, groups * group_size // 2)
    assert scales.shape == zeros.shape == (48, groups) and scales.dtype == torch.bfloat16
    w_hat = dequantize_int4(packed, scales, zeros, in_features)
    step = scales.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    assert ((w_hat - w).abs() <= 0.5 * step * (1 + 1e-5) + 1e-7).all()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _uniform_model_rel_error(step: torch.Tensor, w: torch.Tensor) -> float:
    # Rounding error ~ U(-step/2, step/2): rms = step/sqrt(12). For inputs independent of W the
    # expected relative output error is ||W - W_hat||_F / ||W||_F, i.e. this ratio.
    return float(step.float().pow(2).mean().sqrt() / math.sqrt(12) / w.detach().float().pow(2).mean().sqrt())


@torch.no_grad()
def test_int8_linear_close_to_fp() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(768, 768)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(32, 768)
    rel = _rel(q(x) - lin.bias, lin(x) - lin.bias)
    # U(-a, a) init: step = absmax/127 ~ a/127, rms weight a/sqrt(3) -> 1/(127*2) ~ 0.0039.
    assert rel <= 1.2 * _uniform_model_rel_error(q.scales, lin.weight)
    assert rel <= 1.1 / 254
    assert q(x.bfloat16()).dtype == torch.bfloat16


@torch.no_grad()
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_close_to_fp(group_size: int) -> None:
    torch.manual_seed(3)
    lin = nn.Linear(768, 512)
    q = Int4Linear.from_linear(lin, group_size)
    x = torch.randn(32, 768)
    rel = _rel(q(x) - lin.bias, lin(x) - lin.bias)
    # U(-a, a) init: step <= 2a/15 -> relative error <= (2a/15/sqrt(12)) / (a/sqrt(3)) = 1/15.
    assert rel <= 1.2 * _uniform_model_rel_error(q.scales, lin.weight)
    assert rel <= 1.1 / 15
    assert q.weight.numel() == 512 * 768 // 2


@torch.no_grad()
def test_fast_kernels_agree_with_reference_path() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    for mode in ("int8", "int4"):
        qm = quantize_model(copy.deepcopy(model), mode, group_size=64)
        ref = qm(x).float()
        if enable_fast_kernels(qm) == 0:
            pytest.skip("no packed kernels in this torch build")
        # both paths see the same quantized weights; they differ only by bf16 accumulation order
        assert _rel(qm(x).float(), ref) < 2e-2


class TinyLM(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False))
        self.lm_head = nn.Linear(64, 50, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.lm_head(h + self.mlp(h))


@torch.no_grad()
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_replaces_linears_but_skips_head(mode: str) -> None:
    torch.manual_seed(5)
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids)
    quantize_model(model, mode, group_size=64)
    cls = Int8Linear if mode == "int8" else Int4Linear
    assert isinstance(model.mlp[0], cls) and isinstance(model.mlp[2], cls)
    assert type(model.lm_head) is nn.Linear
    assert model.mlp[2].bias is None and model.mlp[0].bias is not None
    assert _rel(model(ids), ref) < (0.02 if mode == "int8" else 0.15)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_save_load_round_trip_identical(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(6)
    model = quantize_model(TinyLM(tie=True), mode, group_size=32)
    ids = torch.randint(0, 50, (3, 5))
    expected = model(ids)
    save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [QUANT_SIDECAR, "model.safetensors"]
    meta = json.loads((tmp_path / QUANT_SIDECAR).read_text())
    assert meta["mode"] == mode and meta["modules"] == ["mlp.0", "mlp.2"]
    assert meta["group_size"] == (32 if mode == "int4" else None)
    assert meta["aliases"] == {"lm_head.weight": "embed.weight"}  # tied storage written once

    fresh = TinyLM(tie=True)  # different random weights, replaced by the file's
    load_quantized(fresh, tmp_path)
    assert torch.equal(fresh(ids), expected)
    assert fresh.lm_head.weight.data_ptr() == fresh.embed.weight.data_ptr()


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(7)
    return LlamaForCausalLM(cfg).eval(), LlamaForCausalLM


@torch.no_grad()
@pytest.mark.parametrize("mode,tie", [("int8", False), ("int4", True)])
def test_quantize_checkpoint_tiny_llama(tmp_path: Path, mode: str, tie: bool) -> None:
    model, cls = _tiny_llama(tie)
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 128}')  # stands in for tokenizer files

    meta = quantize_checkpoint(src, dst, mode=mode, group_size=64)

    assert (dst / QUANT_SIDECAR).is_file() and (dst / "config.json").is_file()
    assert (dst / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    assert json.loads((dst / QUANT_SIDECAR).read_text()) == meta
    assert len(meta["modules"]) == 2 * 7  # q k v o gate up down per layer
    assert meta["quantized_bytes"] < 0.6 * meta["source_bytes"]
    qtype = torch.int8 if mode == "int8" else torch.uint8
    with (
        safe_open(str(dst / "model.safetensors"), "pt") as f,
        safe_open(str(src / "model.safetensors"), "pt") as g,
    ):
        names = set(f.keys())
        for mod in meta["modules"]:
            assert f.get_tensor(f"{mod}.weight").dtype == qtype
            assert f"{mod}.scales" in names and (f"{mod}.zeros" in names) == (mode == "int4")
        # embeddings, norms (and an untied head) are copied unchanged
        for name in list(g.keys()):  # safe_open is not iterable
            if not any(name == f"{m}.weight" for m in meta["modules"]):
                assert torch.equal(f.get_tensor(name), g.get_tensor(name)), name

    # The folder loads into a model built from the config and matches quantize_model on the source.
    loaded = load_quantized(cls(model.config).eval(), dst)
    ids = torch.randint(0, 256, (2, 9))
    expected = quantize_model(model, mode, group_size=64)(ids).logits
    assert torch.equal(loaded(ids).logits, expected)
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_quantize_checkpoint_refuses_pickles_and_bad_args(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError):
        quantize_checkpoint(tmp_path, tmp_path / "out", "int8")
    with pytest.raises(ValueError):
        quantize_checkpoint(tmp_path, tmp_path / "out", "int4", group_size=48)
    with pytest.raises(ValueError):
        quantize_model(nn.Linear(4, 4), "int3")  # type: ignore[arg-type]
    # a bare layer comes back converted (it cannot be swapped inside a parent)
    assert isinstance(quantize_model(nn.Linear(64, 32), "int8"), Int8Linear)
