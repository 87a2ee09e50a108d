"""The Moshi-architecture LM and its step loop: delays, CFG, caches, pruning, seeds, transformers parity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from workers.audio.hibiki import LMGen, sample_token
from workers.audio.lm import LMConfig, load_lm, random_lm
from workers.audio.mimi_convert import _rope_rows
from workers.audio.tiny import _fuse_attention, tiny_lm_config, tiny_mimi_config


def random_tokens(cfg: LMConfig, b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, cfg.card, (b, cfg.n_q + 1, t), generator=g)
    toks[:, 0] = torch.randint(0, cfg.text_card, (b, t), generator=g)
    return toks


# ---------------------------------------------------------------------------------------------------------
# Step-loop mechanics against a scripted fake LM: the exact delay semantics of moshi's LMGen


def text_value(step: int) -> int:
    return 10 + step % 30


def audio_value(step: int, k: int) -> int:
    return (3 * step + k) % 30


class FakeLM:
    """Records the frame it is fed; emits text_value(step) and audio_value(step, k) deterministically."""

    def __init__(
        self, cfg: LMConfig, cond_prefers: int | None = None, null_prefers: int | None = None
    ) -> None:
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.transformer = SimpleNamespace(new_caches=lambda capacity: [])
        self.depformer = SimpleNamespace(new_caches=lambda capacity: [])
        self.seen: list[torch.Tensor] = []
        self.step = 0
        self.cond_prefers, self.null_prefers = cond_prefers, null_prefers

    def _one_hot(self, rows: int, size: int, index: int) -> torch.Tensor:
        logits = torch.full((rows, size), -1e4)
        logits[:, index] = 0.0
        return logits

    def forward_text(self, x, condition, caches, offset):
        self.seen.append(x[:, :, 0].clone())
        self.step = offset
        logits = self._one_hot(x.shape[0], self.cfg.text_card, text_value(offset))
        if self.cond_prefers is not None:  # CFG probe: the two halves disagree
            half = x.shape[0] // 2
            logits = torch.zeros(x.shape[0], self.cfg.text_card)
            logits[:half, self.cond_prefers] = 1.0
            logits[half:, self.null_prefers] = 2.0
        return torch.zeros(x.shape[0], 1, 4), logits[:, None]

    def depformer_step(self, k, token, hidden, caches):
        return self._one_hot(token.shape[0], self.cfg.card, audio_value(self.step, k))


@pytest.mark.parametrize("delays", [[0, 0, 2, 0, 1], [0, 0, 1, 0, 1], [0, 0, 0, 0, 0]])
def test_step_loop_delays(delays: list[int]) -> None:
    cfg = LMConfig.from_dict(tiny_lm_config(delays=delays))
    fake = FakeLM(cfg)
    gen = LMGen(fake, batch_size=2, temp=0, temp_text=0)  # type: ignore[arg-type]
    n_in, steps = cfg.input_codebooks, 9

    def inputs(s: int) -> torch.Tensor:
        return torch.tensor([[1000 * b + 10 * s + j for j in range(n_in)] for b in range(2)])

    outs = [gen.step(inputs(s)) for s in range(steps)]
    md = max(delays)
    for t in range(steps):
        seen = fake.seen[t]
        assert seen.shape == (2, cfg.n_q + 1)
        assert (seen[:, 0] == (cfg.text_card if t == 0 else text_value(t - 1))).all()
        for k in range(cfg.dep_q):
            d = delays[1 + k]
            assert (seen[:, 1 + k] == (cfg.card if t <= d else audio_value(t - 1, k))).all()
        for j in range(n_in):
            d = delays[1 + cfg.dep_q + j]
            want = torch.full((2,), cfg.card) if t <= d else inputs(t - d)[:, j]
            assert torch.equal(seen[:, 1 + cfg.dep_q + j], want)
        if t < md:
            assert outs[t] is None
            continue
        out = outs[t]
        assert out is not None and out.shape == (2, 1 + cfg.dep_q)
        assert (out[:, 0] == text_value(t - md + delays[0])).all()
        for k in range(cfg.dep_q):
            assert (out[:, 1 + k] == audio_value(t - md + delays[1 + k], k)).all()


@pytest.mark.parametrize("coef,expected", [(3.0, 5), (0.5, 7)])
def test_cfg_doubles_rows_and_mixes_logits(coef: float, expected: int) -> None:
    cfg = LMConfig.from_dict(tiny_lm_config())
    fake = FakeLM(cfg, cond_prefers=5, null_prefers=7)
    cond = torch.zeros(4, 1, cfg.dim)
    gen = LMGen(fake, batch_size=2, temp=0, temp_text=0, cfg_coef=coef, condition=cond)  # type: ignore[arg-type]
    for _ in range(3):
        out = gen.step(torch.zeros(2, cfg.input_codebooks, dtype=torch.long))
    assert fake.seen[0].shape[0] == 4  # B conditioned rows + B "very_bad" rows
    assert torch.equal(fake.seen[2][:2], fake.seen[2][2:])
    assert out is not None and (out[:, 0] == expected).all()  # null + coef * (cond - null)
    with pytest.raises(ValueError):
        LMGen(fake, batch_size=2, cfg_coef=2.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# The real (tiny) LM


@pytest.fixture(scope="module")
def lm():
    return random_lm(LMConfig.from_dict(tiny_lm_config()), seed=0)


@pytest.mark.parametrize("context", [250, 5])
def test_streaming_matches_full_sequence(context: int) -> None:
    model = random_lm(LMConfig.from_dict(tiny_lm_config(context=context)), seed=1)
    toks = random_tokens(model.cfg, 2, 12)
    cond = model.condition_sum({"description": ["very_good", "very_bad"]})
    h_full, logits_full = model.forward_text(toks, cond)
    caches = model.transformer.new_caches(context)  # context 5 < 12 steps: the ring buffer wraps
    steps = [model.forward_text(toks[:, :, t : t + 1], cond, caches, offset=t) for t in range(12)]
    torch.testing.assert_close(torch.cat([h for h, _ in steps], 1), h_full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([x for _, x in steps], 1), logits_full, atol=1e-5, rtol=1e-4)
    assert logits_full.shape == (2, 12, model.cfg.text_card)


def test_other_moshi_options_stream_consistently() -> None:
    """Weight-sharing schedule, low-rank depth embeddings, GQA, layer scale, sin positions, plain FFN."""
    cfg = LMConfig.from_dict(
        tiny_lm_config(
            n_q=6,
            dep_q=3,
            delays=[0, 0, 1, 1, 0, 1, 1],
            num_heads=4,
            kv_repeat=2,
            layer_scale=0.1,
            positional_embedding="sin",
            gating="none",
            hidden_scale=2,
            norm="layer_norm",
            depformer_weights_per_step_schedule=[0, 1, 1],
            depformer_low_rank_embeddings=8,
            depformer_gating="silu",
            depformer_pos_emb="rope_concat",
            conditioners=None,
            fuser=None,
        )
    )
    model = random_lm(cfg, seed=4)
    assert len(model.depformer_in) == 2 and len(model.depformer.layers[0].gating) == 2
    toks = random_tokens(cfg, 2, 6)
    hidden, logits = model.forward_text(toks)
    caches = model.transformer.new_caches(64)
    steps = [model.forward_text(toks[:, :, t : t + 1], None, caches, offset=t)[1] for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), logits, atol=1e-5, rtol=1e-4)
    dtoks = toks[:, : cfg.dep_q, -1]
    dc = model.depformer.new_caches(cfg.dep_q)
    streamed = torch.stack([model.depformer_step(k, dtoks[:, k], hidden[:, -1:], dc) for k in range(3)], 1)
    torch.testing.assert_close(streamed, model.depformer_logits(dtoks, hidden[:, -1]), atol=1e-5, rtol=1e-4)
    reloaded = load_lm(cfg, _fuse_attention(dict(model.state_dict())))
    torch.testing.assert_close(reloaded.forward_text(toks)[1], logits)


def test_depformer_streaming_matches_teacher_forcing(lm) -> None:
    hidden = torch.randn(3, lm.cfg.dim)
    toks = random_tokens(lm.cfg, 3, 1)[:, : lm.cfg.dep_q, 0]
    full = lm.depformer_logits(toks, hidden)
    caches = lm.depformer.new_caches(lm.cfg.dep_q)
    streamed = torch.stack(
        [lm.depformer_step(k, toks[:, k], hidden[:, None], caches) for k in range(lm.cfg.dep_q)], 1
    )
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-4)
    assert full.shape == (3, lm.cfg.dep_q, lm.cfg.card)


def test_fused_legacy_attention_keys_load(lm) -> None:
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    fused = _fuse_attention(state)
    assert any(k.endswith("in_proj_weight") for k in fused) and not any(".in_projs." in k for k in fused)
    reloaded = load_lm(lm.cfg, fused)
    toks = random_tokens(lm.cfg, 1, 4)
    torch.testing.assert_close(reloaded.forward_text(toks)[1], lm.forward_text(toks)[1])
    with pytest.raises(ValueError, match="do not match"):
        load_lm(lm.cfg, {k: v for k, v in state.items() if not k.startswith("linears.")})


def test_conditioning_changes_the_input(lm) -> None:
    good = lm.condition_sum({"description": ["very_good"]})
    bad = lm.condition_sum({"description": ["very_bad"]})
    assert good.shape == (1, 1, lm.cfg.dim) and not torch.allclose(good, bad)
    with pytest.raises(ValueError):
        lm.condition_sum({"description": ["excellent"]})


def test_select_keeps_rows_identical(lm) -> None:
    """Dropping finished rows (and their caches, CFG twins included) changes nothing for the others."""
    b = 3
    cond = lm.condition_sum({"description": ["very_good"] * b + ["very_bad"] * b})
    inputs = random_tokens(lm.cfg, b, 10, seed=5)[:, 1 + lm.cfg.dep_q :]
    full = LMGen(lm, b, temp=0, temp_text=0, cfg_coef=2.0, condition=cond)
    pruned = LMGen(lm, b, temp=0, temp_text=0, cfg_coef=2.0, condition=cond)
    keep = torch.tensor([0, 2])
    for s in range(10):
        a = full.step(inputs[:, :, s])
        if s < 4:
            p = pruned.step(inputs[:, :, s])
        else:
            if s == 4:
                pruned.select(keep)
            p = pruned.step(inputs[keep, :, s])
            assert a is not None and p is not None
            assert torch.equal(a[keep], p)


def test_sampling_seeded_and_top_k() -> None:
    logits = torch.randn(4, 50)
    draw = [sample_token(logits, 1.0, 5, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    top5 = logits.topk(5).indices
    many = torch.stack([sample_token(logits, 1.0, 5, torch.Generator().manual_seed(s)) for s in range(40)])
    assert all(bool((top5[r] == many[:, r, None]).any(-1).all()) for r in range(4))
    assert torch.equal(sample_token(logits, 0.0, 5), logits.argmax(-1))


def test_generation_deterministic_under_seed(lm) -> None:
    cond = lm.condition_sum({"description": ["very_good"] * 2})
    inputs = random_tokens(lm.cfg, 2, 8, seed=2)[:, 1 + lm.cfg.dep_q :]

    def run(seed: int) -> torch.Tensor:
        gen = LMGen(lm, 2, condition=cond, generator=torch.Generator().manual_seed(seed))
        outs = [gen.step(inputs[:, :, s]) for s in range(8)]
        return torch.stack([o for o in outs if o is not None])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# ---------------------------------------------------------------------------------------------------------
# Same weights in transformers' MoshiForCausalLM / MoshiDepthDecoder give the same logits


def to_transformers_moshi(model):
    from transformers import MoshiConfig, MoshiForCausalLM
    from transformers.models.moshi.modeling_moshi import MoshiDepthDecoder

    c = model.cfg
    ffn = 2 * model.transformer.layers[0].gating.linear_out.in_features
    dep_ffn = 2 * model.depformer.layers[0].gating[0].linear_out.in_features
    config = MoshiConfig(
        vocab_size=c.text_card,
        hidden_size=c.dim,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        ffn_dim=ffn,
        rms_norm_eps=1e-8,
        sliding_window=c.context,
        max_position_embeddings=c.context,
        num_codebooks=c.dep_q,
        audio_vocab_size=c.card,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.max_period)},
        audio_encoder_config=tiny_mimi_config().to_dict(),
        depth_decoder_config={
            "hidden_size": c.depformer_dim,
            "num_hidden_layers": c.depformer_num_layers,
            "num_attention_heads": c.depformer_num_heads,
            "ffn_dim": dep_ffn,
            "sliding_window": 8,
            "max_position_embeddings": 8,
        },
    )
    temporal, depth = MoshiForCausalLM(config).eval(), MoshiDepthDecoder(config.depth_decoder_config).eval()
    sd = {
        "model.norm.weight": model.out_norm.alpha.view(-1),
        "model.embed_tokens.weight": model.text_emb.weight,
        "lm_head.weight": model.text_linear.weight,
    }
    for i, layer in enumerate(model.transformer.layers):
        q, k, v = layer.self_attn.in_projs[0].weight.split(c.dim)
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "self_attn.q_proj.linear.weight": _rope_rows(
                    q, c.num_heads, True
                ),  # interleaved -> halves
                p + "self_attn.k_proj.linear.weight": _rope_rows(k, c.num_heads, True),
                p + "self_attn.v_proj.linear.weight": v,
                p + "self_attn.o_proj.linear.weight": layer.self_attn.out_projs[0].weight,
                p + "mlp.fc1.weight": layer.gating.linear_in.weight,
                p + "mlp.fc2.weight": layer.gating.linear_out.weight,
                p + "input_layernorm.weight": layer.norm1.alpha.view(-1),
                p + "post_attention_layernorm.weight": layer.norm2.alpha.view(-1),
            }
        )
    temporal.load_state_dict(sd, strict=True)
    dsd = {
        "text_embed_tokens.weight": model.depformer_text_emb.weight,
        "input_projections.weight": torch.stack([m.weight for m in model.depformer_in]),
        "lm_heads.weight": torch.stack([m.weight for m in model.linears]),
    }
    dsd.update({f"embed_tokens.{k}.weight": e.weight for k, e in enumerate(model.depformer_emb)})
    for i, layer in enumerate(model.depformer.layers):
        qs, ks, vs = zip(*[m.weight.split(c.depformer_dim) for m in layer.self_attn.in_projs], strict=False)
        p = f"layers.{i}."
        dsd.update(
            {
                p + "self_attn.q_proj.linear.weight": torch.stack(qs),
                p + "self_attn.k_proj.linear.weight": torch.stack(ks),
                p + "self_attn.v_proj.linear.weight": torch.stack(vs),
                p + "self_attn.o_proj.linear.weight": torch.stack(
                    [m.weight for m in layer.self_attn.out_projs]
                ),
                p + "mlp.fc1.weight": torch.stack([g.linear_in.weight for g in layer.gating]),
                p + "mlp.fc2.weight": torch.stack([g.linear_out.weight for g in layer.gating]),
                p + "input_layernorm.weight": layer.norm1.alpha.view(-1),
                p + "post_attention_layernorm.weight": layer.norm2.alpha.view(-1),
            }
        )
    depth.load_state_dict(dsd, strict=True)
    return temporal, depth


def test_matches_transformers_moshi() -> None:
    model = random_lm(LMConfig.from_dict(tiny_lm_config(conditioners=None, fuser=None)), seed=3)
    temporal, depth = to_transformers_moshi(model)
    toks = random_tokens(model.cfg, 2, 7)
    hidden, logits = model.forward_text(toks)
    with torch.no_grad():
        theirs = temporal(inputs_embeds=model.embed(toks)).logits
    torch.testing.assert_close(logits, theirs, atol=1e-5, rtol=1e-4)
    dtoks = random_tokens(model.cfg, 2, 1, seed=4)[:, : model.cfg.dep_q, 0]
    ours = model.depformer_logits(dtoks, hidden[:, -1])
    with torch.no_grad():
        theirs_d = depth(
            input_ids=dtoks, last_hidden_state=hidden[:, -1:].expand(-1, model.cfg.dep_q, -1)
        ).logits
    torch.testing.assert_close(ours, theirs_d, atol=1e-5, rtol=1e-4)
