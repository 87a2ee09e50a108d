"""Load an HF checkpoint folder (config.json + safetensors + tokenizer) into `workers.llm.model`.

Only safetensors are read: pickle-based `.bin`/`.pt` files can run arbitrary code when loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from workers.llm.model import ModelArgs, Transformer

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


def load_state_dict(
    folder: Path, args: ModelArgs, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                try:
                    ours = hf_to_ours(name, args.arch)
                except KeyError:
                    unknown.append(name)
                    continue
                if ours is None or (ours == "output.weight" and args.tie_word_embeddings):
                    continue  # tied LM head: the embedding is the one copy we keep
                tensor = f.get_tensor(name)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[ours] = tensor.to(device)
    if unknown:
        raise ValueError(f"unexpected parameters in checkpoint: {', '.join(unknown[:8])}")
    return state


def build_model(folder: Path, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Transformer:
    args = ModelArgs.from_hf_config(cfg)
    # build on "meta" so no memory is spent on random init; the checkpoint tensors are assigned as-is
    with torch.device("meta"):
        model = Transformer(args)
    state = load_state_dict(folder, args, device, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if not (k == "output.weight" and args.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match {cfg['model_type']}: missing {missing}, unexpected {unexpected}"
        )
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
