"""Tiny, random-weight HF checkpoints built locally in a second or two.

Nothing can be downloaded here, so the demo and the tests make their own "model": a SentencePiece
tokenizer trained on a bundled few-KB text plus a randomly initialised `transformers` model saved as
safetensors. The folder looks exactly like a hub checkpoint, so it exercises the real loading path.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"

# Special ids shared by the tokenizer and every model config (mismatches break EOS handling).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# Roles are written as plain words: the tokenizer only knows characters seen in the corpus.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_COMMON: dict[str, Any] = {
    "max_position_embeddings": 256,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}
_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
    # larger than the 0.02 default so the random model has peaked, non-degenerate next-token logits
    "initializer_range": 0.2,
}
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": {**_LLAMA_LIKE, "sliding_window": None},
    "qwen2": {**_LLAMA_LIKE, "use_sliding_window": False},
    "opt": {
        "hidden_size": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 64,
        "do_layer_norm_before": True,
        "dropout": 0.0,
        "init_std": 0.2,
    },
}


def _model_classes(arch: str) -> tuple[type, type]:
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "opt": (tf.OPTConfig, tf.OPTForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(classes)}")
    return classes[arch]


def build_tiny_tokenizer(folder: Path, vocab_size: int = 320) -> Any:
    """Train a BPE SentencePiece model on the bundled corpus and save it as an HF tokenizer in `folder`."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        num_threads=1,  # one thread keeps the merges deterministic
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 ignores LlamaTokenizer(vocab_file=...): the model must be DIR/tokenizer.model.
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


@torch.no_grad()
def _randomize_vectors(model: torch.nn.Module) -> None:
    """HF initialises biases to 0 and norm weights to 1; jitter them so that a loader mixing up two
    of them (e.g. the two norms of a layer) changes the outputs instead of going unnoticed."""
    for param in model.parameters():
        if param.dim() == 1:
            param.add_(0.1 * torch.randn_like(param))


def build_tiny_checkpoint(
    folder: Path, arch: str = "llama", seed: int = 0, vocab_size: int = 320, **config_overrides: Any
) -> Path:
    """Write a tokenizer and a random-weight `arch` model (safetensors) to `folder`; return `folder`.

    `config_overrides` go straight into the HF config class (e.g. `tie_word_embeddings=True`,
    `do_layer_norm_before=False`, `word_embed_proj_dim=32`, `rope_theta=500.0`).
    """
    folder = Path(folder)
    config_cls, model_cls = _model_classes(arch)
    tokenizer = build_tiny_tokenizer(folder, vocab_size)
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    config = config_cls(**{**_COMMON, **_ARCH_DEFAULTS[arch], "vocab_size": vocab_size, **config_overrides})
    # fork_rng: seed the weights without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        _randomize_vectors(model)
    model.save_pretrained(folder)
    return folder
