"""Moshi-format Mimi weights -> transformers ``MimiModel``.

Kyutai ships Mimi inside its Moshi/Hibiki repositories in the ``moshi`` package's layout
(``encoder.model.0.conv.conv.weight``, fused ``in_proj_weight``, ``quantizer.rvq_first...``).
transformers' ``MimiModel`` names things differently and applies RoPE on split halves where moshi
interleaves pairs, so query/key rows are permuted per head. The mapping follows transformers'
``convert_mimi_checkpoint_to_pytorch.py``; the target is transformers' original flat layout
(``encoder.layers...``, ``encoder_transformer...``), which every transformers version loads, and
which `to_model_layout` re-keys for the nested layout of transformers >= 5.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

# (pattern anchored at the key start, replacement), applied in order
_PREFIXES = [
    (r"^encoder\.model\.", "encoder.layers."),
    (r"^decoder\.model\.", "decoder.layers."),
    (r"^encoder_transformer\.transformer\.", "encoder_transformer."),
    (r"^decoder_transformer\.transformer\.", "decoder_transformer."),
    (r"^quantizer\.rvq_first\.vq\.", "quantizer.semantic_residual_vector_quantizer."),
    (r"^quantizer\.rvq_first\.", "quantizer.semantic_residual_vector_quantizer."),
    (r"^quantizer\.rvq_rest\.vq\.", "quantizer.acoustic_residual_vector_quantizer."),
    (r"^quantizer\.rvq_rest\.", "quantizer.acoustic_residual_vector_quantizer."),
]
_PARTS = [
    (r"\.(conv|convtr)\.\1\.\1\.", ".conv."),  # down/upsample: conv.conv.conv / convtr.convtr.convtr
    (r"\.(conv|convtr)\.\1\.", ".conv."),  # SEANet: conv.conv / convtr.convtr
    (r"\._codebook\._initialized$", ".codebook.initialized"),
    (r"\._codebook\.embedding_sum$", ".codebook.embed_sum"),
    (r"\._codebook\.cluster_usage$", ".codebook.cluster_usage"),
    (r"\.linear1\.", ".mlp.fc1."),
    (r"\.linear2\.", ".mlp.fc2."),
    (r"\.self_attn\.out_projs?\.(0\.)?weight$", ".self_attn.o_proj.weight"),
    (r"\.norm1\.", ".input_layernorm."),
    (r"\.norm2\.", ".post_attention_layernorm."),
    (r"\.layer_scale_1\.", ".self_attn_layer_scale."),
    (r"\.layer_scale_2\.", ".mlp_layer_scale."),
]
_IN_PROJ = re.compile(r"\.self_attn\.(in_proj_weight|in_proj\.weight|in_projs\.0\.weight)$")


def _rope_rows(w: torch.Tensor, n_heads: int, to_halves: bool) -> torch.Tensor:
    """Reorder q/k rows per head between interleaved pairs (moshi) and split halves (transformers)."""
    out, dim = w.shape
    hd = out // n_heads
    shape = (n_heads, hd // 2, 2, dim) if to_halves else (n_heads, 2, hd // 2, dim)
    return w.reshape(shape).transpose(1, 2).reshape(out, dim)


def moshi_to_hf(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Moshi-format Mimi state dict -> transformers' flat Mimi state dict."""
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _PREFIXES:
            new = re.sub(pattern, repl, new)
        for pattern, repl in _PARTS:
            new = re.sub(pattern, repl, new)
        m = _IN_PROJ.search(new)
        if m:
            base = new[: m.start()] + ".self_attn."
            q, k, v = value.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=0)
            out[base + "q_proj.weight"] = _rope_rows(q, heads, to_halves=True)
            out[base + "k_proj.weight"] = _rope_rows(k, kv_heads, to_halves=True)
            out[base + "v_proj.weight"] = v
        else:
            out[new] = value
    return out


def hf_to_moshi(flat: dict[str, torch.Tensor], config: Any, transposed: set[str]) -> dict[str, torch.Tensor]:
    """The inverse of `moshi_to_hf` (used by tests to fabricate moshi-format files).

    ``transposed`` holds the flat names of the transposed convolutions (``decoder.layers.2.conv.weight``).
    """
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        m = re.match(r"^(encoder|decoder)_transformer\.layers\.(\d+)\.(.+)$", key)
        if m:
            side, layer, rest = m.groups()
            base = f"{side}_transformer.transformer.layers.{layer}."
            proj = re.match(r"^self_attn\.([qkv])_proj\.weight$", rest)
            if proj:
                pending.setdefault(base, {})[proj.group(1)] = value
                continue
            rest = (
                rest.replace("mlp.fc1.", "linear1.")
                .replace("mlp.fc2.", "linear2.")
                .replace("self_attn.o_proj.", "self_attn.out_proj.")
                .replace("input_layernorm.", "norm1.")
                .replace("post_attention_layernorm.", "norm2.")
                .replace("self_attn_layer_scale.", "layer_scale_1.")
                .replace("mlp_layer_scale.", "layer_scale_2.")
            )
            out[base + rest] = value
            continue
        new = key
        kind = "convtr" if key in transposed else "conv"
        new = re.sub(r"^(encoder|decoder)\.layers\.", r"\1.model.", new)
        if new.startswith(("downsample.", "upsample.")):
            new = re.sub(r"^(\w+)\.conv\.", rf"\1.{kind}.{kind}.{kind}.", new)
        elif new.startswith(("encoder.model.", "decoder.model.")):
            new = re.sub(r"\.conv\.(weight|bias)$", rf".{kind}.{kind}.\1", new)
        new = re.sub(
            r"^quantizer\.semantic_residual_vector_quantizer\.layers\.", "quantizer.rvq_first.vq.layers.", new
        )
        new = re.sub(
            r"^quantizer\.acoustic_residual_vector_quantizer\.layers\.", "quantizer.rvq_rest.vq.layers.", new
        )
        new = re.sub(r"^quantizer\.semantic_residual_vector_quantizer\.", "quantizer.rvq_first.", new)
        new = re.sub(r"^quantizer\.acoustic_residual_vector_quantizer\.", "quantizer.rvq_rest.", new)
        new = new.replace(".codebook.initialized", "._codebook._initialized")
        new = new.replace(".codebook.embed_sum", "._codebook.embedding_sum")
        new = new.replace(".codebook.cluster_usage", "._codebook.cluster_usage")
        out[new] = value
    for base, qkv in pending.items():
        q = _rope_rows(qkv["q"], heads, to_halves=False)
        k = _rope_rows(qkv["k"], kv_heads, to_halves=False)
        out[base + "self_attn.in_proj_weight"] = torch.cat([q, k, qkv["v"]], dim=0)
    return out


# flat (checkpoint) prefixes -> the nested modules of transformers >= 5's MimiModel
_NESTED = [
    ("encoder.layers.", "encoder.encoder_seanet.layers."),
    ("encoder_transformer.", "encoder.encoder_transformer."),
    ("downsample.", "encoder.downsample."),
    ("upsample.", "decoder.upsample."),
    ("decoder_transformer.", "decoder.decoder_transformer."),
    ("decoder.layers.", "decoder.decoder_seanet.layers."),
]


def to_model_layout(flat: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Re-key a flat Mimi state dict for the installed transformers' ``MimiModel``."""
    wanted = set(model.state_dict())
    if set(flat) == wanted:
        return flat
    out = {}
    for key, value in flat.items():
        for old, new in _NESTED:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def from_model_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The installed ``MimiModel`` state dict -> the flat checkpoint layout."""
    out = {}
    for key, value in state.items():
        for old, new in _NESTED:
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        out[key] = value
    return out


def mimi_config_from_moshi(raw: dict[str, Any], **overrides: Any):
    """A moshi-format Mimi config (``seanet``, ``quantizer``, ``transformer`` sections) -> ``MimiConfig``."""
    from transformers import MimiConfig

    seanet, quant, tr = raw["seanet"], raw["quantizer"], raw["transformer"]
    if tr["d_model"] != seanet["dimension"]:
        raise ValueError("transformers' Mimi needs transformer d_model == SEANet dimension")
    if tr.get("gating", "none") != "none" or tr.get("norm", "layer_norm") != "layer_norm":
        raise ValueError("transformers' Mimi supports only a plain FFN and layer_norm in its transformer")
    kwargs: dict[str, Any] = {
        "sampling_rate": raw.get("sample_rate", 24000),
        "audio_channels": raw.get("channels", 1),
        "hidden_size": seanet["dimension"],
        "num_filters": seanet["n_filters"],
        "num_residual_layers": seanet["n_residual_layers"],
        "upsampling_ratios": list(seanet["ratios"]),
        "kernel_size": seanet["kernel_size"],
        "last_kernel_size": seanet["last_kernel_size"],
        "residual_kernel_size": seanet["residual_kernel_size"],
        "dilation_growth_rate": seanet["dilation_base"],
        "use_causal_conv": seanet["causal"],
        "pad_mode": seanet.get("pad_mode", "constant"),
        "compress": seanet["compress"],
        "use_conv_shortcut": not seanet.get("true_skip", True),
        "codebook_size": quant["bins"],
        "codebook_dim": quant["dimension"],
        "vector_quantization_hidden_dimension": quant["dimension"],
        "num_quantizers": quant["n_q"],
        "upsample_groups": seanet["dimension"],
        "num_hidden_layers": tr["num_layers"],
        "intermediate_size": tr["dim_feedforward"],
        "num_attention_heads": tr["num_heads"],
        "num_key_value_heads": tr["num_heads"],
        "sliding_window": tr["context"],
        "layer_scale_initial_scale": tr.get("layer_scale") or 0.01,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(tr.get("max_period", 10000))},
    }
    kwargs.update(overrides)
    return MimiConfig(**kwargs)


def _load_moshi_state(src: str | Path) -> dict[str, torch.Tensor]:
    state = load_file(str(src))
    return {k: v for k, v in state.items() if not k.endswith("_embedding")}  # derived, non-persistent buffers


def build_mimi(
    src: str | Path | dict[str, torch.Tensor],
    config: Any = None,
    config_overrides: dict[str, Any] | None = None,
):
    """A ready ``MimiModel`` from a moshi-format safetensors file (or state dict), converted in memory."""
    from transformers import MimiConfig, MimiModel

    if config is None:
        config = MimiConfig(**(config_overrides or {}))
    elif config_overrides:
        config = MimiConfig(**{**config.to_dict(), **config_overrides})
    state = src if isinstance(src, dict) else _load_moshi_state(src)
    flat = moshi_to_hf(state, config)
    model = MimiModel(config)
    keyed = to_model_layout(flat, model)
    wanted = set(model.state_dict())
    missing, extra = wanted - set(keyed), set(keyed) - wanted
    if missing or extra:
        raise ValueError(
            f"Mimi weights do not match the config: missing {sorted(missing)[:6]}, extra {sorted(extra)[:6]}"
        )
    model.load_state_dict(keyed, strict=True)
    reset_codebook_cache(model)
    return model.eval().requires_grad_(False)


def reset_codebook_cache(model: torch.nn.Module) -> None:
    """Each codebook caches ``_embed`` (fp32) on first use: drop it after loading or a dtype change."""
    for mod in model.modules():
        if hasattr(mod, "_embed"):
            mod._embed = None


def convert_mimi(src: str | Path, dst: str | Path, config_overrides: dict[str, Any] | None = None) -> Path:
    """Convert a moshi-format Mimi safetensors file into a transformers ``MimiModel`` folder at ``dst``.

    ``config_overrides`` adjust ``MimiConfig`` (defaults: Kyutai's released Mimi). If ``src`` has a
    sibling JSON given as ``config_overrides={"moshi_config": path}``, that moshi-format config is used.
    """
    from transformers import EncodecFeatureExtractor, MimiConfig

    overrides = dict(config_overrides or {})
    moshi_cfg = overrides.pop("moshi_config", None)
    if moshi_cfg is not None:
        raw = moshi_cfg if isinstance(moshi_cfg, dict) else json.loads(Path(moshi_cfg).read_text())
        config = mimi_config_from_moshi(raw, **overrides)
    else:
        config = MimiConfig(**overrides)
    model = build_mimi(src, config)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    EncodecFeatureExtractor(
        feature_size=config.audio_channels, sampling_rate=config.sampling_rate
    ).save_pretrained(dst)
    return dst
