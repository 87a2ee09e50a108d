"""Quantized checkpoint folders (`genmill quantize`) loaded by workers/llm/loader.py and LLMEngine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from workers.llm.engine import Completion, GenRequest, LLMEngine
from workers.llm.loader import load_checkpoint, model_bytes
from workers.llm.quantize import (
    QUANT_SIDECAR,
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    load_quantized,
    quantize_checkpoint,
)
from workers.llm.sampling import SamplingParams
from workers.llm.tiny import build_tiny_checkpoint

transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "opt"]
MODES = ["int8", "int4"]
GROUP = 32  # below the tiny models' width (64), so every int4 row has several groups
PROMPTS = ["The mill stood", "In spring the river was high and brown", "Please bring me", "A careful record"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("quantized")
    out: dict[tuple[str, str], Path] = {}
    for arch in ARCHS:
        out[arch, "fp"] = build_tiny_checkpoint(root / arch, arch=arch, seed=3)
        for mode in MODES:
            out[arch, mode] = root / f"{arch}-{mode}"
            quantize_checkpoint(out[arch, "fp"], out[arch, mode], mode, group_size=GROUP)
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.setup_caches(ids.shape[0], ids.shape[1], torch.float32, "cpu")
    with torch.inference_mode():
        out = model(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1)).float()
    model.release_caches()
    return out


def _ids(n: int = 2, t: int = 48) -> torch.Tensor:
    return torch.randint(4, 320, (n, t), generator=torch.Generator().manual_seed(0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_loaded_layers_hold_the_saved_tensors(folders, arch, mode) -> None:
    loaded = load_checkpoint(folders[arch, mode], dtype="bfloat16")
    model = loaded.model
    cls = Int8Linear if mode == "int8" else Int4Linear
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    per_layer = 4 + (3 if arch == "llama" else 2)  # q k v o + (gate up down | fc1 fc2)
    assert len(quantized) == per_layer * model.args.n_layers
    assert all(type(m) is cls for m in quantized.values())
    # the LM head and embeddings stay in full precision (here bf16), as quantize_checkpoint leaves them
    assert type(model.output) is torch.nn.Linear and model.output.weight.dtype == torch.bfloat16
    layer = model.layers[1].attention.wk
    hf_name = (
        "model.layers.1.self_attn.k_proj" if arch == "llama" else "model.decoder.layers.1.self_attn.k_proj"
    )
    with safe_open(str(folders[arch, mode] / "model.safetensors"), "pt") as f:
        assert torch.equal(layer.weight, f.get_tensor(f"{hf_name}.weight"))
        # scales keep their stored dtype whatever the compute dtype: int8 fp32, int4 bf16
        assert torch.equal(layer.scales, f.get_tensor(f"{hf_name}.scales"))
        if mode == "int4":
            assert torch.equal(layer.zeros, f.get_tensor(f"{hf_name}.zeros"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_logits_equal_transformers_with_the_same_quantized_weights(folders, arch, mode) -> None:
    """Our model on the quantized folder == transformers' model after quantize.load_quantized."""
    ids = _ids()
    ours = _logits(load_checkpoint(folders[arch, mode]).model, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders[arch, "fp"]).eval()
    load_quantized(hf, folders[arch, mode])
    with torch.inference_mode():
        ref = hf(ids).logits.float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def _weight_rel_error(fp: Path, quant: Path, mode: str) -> float:
    """Relative Frobenius error of all quantized matrices together (what the logits error scales with)."""
    modules = json.loads((quant / QUANT_SIDECAR).read_text())["modules"]
    err = ref = 0.0
    with (
        safe_open(str(fp / "model.safetensors"), "pt") as f,
        safe_open(str(quant / "model.safetensors"), "pt") as g,
    ):
        for m in modules:
            w = f.get_tensor(f"{m}.weight").float()
            q, s = g.get_tensor(f"{m}.weight"), g.get_tensor(f"{m}.scales")
            if mode == "int8":
                w_hat = dequantize_int8(q, s)
            else:
                w_hat = dequantize_int4(q, s, g.get_tensor(f"{m}.zeros"), w.shape[1])
            err += float((w_hat - w).pow(2).sum())
            ref += float(w.pow(2).sum())
    return (err / ref) ** 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_quantization_error_matches_weight_error(folders, arch) -> None:
    """int8 logits close to fp; int4 logits within the bound its weight error predicts.

    To first order the logits error is linear in the weight perturbation, and rounding noise is
    independent across weights, so rel_logits(int4) / rel_logits(int8) ~ rel_weights(int4) /
    rel_weights(int8) (~14 here: a step of range/15 vs absmax/127). Allowing 1.5x for the
    non-linearity at int4's larger error, a loader bug (a swapped scale/zero, a wrong group or
    projection) would exceed it by far. The absolute int8 figure is loose because the tiny models
    (init std 0.2) amplify weight noise ~6x into the logits.
    """
    ids = _ids()
    fp = _logits(load_checkpoint(folders[arch, "fp"]).model, ids)
    rel = {m: _rel(_logits(load_checkpoint(folders[arch, m]).model, ids), fp) for m in MODES}
    w_err = {m: _weight_rel_error(folders[arch, "fp"], folders[arch, m], m) for m in MODES}
    assert w_err["int8"] < 0.01 and w_err["int4"] < 0.12
    assert rel["int8"] < 0.06
    assert rel["int4"] < 1.5 * rel["int8"] * w_err["int4"] / w_err["int8"]


def _greedy(engine: LLMEngine, n: int = 24) -> list[list[int]]:
    run = engine.generate(
        [GenRequest(prompt=p, params=SamplingParams(max_tokens=n, temperature=0)) for p in PROMPTS]
    )
    assert all(isinstance(o, Completion) for o in run.outcomes), run.outcomes
    return [o.token_ids for o in run.outcomes]


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_greedy_tokens_agree_with_fp(folders, arch) -> None:
    """Each int8 greedy token is fp's argmax after the same prefix for (almost) every position.

    Teacher-forced, because free-running outputs part for good at the first near-tie that flips.
    """
    fp_engine, q_engine = LLMEngine.load(folders[arch, "fp"]), LLMEngine.load(folders[arch, "int8"])
    generated = _greedy(q_engine)
    agree = total = 0
    for prompt, tokens in zip(PROMPTS, generated):
        prompt_ids = fp_engine.tokenizer(prompt)["input_ids"]
        ids = torch.tensor([prompt_ids + tokens])
        fp_next = _logits(fp_engine.model, ids)[0, len(prompt_ids) - 1 : -1].argmax(-1)
        agree += int((fp_next == torch.tensor(tokens)).sum())
        total += len(tokens)
    assert agree / total >= 0.9, f"{agree}/{total}"
    fp_engine.close()
    q_engine.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_model_bytes_shrink(folders, arch) -> None:
    sizes, metric = {}, {}
    for mode in ("fp", *MODES):
        sizes[mode] = model_bytes(load_checkpoint(folders[arch, mode]).model)
        if mode != "fp":
            # every tensor of the file is loaded once, in its stored dtype (fp32 run)
            meta = json.loads((folders[arch, mode] / QUANT_SIDECAR).read_text())
            assert sizes[mode] == meta["quantized_bytes"]
        engine = LLMEngine.load(folders[arch, mode])
        run = engine.generate([GenRequest(prompt="The mill")])
        metric[mode] = {m.name: m.value for m in run.metrics}["model_bytes"]
        engine.close()
    assert sizes["int4"] < sizes["int8"] < 0.6 * sizes["fp"]
    # the job metric shrinks too (LLMEngine counts parameters only, so it misses quantized buffers)
    assert metric["int4"] <= metric["int8"] < metric["fp"]


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_uses_the_packed_kernels(folders, mode) -> None:
    """bf16 runs aten's int8/int4 kernels (enabled only if they match the reference on a probe);
    regression: the int8 kernel segfaulted on safetensors' unaligned weight buffers."""
    engine = LLMEngine.load(folders["llama", mode], dtype="bfloat16")
    layers = [m for m in engine.model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert any(layer.fast_kernel for layer in layers)
    assert all(len(t) == 24 for t in _greedy(engine))
    engine.close()


def test_bad_sidecar_is_a_clear_error(folders, tmp_path) -> None:
    src = folders["llama", "int8"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in src.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    meta = json.loads((bad / QUANT_SIDECAR).read_text())
    meta["modules"].append("model.layers.0.input_layernorm")
    (bad / QUANT_SIDECAR).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a linear layer"):
        load_checkpoint(bad)


def test_engine_model_bytes_counts_quantized_weights(tmp_path):
    """Bandwidth metrics use model_bytes: an int8 folder must count its int8 weights (buffers)."""
    from workers.llm.engine import LLMEngine
    from workers.llm.quantize import quantize_checkpoint
    from workers.llm.tiny import build_tiny_checkpoint

    fp = build_tiny_checkpoint(tmp_path / "fp", arch="llama")
    quantize_checkpoint(fp, tmp_path / "q8", "int8")
    fp_bytes = LLMEngine.load(fp).model_bytes
    q8_bytes = LLMEngine.load(tmp_path / "q8").model_bytes
    params_only = sum(p.numel() * p.element_size() for p in LLMEngine.load(tmp_path / "q8").model.parameters())
    assert params_only < q8_bytes < fp_bytes
