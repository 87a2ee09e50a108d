"""workers.llm.model + loader against transformers' own implementations, on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from workers.llm.loader import hf_to_ours, load_checkpoint
from workers.llm.model import ModelArgs
from workers.llm.tiny import build_tiny_checkpoint

transformers = pytest.importorskip("transformers")


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama-tied-bias-theta": (
        "llama",
        {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "rope_theta": 500.0},
    ),
    "llama-mha-headdim": ("llama", {"num_key_value_heads": 4, "head_dim": 32}),
    "llama-rope-llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama-rope-linear": ("llama", {"rope_parameters": LINEAR_ROPE}),
    "mistral-window": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {}),
    "opt": ("opt", {}),
    "opt-postnorm": ("opt", {"do_layer_norm_before": False}),
    "opt-proj-untied": ("opt", {"word_embed_proj_dim": 32, "tie_word_embeddings": False}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm_model")
    return {
        name: build_tiny_checkpoint(root / name, arch=arch, seed=i, **overrides)
        for i, (name, (arch, overrides)) in enumerate(VARIANTS.items())
    }


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_through_prefill_and_ragged_decode(checkpoints, variant):
    folder = checkpoints[variant]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    loaded = load_checkpoint(folder)
    model = loaded.model
    prompts = [[1, 45, 57, 50, 76, 268, 72, 6, 53, 12], [1, 35, 269, 6]]  # ragged batch, right-padded
    model.setup_caches(2, 32, torch.float32, "cpu")
    tokens = torch.full((2, 10), loaded.pad_id)
    tokens[0], tokens[1, :4] = torch.tensor(prompts[0]), torch.tensor(prompts[1])
    with torch.no_grad():
        ours = model(tokens, torch.arange(10).expand(2, 10))
    for row, ids in enumerate(prompts):
        torch.testing.assert_close(ours[row, : len(ids)], hf_logits(hf, ids), atol=1e-4, rtol=1e-4)

    # three decode steps where the two rows sit at different positions (10.. and 4..)
    for step, new in enumerate([[7, 9], [100, 200], [31, 5]]):
        pos = torch.tensor([[len(p)] for p in prompts])
        with torch.no_grad():
            out = model(
                torch.tensor(new)[:, None],
                pos,
                logits_index=torch.zeros(2, dtype=torch.long),
                kv_len=11 + step,
            )
        for row in range(2):
            prompts[row] = prompts[row] + [new[row]]
            torch.testing.assert_close(out[row], hf_logits(hf, prompts[row])[-1], atol=1e-4, rtol=1e-4)


def test_logits_index_picks_positions(checkpoints):
    loaded = load_checkpoint(checkpoints["llama"])
    model = loaded.model
    model.setup_caches(1, 16, torch.float32, "cpu")
    tokens = torch.tensor([[1, 45, 57, 50, 76]])
    pos = torch.arange(5)[None]
    with torch.no_grad():
        full = model(tokens, pos)
        one = model(tokens, pos, logits_index=torch.tensor([3]))
        two = model(tokens, pos, logits_index=torch.tensor([[1, 4]]))
    assert one.shape == (1, 320) and two.shape == (1, 2, 320)
    torch.testing.assert_close(one[0], full[0, 3])
    torch.testing.assert_close(two[0], full[0, [1, 4]])


def test_sharded_safetensors_load_like_single_file(checkpoints, tmp_path):
    src = checkpoints["llama"]
    sharded = tmp_path / "sharded"
    hf = transformers.AutoModelForCausalLM.from_pretrained(src)
    hf.save_pretrained(sharded, max_shard_size="100KB")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, sharded / f.name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, b = load_checkpoint(src).model, load_checkpoint(sharded).model
    for (name_a, pa), (name_b, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert name_a == name_b
        assert torch.equal(pa, pb), name_a


def test_pickle_only_checkpoint_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "bin_only"
    folder.mkdir()
    shutil.copy(checkpoints["llama"] / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(ValueError, match="safetensors are required"):
        load_checkpoint(folder)


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError, match="'gpt2'"):
        load_checkpoint(tmp_path)


def test_dtype_is_applied_and_checked(checkpoints):
    loaded = load_checkpoint(checkpoints["opt"], dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="float64"):
        load_checkpoint(checkpoints["opt"], dtype="float64")


def test_tied_embeddings_share_one_tensor(checkpoints):
    tied = load_checkpoint(checkpoints["opt"]).model
    assert tied.output.weight is tied.tok_embeddings.weight
    untied = load_checkpoint(checkpoints["opt-proj-untied"]).model
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.project_in is not None and untied.output.weight.shape == (320, 32)


def test_hf_names_map_and_unknown_names_fail():
    assert hf_to_ours("model.layers.3.mlp.up_proj.weight", "llama") == "layers.3.feed_forward.w3.weight"
    assert hf_to_ours("decoder.layers.0.fc2.bias", "opt") == "layers.0.feed_forward.w2.bias"
    assert hf_to_ours("model.decoder.final_layer_norm.weight", "opt") == "norm.weight"
    assert hf_to_ours("model.layers.0.self_attn.rotary_emb.inv_freq", "llama") is None
    with pytest.raises(KeyError):
        hf_to_ours("model.layers.0.mlp.experts.0.weight", "llama")


def test_old_style_rope_config_is_read():
    cfg = {
        "model_type": "llama",
        "vocab_size": 8,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "max_position_embeddings": 32,
        "rope_theta": 1234.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    args = ModelArgs.from_hf_config(cfg)
    assert args.rope_theta == 1234.0 and args.rope_scaling["factor"] == 2.0
    with pytest.raises(ValueError, match="yarn"):
        ModelArgs.from_hf_config({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
