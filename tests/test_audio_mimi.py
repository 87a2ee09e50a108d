"""Moshi-format Mimi -> transformers MimiModel: conversion parity on tiny random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from workers.audio.hibiki import MimiCodec
from workers.audio.lm import Transformer
from workers.audio.mimi_convert import build_mimi, convert_mimi, mimi_config_from_moshi
from workers.audio.tiny import TINY_MIMI, build_tiny_mimi, mimi_to_moshi_state, moshi_mimi_config


@pytest.fixture(scope="module")
def reference():
    return build_tiny_mimi(seed=3)


@pytest.fixture(scope="module")
def moshi_state(reference):
    state = mimi_to_moshi_state(reference)
    # the names Kyutai's files use
    assert "encoder.model.0.conv.conv.weight" in state
    assert "decoder.model.2.convtr.convtr.weight" in state
    assert "downsample.conv.conv.conv.weight" in state and "upsample.convtr.convtr.convtr.weight" in state
    assert "encoder_transformer.transformer.layers.0.self_attn.in_proj_weight" in state
    assert "quantizer.rvq_first.vq.layers.0._codebook.embedding_sum" in state
    assert "quantizer.rvq_rest.input_proj.weight" in state
    return state


def test_convert_command_output_matches(tmp_path, reference, moshi_state) -> None:
    from transformers import MimiModel

    src = tmp_path / "mimi.safetensors"
    save_file({k: v.contiguous() for k, v in moshi_state.items()}, str(src))
    dst = convert_mimi(src, tmp_path / "hf", config_overrides=dict(TINY_MIMI))
    converted = MimiModel.from_pretrained(dst).eval()
    assert (dst / "preprocessor_config.json").exists()
    x = torch.randn(2, 1, 1920 * 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        codes = reference.encode(x).audio_codes
        assert torch.equal(converted.encode(x).audio_codes, codes)
        assert codes.shape == (2, 4, 5) and codes.unique().numel() > 3
        torch.testing.assert_close(converted.decode(codes).audio_values, reference.decode(codes).audio_values)


def test_moshi_format_config_roundtrip(reference, moshi_state) -> None:
    raw = moshi_mimi_config(reference.config)
    cfg = mimi_config_from_moshi(raw)
    for key in (
        "hidden_size",
        "num_filters",
        "codebook_size",
        "num_quantizers",
        "sliding_window",
        "upsampling_ratios",
        "intermediate_size",
        "num_attention_heads",
    ):
        assert getattr(cfg, key) == getattr(reference.config, key), key
    assert cfg.frame_rate == 12.5
    model = build_mimi(moshi_state, cfg)
    x = torch.randn(1, 1, 1920 * 3)
    with torch.no_grad():
        assert torch.equal(model.encode(x).audio_codes, reference.encode(x).audio_codes)


def test_rope_permutation_matches_moshi_semantics(reference, moshi_state) -> None:
    """Moshi's interleaved RoPE (our lm.Transformer) on moshi-format weights == transformers' Mimi."""
    cfg = reference.config
    ours = Transformer(
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_hidden_layers,
        cfg.intermediate_size,
        "layer_norm",
        "none",
        0.01,
        cfg.sliding_window,
        "rope",
        10000.0,
    )
    prefix = "encoder_transformer.transformer."
    state = {}
    for key, value in moshi_state.items():
        if key.startswith(prefix):
            key = key[len(prefix) :].replace("self_attn.in_proj_weight", "self_attn.in_projs.0.weight")
            state[key.replace("self_attn.out_proj.weight", "self_attn.out_projs.0.weight")] = value
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 9, cfg.hidden_size)
    with torch.no_grad():
        theirs = reference.encoder.encoder_transformer(x).last_hidden_state
        torch.testing.assert_close(ours(x), theirs, atol=1e-5, rtol=1e-4)


def test_streaming_encode_is_exact_and_prunes_rows(reference) -> None:
    rng = np.random.default_rng(0)
    wavs = [(rng.normal(size=n) * 0.1).astype(np.float32) for n in (9000, 4000, 15000)]
    whole = MimiCodec(reference, encode_chunk_frames=64).encode(wavs, 4, [12, 12, 12])
    frame_by_frame = MimiCodec(reference, encode_chunk_frames=1).encode(wavs, 4, [12, 12, 12])
    for a, b in zip(whole, frame_by_frame, strict=True):
        assert a.shape == (4, 12) and torch.equal(a, b)
    enc = MimiCodec(reference, encode_chunk_frames=3).stream(wavs, 4)
    enc.ensure(4)
    enc.keep([0, 2])  # row 1 finished: it leaves the conv and attention caches
    enc.ensure(12)
    assert enc.codes[1].shape[1] == 6 and torch.equal(enc.codes[1], whole[1][:, :6])
    for i in (0, 2):
        assert torch.equal(enc.codes[i][:, :12], whole[i])


def test_chunked_decode_shapes(reference) -> None:
    codes = torch.randint(0, 32, (2, 11))
    whole = MimiCodec(reference).decode(codes)
    chunked = MimiCodec(reference, decode_chunk_frames=4, decode_context_frames=2).decode(codes)
    assert whole.shape == chunked.shape == (11 * 1920,)
    np.testing.assert_allclose(
        chunked[: 4 * 1920], whole[: 4 * 1920], atol=1e-4, rtol=1e-4
    )  # first chunk: no context cut
    assert np.isfinite(chunked).all()


def test_genmill_convert_mimi_command(tmp_path, reference, moshi_state) -> None:
    import json

    from click.testing import CliRunner
    from transformers import MimiModel

    from api.cli import main

    src = tmp_path / "tokenizer-mimi.safetensors"
    save_file({k: v.contiguous() for k, v in moshi_state.items()}, str(src))
    cfg = tmp_path / "mimi_config.json"
    cfg.write_text(json.dumps(moshi_mimi_config(reference.config)))
    result = CliRunner().invoke(main, ["convert-mimi", str(src), str(tmp_path / "out"), "--moshi-config", str(cfg)])
    assert result.exit_code == 0, result.output
    converted = MimiModel.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(1, 1, 1920 * 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(converted.encode(x).audio_codes, reference.encode(x).audio_codes)
    bad = CliRunner().invoke(main, ["convert-mimi", str(cfg), str(tmp_path / "out2")])
    assert bad.exit_code != 0 and str(cfg) in bad.output
