"""workers.llm.tiny: deterministic tiny checkpoints whose config agrees with their tokenizer."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from workers.llm.tiny import CORPUS, build_tiny_checkpoint


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, arch):
    a = build_tiny_checkpoint(tmp_path / "a", arch=arch, seed=5)
    b = build_tiny_checkpoint(tmp_path / "b", arch=arch, seed=5)
    c = build_tiny_checkpoint(tmp_path / "c", arch=arch, seed=6)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_config_ids_match_the_tokenizer(tmp_path, arch):
    folder = build_tiny_checkpoint(tmp_path / arch, arch=arch, vocab_size=300)
    cfg = json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    assert cfg["model_type"] == arch and cfg["vocab_size"] == len(tok) == 300
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    ids = tok("The mill stood at the bend of the river.")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "The mill stood at the bend of the river."
    assert tok.chat_template and (folder / "tokenizer.model").is_file()


def test_corpus_is_a_few_kb_of_prose():
    text = CORPUS.read_text(encoding="utf-8")
    assert 6_000 <= len(text.encode()) <= 10_000
    assert text.isascii()
