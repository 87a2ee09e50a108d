"""Load an HF checkpoint folder (config.json + safetensors + tokenizer) into `workers.llm.model`.

Only safetensors are read: pickle-based `.bin`/`.pt` files can run arbitrary code when loaded.

A folder written by `workers.llm.quantize.quantize_checkpoint` (`genmill quantize`) carries
`genmill_quant.json`; it loads through the same entry points. Its quantized HF projections map one to
one onto our (unfused) wq/wk/wv/wo/w1/w2/w3 linears, which become `Int8Linear`/`Int4Linear` holding the
saved int8/packed-int4 weights, `scales` and `zeros` as stored (no dequantize/requantize round trip).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from workers.llm.model import ModelArgs, Transformer
from workers.llm.quantize import QUANT_SIDECAR, Int4Linear, Int8Linear, enable_fast_kernels, read_quantized

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_INDEX = "model.safetensors.index.json"

# HF per-layer module names -> ours
_LLAMA_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_OPT_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.out_proj": "attention.wo",
    "fc1": "feed_forward.w1",
    "fc2": "feed_forward.w2",
    "self_attn_layer_norm": "attention_norm",
    "final_layer_norm": "ffn_norm",
}
_LLAMA_TOP_NAMES = {"embed_tokens": "tok_embeddings", "norm": "norm"}
_OPT_TOP_NAMES = {
    "embed_tokens": "tok_embeddings",
    "embed_positions": "pos_embeddings",
    "final_layer_norm": "norm",
    "project_in": "project_in",
    "project_out": "project_out",
}
# Llama: "model.<rest>"; OPT: "model.decoder.<rest>" or (older exports) "decoder.<rest>"
_PREFIX = {"llama": re.compile(r"^model\.(.+)$"), "opt": re.compile(r"^(?:model\.)?decoder\.(.+)$")}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP = re.compile(r"^([a-z_]+)\.(weight|bias)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # old Llama exports saved this derived buffer


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    tokenizer: Any
    config: dict[str, Any]
    eos_ids: frozenset[int]
    pad_id: int


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def hf_to_ours(name: str, arch: str) -> str | None:
    """Map one HF parameter name to ours; None for names to skip; KeyError for unknown ones."""
    if name == "lm_head.weight":
        return "output.weight"
    if _IGNORED.search(name):
        return None
    m = _PREFIX[arch].match(name)
    if m is None:
        raise KeyError(name)
    rest = m.group(1)
    layer_names, top_names = (
        (_OPT_LAYER_NAMES, _OPT_TOP_NAMES) if arch == "opt" else (_LLAMA_LAYER_NAMES, _LLAMA_TOP_NAMES)
    )
    if lm := _LAYER.match(rest):
        idx, module, kind = lm.groups()
        if module in layer_names:
            return f"layers.{idx}.{layer_names[module]}.{kind}"
    elif tm := _TOP.match(rest):
        module, kind = tm.groups()
        if module in top_names:
            return f"{top_names[module]}.{kind}"
    raise KeyError(name)


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded via the index, or all in the folder)."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} has only pickle weights ({', '.join(pickles)}); safetensors are required "
            "(pickle files can execute code on load). Convert the checkpoint to .safetensors, "
            "e.g. with transformers' save_pretrained()."
        )
    raise FileNotFoundError(f"no *.safetensors weights in {folder}")


def _our_name(name: str, args: ModelArgs) -> str | None:
    """`hf_to_ours`, also None for a tied LM head (the embedding is the one copy we keep)."""
    ours = hf_to_ours(name, args.arch)
    if ours == "output.weight" and args.tie_word_embeddings:
        return None
    return ours


def _cast(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to(device)


def _raise_unknown(unknown: list[str]) -> None:
    if unknown:
        raise ValueError(f"unexpected parameters in checkpoint: {', '.join(unknown[:8])}")


def load_state_dict(
    folder: Path, args: ModelArgs, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                try:
                    ours = _our_name(name, args)
                except KeyError:
                    unknown.append(name)
                    continue
                if ours is not None:
                    state[ours] = _cast(f.get_tensor(name), device, dtype)
    _raise_unknown(unknown)
    return state


# ---- quantized folders (genmill_quant.json) ----

_QUANT_TENSORS = ("weight", "scales", "zeros")


def is_quantized(folder: str | Path) -> bool:
    """True for a folder written by `quantize_checkpoint` (it holds the `genmill_quant.json` sidecar)."""
    return (Path(folder) / QUANT_SIDECAR).is_file()


def _quantized_modules(qcfg: dict[str, Any], model: Transformer) -> dict[str, str]:
    """HF module name -> our module name, for every module the sidecar lists as quantized."""
    if qcfg.get("mode") not in ("int8", "int4"):
        raise ValueError(f"unsupported quantization mode {qcfg.get('mode')!r} in {QUANT_SIDECAR}")
    args = model.args
    modules: dict[str, str] = {}
    for hf_module in qcfg["modules"]:
        try:
            ours = hf_to_ours(f"{hf_module}.weight", args.arch)
        except KeyError:
            ours = None
        module = ours.removesuffix(".weight") if ours else ""
        if not module or not isinstance(model.get_submodule(module), nn.Linear):
            raise ValueError(f"quantized module {hf_module!r} is not a linear layer of our {args.arch} model")
        if module == "output" and args.tie_word_embeddings:
            raise ValueError("a quantized LM head cannot be tied to the (full-precision) embedding")
        modules[hf_module] = module
    return modules


def _install_shells(model: Transformer, modules: list[str], qcfg: dict[str, Any]) -> None:
    """Replace our `nn.Linear`s by empty (meta) quantized layers; `load_state_dict(assign=True)` fills them."""
    for name in modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        bias = lin.bias is not None
        if qcfg["mode"] == "int8":
            shell = Int8Linear(lin.in_features, lin.out_features, bias, device="meta")
        else:
            group = int(qcfg["group_size"])
            shell = Int4Linear(lin.in_features, lin.out_features, bias, group_size=group, device="meta")
        setattr(parent, child, shell)


def load_quantized_state_dict(
    folder: Path, model: Transformer, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Swap `model`'s quantized linears for Int8Linear/Int4Linear shells; return the state dict to assign.

    Codes, scales and zeros keep their stored dtypes (casting fp32 int8 scales to bf16 would coarsen
    the grid); biases, norms and embeddings are cast to `dtype` as in the fp path.
    """
    hf_state, qcfg = read_quantized(folder)
    modules = _quantized_modules(qcfg, model)
    _install_shells(model, list(modules.values()), qcfg)
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, tensor in hf_state.items():
        hf_module, _, kind = name.rpartition(".")
        if hf_module in modules and kind in _QUANT_TENSORS:
            # a fresh (aligned) copy: safetensors' tensors can sit at unaligned offsets of one buffer,
            # and aten._weight_int8pack_mm segfaults on such a weight (seen with torch 2.13 CPU)
            state[f"{modules[hf_module]}.{kind}"] = tensor.to(device, copy=True)
            continue
        try:
            ours = _our_name(name, model.args)
        except KeyError:
            unknown.append(name)
            continue
        if ours is not None:
            state[ours] = _cast(tensor, device, dtype)
    _raise_unknown(unknown)
    return state


def model_bytes(model: nn.Module) -> int:
    """Bytes of the weights one forward reads: parameters plus persistent buffers (quantized layers keep
    their codes, scales and zeros as buffers), each tensor once; the KV cache is not persistent.
    Tensors without plain storage (meta placeholders, oneDNN-packed weights) count by shape."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters())
    for module in model.modules():
        tensors += [
            b
            for name, b in module._buffers.items()
            if b is not None and name not in module._non_persistent_buffers_set
        ]
    for t in tensors:
        has_storage = t.layout == torch.strided and t.device.type != "meta"
        key = t.data_ptr() if has_storage else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def build_model(folder: Path, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Transformer:
    args = ModelArgs.from_hf_config(cfg)
    # build on "meta" so no memory is spent on random init; the checkpoint tensors are assigned as-is
    with torch.device("meta"):
        model = Transformer(args)
    quantized = is_quantized(folder)
    if quantized:
        state = load_quantized_state_dict(folder, model, device, dtype)
    else:
        state = load_state_dict(folder, args, device, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if not (k == "output.weight" and args.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match {cfg['model_type']}: missing {missing}, unexpected {unexpected}"
        )
    if quantized and dtype == torch.bfloat16:
        # aten's packed int8/int4 matmuls (each kept only if it matches the reference on a probe,
        # which is bf16); fp32 and fp16 keep dequantize + matmul
        enable_fast_kernels(model)
    return model.eval()


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def eos_token_ids(folder: Path, cfg: dict[str, Any], tokenizer: Any) -> frozenset[int]:
    """Every EOS id the checkpoint declares: config, generation_config and tokenizer may each add one."""
    ids = _ids(cfg.get("eos_token_id"))
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        ids |= _ids(json.loads(gen_path.read_text()).get("eos_token_id"))
    ids |= _ids(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an HF checkpoint folder: config.json missing")
    cfg = json.loads(path.read_text())
    ModelArgs.from_hf_config(cfg)  # fail fast on an unsupported model_type, before reading weights
    return cfg


def load_checkpoint(
    folder: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
) -> LoadedModel:
    from transformers import AutoTokenizer

    folder = Path(folder)
    device, torch_dtype = torch.device(device), resolve_dtype(dtype)
    cfg = read_config(folder)
    safetensors_files(folder)  # the safetensors-only error comes before the slow tokenizer load
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = build_model(folder, cfg, device, torch_dtype)
    pad = cfg.get("pad_token_id")
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return LoadedModel(
        model=model,
        args=model.args,
        tokenizer=tokenizer,
        config=cfg,
        eos_ids=eos_token_ids(folder, cfg, tokenizer),
        pad_id=int(pad),
    )
