"""Tiny random models of each engine kind, built locally (nothing comes from the hub).

- `build_tiny_hibiki`: a moshi-format Hibiki folder (config.json, LM safetensors, moshi-format Mimi
  safetensors + its moshi-format config, SentencePiece tokenizer trained on ``data/tiny_corpus.txt``).
- `build_tiny_whisper`, `build_tiny_seamless`: transformers folders (random weights, safetensors) with
  tokenizers built from the same corpus.
Sizes are parameters so the benchmark can build "small" instead of "tiny" models.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "tiny_corpus.txt"

TINY_LM: dict[str, Any] = {
    "dim": 32,
    "text_card": 48,
    "existing_text_padding_id": 3,
    "existing_text_end_padding_id": 0,
    "n_q": 4,
    "dep_q": 2,
    "card": 32,
    "delays": [0, 0, 1, 0, 1],
    "num_heads": 2,
    "num_layers": 2,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 250,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 16,
    "depformer_dim_feedforward": 48,
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 2,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "conditioners": {
        "description": {
            "type": "lut",
            "lut": {
                "n_bins": 31,
                "dim": 16,
                "tokenizer": "noop",
                "possible_values": ["very_bad", "bad", "neutral", "good", "very_good"],
            },
        }
    },
    "fuser": {"sum": ["description"]},
}

TINY_MIMI: dict[str, Any] = {
    "hidden_size": 32,
    "num_filters": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "codebook_size": 32,
    "codebook_dim": 8,
    "vector_quantization_hidden_dimension": 8,
    "num_quantizers": 4,
    "upsample_groups": 32,
}


def train_spm(vocab_size: int, *, user_symbols: list[str] | None = None) -> bytes:
    """A SentencePiece model (unk 0, bos 1, eos 2, pad 3 as Kyutai's) trained on the bundled corpus."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(CORPUS),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
        user_defined_symbols=user_symbols or [],
    )
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Mimi


def tiny_mimi_config(**overrides: Any):
    from transformers import MimiConfig

    return MimiConfig(**{**TINY_MIMI, **overrides})


@torch.no_grad()
def build_tiny_mimi(seed: int = 0, **overrides: Any):
    """A random MimiModel whose codebooks are spread out (zeros would map every frame to code 0)."""
    from transformers import MimiModel

    from workers.audio.mimi_convert import reset_codebook_cache

    torch.manual_seed(seed)
    model = MimiModel(tiny_mimi_config(**overrides)).eval()
    for name, buf in model.named_buffers():
        if name.endswith("embed_sum"):
            buf.normal_()
        elif name.endswith("cluster_usage"):
            buf.uniform_(0.5, 2.0)
    for name, p in model.named_parameters():
        if name.endswith("scale"):
            p.uniform_(0.05, 0.5)
    reset_codebook_cache(model)
    return model


def transposed_conv_names(model: Any) -> set[str]:
    """Flat checkpoint names of the transposed convolutions (needed to write moshi-format names)."""
    from transformers.models.mimi.modeling_mimi import MimiConvTranspose1d

    from workers.audio.mimi_convert import from_model_layout

    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, MimiConvTranspose1d):
            names.update(from_model_layout({f"{name}.conv.weight": torch.empty(0)}))
    return names


def mimi_to_moshi_state(model: Any) -> dict[str, torch.Tensor]:
    from workers.audio.mimi_convert import from_model_layout, hf_to_moshi

    flat = from_model_layout({k: v.contiguous() for k, v in model.state_dict().items()})
    return hf_to_moshi(flat, model.config, transposed_conv_names(model))


def moshi_mimi_config(cfg: Any) -> dict[str, Any]:
    """The moshi-format config describing a MimiConfig (the inverse of ``mimi_config_from_moshi``)."""
    rope = cfg.rope_parameters or {}
    return {
        "sample_rate": cfg.sampling_rate,
        "channels": cfg.audio_channels,
        "frame_rate": float(cfg.frame_rate),
        "seanet": {
            "channels": cfg.audio_channels,
            "dimension": cfg.hidden_size,
            "causal": cfg.use_causal_conv,
            "n_filters": cfg.num_filters,
            "n_residual_layers": cfg.num_residual_layers,
            "activation": "ELU",
            "compress": cfg.compress,
            "dilation_base": cfg.dilation_growth_rate,
            "disable_norm_outer_blocks": 0,
            "kernel_size": cfg.kernel_size,
            "residual_kernel_size": cfg.residual_kernel_size,
            "last_kernel_size": cfg.last_kernel_size,
            "norm": "none",
            "pad_mode": cfg.pad_mode,
            "ratios": list(cfg.upsampling_ratios),
            "true_skip": not cfg.use_conv_shortcut,
        },
        "quantizer": {
            "dimension": cfg.vector_quantization_hidden_dimension,
            "n_q": cfg.num_quantizers,
            "bins": cfg.codebook_size,
            "input_dimension": cfg.hidden_size,
            "output_dimension": cfg.hidden_size,
        },
        "transformer": {
            "d_model": cfg.hidden_size,
            "num_heads": cfg.num_attention_heads,
            "num_layers": cfg.num_hidden_layers,
            "causal": True,
            "layer_scale": cfg.layer_scale_initial_scale,
            "context": cfg.sliding_window,
            "conv_layout": True,
            "max_period": rope.get("rope_theta", 10000.0),
            "gating": "none",
            "norm": "layer_norm",
            "positional_embedding": "rope",
            "dim_feedforward": cfg.intermediate_size,
            "input_dimension": cfg.hidden_size,
            "output_dimensions": [cfg.hidden_size],
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Hibiki folder


def tiny_lm_config(**overrides: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(TINY_LM)
    cfg.update(overrides)
    return cfg


def _fuse_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write projections the way older moshi checkpoints do: one fused in_proj_weight / out_proj.weight."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in state.items():
        for part, legacy in ((".in_projs.", ".in_proj_weight"), (".out_projs.", ".out_proj.weight")):
            if part in key:
                base, idx = key.split(part)
                groups.setdefault(base + legacy, []).append((int(idx.split(".")[0]), value))
                break
        else:
            out[key] = value
    for key, parts in groups.items():
        out[key] = torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])], dim=0)
    return out


def build_tiny_hibiki(
    dst: str | Path,
    *,
    seed: int = 0,
    lm_overrides: dict[str, Any] | None = None,
    mimi_overrides: dict[str, Any] | None = None,
    legacy_attention_keys: bool = True,
) -> Path:
    """A moshi-format Hibiki folder with random weights. Returns ``dst``."""
    from workers.audio.lm import LMConfig, random_lm

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    lm_cfg = tiny_lm_config(**(lm_overrides or {}))
    mimi = build_tiny_mimi(seed, **{"codebook_size": lm_cfg["card"], **(mimi_overrides or {})})
    lm = random_lm(LMConfig.from_dict(lm_cfg), seed=seed)
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    save_file(_fuse_attention(state) if legacy_attention_keys else state, str(dst / "model.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in mimi_to_moshi_state(mimi).items()}, str(dst / "mimi.safetensors")
    )
    (dst / "mimi_config.json").write_text(json.dumps(moshi_mimi_config(mimi.config), indent=1))
    (dst / "tokenizer.model").write_bytes(train_spm(lm_cfg["text_card"]))
    config = {
        **lm_cfg,
        "model_type": "hibiki",
        "moshi_name": "model.safetensors",
        "mimi_name": "mimi.safetensors",
        "mimi_config_name": "mimi_config.json",
        "tokenizer_name": "tokenizer.model",
        "lm_gen_config": {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25},
    }
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    return dst


# ---------------------------------------------------------------------------------------------------------
# Whisper

WHISPER_LANGS = ["en", "fr", "de", "es", "it"]


def _byte_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(CORPUS)], vocab_size=vocab_size, min_frequency=2, show_progress=False)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def build_tiny_whisper(
    dst: str | Path, *, seed: int = 0, d_model: int = 32, layers: int = 2, heads: int = 2, ffn: int = 64
) -> Path:
    """A random multilingual-style Whisper folder: byte-level BPE tokenizer with Whisper's special and
    timestamp tokens, and the hand-built generation config that `generate(task="translate")` needs."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    dst = Path(dst)
    vocab, merges = _byte_bpe(300)
    tok = WhisperTokenizer(vocab=vocab, merges=merges)
    specials = [
        "<|startoftranscript|>",
        *[f"<|{lang}|>" for lang in WHISPER_LANGS],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])  # timestamps follow <|notimestamps|>
    ids = {s: tok.convert_tokens_to_ids(s) for s in ["<|endoftext|>", *specials]}
    eot = ids["<|endoftext|>"]
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok)
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tok),
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        lang_to_id={f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in WHISPER_LANGS},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        is_multilingual=True,
        max_initial_timestamp_index=50,
        suppress_tokens=[],
        begin_suppress_tokens=[eot],
    )
    model.save_pretrained(dst, safe_serialization=True)
    processor.save_pretrained(dst)
    return dst


# ---------------------------------------------------------------------------------------------------------
# SeamlessM4T v2

SEAMLESS_LANGS = ["eng", "fra", "deu", "spa"]


def build_tiny_seamless(
    dst: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 1, heads: int = 2, ffn: int = 64
) -> Path:
    """A random SeamlessM4T v2 folder: character-level tokenizer with language tokens, every sub-model
    (speech encoder, text decoder, text-to-unit, HiFi-GAN vocoder) tiny, and the generation-config maps
    (`text_decoder_lang_to_code_id`, `t2u_lang_code_to_id`, `vocoder_lang_code_to_id`, `id_to_text`,
    `char_to_id`) that speech generation reads."""
    from transformers import (
        GenerationConfig,
        SeamlessM4TFeatureExtractor,
        SeamlessM4TProcessor,
        SeamlessM4TTokenizer,
        SeamlessM4Tv2Config,
        SeamlessM4Tv2Model,
    )

    dst = Path(dst)
    chars = sorted(set(CORPUS.read_text().replace("\n", " ").replace(" ", "\u2581")) | {"\u2581"})
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for ch in chars:
        vocab[ch] = len(vocab)
    lang_tokens = [f"__{lang}__" for lang in SEAMLESS_LANGS]
    tok = SeamlessM4TTokenizer(
        vocab=vocab, merges=[], additional_special_tokens=lang_tokens, src_lang="fra", tgt_lang="eng"
    )
    lang_ids = {lang: tok.convert_tokens_to_ids(f"__{lang}__") for lang in SEAMLESS_LANGS}
    processor = SeamlessM4TProcessor(feature_extractor=SeamlessM4TFeatureExtractor(), tokenizer=tok)
    char_to_id = {ch: i + 2 for i, ch in enumerate(chars)}  # 0 pad, 1 unk
    torch.manual_seed(seed)
    config = SeamlessM4Tv2Config(
        vocab_size=len(tok),
        t2u_vocab_size=40,
        char_vocab_size=len(char_to_id) + 2,
        hidden_size=hidden,
        max_position_embeddings=256,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        speech_encoder_layers=layers,
        speech_encoder_attention_heads=heads,
        speech_encoder_intermediate_size=ffn,
        t2u_encoder_layers=layers,
        t2u_decoder_layers=layers,
        t2u_encoder_ffn_dim=ffn,
        t2u_decoder_ffn_dim=ffn,
        t2u_encoder_attention_heads=heads,
        t2u_decoder_attention_heads=heads,
        t2u_max_position_embeddings=512,
        t2u_variance_predictor_embed_dim=hidden,
        t2u_variance_predictor_hidden_dim=16,
        upsample_initial_channel=64,
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        unit_hifi_gan_vocab_size=40,
        unit_embed_dim=16,
        lang_embed_dim=8,
        spkr_embed_dim=8,
        vocoder_num_langs=len(SEAMLESS_LANGS),
        vocoder_num_spkrs=2,
        max_new_tokens=32,
        vocoder_offset=0,  # a random t2u emits control ids too; with offset 4 they would index below 0
        dropout=0.0,
        attention_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        speech_encoder_layerdrop=0.0,
        adaptor_dropout=0.0,
        var_pred_dropout=0.0,
        t2u_variance_pred_dropout=0.0,
    )
    model = SeamlessM4Tv2Model(config).eval()
    # a generation config derived from the model config would drop these custom maps when loaded back
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        max_new_tokens=32,
        text_decoder_lang_to_code_id=lang_ids,
        t2u_lang_code_to_id={lang: i for i, lang in enumerate(SEAMLESS_LANGS)},
        vocoder_lang_code_to_id={lang: i for i, lang in enumerate(SEAMLESS_LANGS)},
        id_to_text={str(i): t for t, i in tok.get_vocab().items()},
        char_to_id=char_to_id,
    )
    model.save_pretrained(dst, safe_serialization=True)
    processor.save_pretrained(dst)
    return dst
