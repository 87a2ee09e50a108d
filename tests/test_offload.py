"""Offloaded decoding end to end on tiny random Llama and OPT checkpoints: every placement, schedule and
compression setting against transformers' generate, LLMEngine, and each other."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from workers.llm.compression import CompressionConfig, fake_compress
from workers.llm.engine import Completion, GenRequest, LLMEngine
from workers.llm.offload import OffloadedGenerator, OffloadedLLMEngine, OffloadStats, Policy
from workers.llm.offload_store import WeightHome
from workers.llm.sampling import SamplingParams
from workers.llm.tiny import build_tiny_checkpoint

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The mill stood",
    "In spring the river was high and brown with mud from the hills. The wheel began",
    "What is the weather like today?",
    "Please bring me",
    "A careful record is worth more than a clever guess, and",
]
MAX_TOKENS = [12, 5, 9, 12, 3]  # rows finish at different steps

ALL_DISK = {"w_gpu_percent": 0, "w_cpu_percent": 0, "cache_gpu_percent": 0, "cache_cpu_percent": 0}
MIXED = {"w_gpu_percent": 30, "w_cpu_percent": 30, "cache_gpu_percent": 30, "cache_cpu_percent": 40}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload")
    return {arch: build_tiny_checkpoint(root / arch, arch=arch, seed=3) for arch in ("llama", "opt")}


@pytest.fixture(scope="module")
def hf_reference(folders) -> dict[str, list[list[int]]]:
    """transformers' greedy generate, one prompt at a time (no padding involved)."""
    out = {}
    for arch, folder in folders.items():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        out[arch] = []
        for prompt, n in zip(PROMPTS, MAX_TOKENS):
            enc = tokenizer(prompt, return_tensors="pt")
            ids = model.generate(**enc, max_new_tokens=n, do_sample=False)
            out[arch].append(ids[0, enc["input_ids"].shape[1] :].tolist())
    return out


def requests(temperature: float = 0.0) -> list[GenRequest]:
    return [
        GenRequest(prompt=p, params=SamplingParams(max_tokens=n, temperature=temperature, seed=100 + i))
        for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))
    ]


def run(folder: Path, tmp_path: Path, reqs: list[GenRequest] | None = None, **options) -> list:
    engine = OffloadedLLMEngine.load(folder, offload_dir=str(tmp_path / "offload"), **options)
    try:
        return engine.generate(reqs or requests()).outcomes
    finally:
        engine.close()


def token_ids(outcomes: list) -> list[list[int]]:
    assert all(isinstance(o, Completion) for o in outcomes), outcomes
    return [o.token_ids for o in outcomes]


def eos_cut(reference: list[list[int]], got: list[list[int]]) -> list[list[int]]:
    """transformers stops at EOS too; our token_ids include that final EOS, as vLLM reports it."""
    return [ref if len(ref) == len(g) else ref[: len(g)] for ref, g in zip(reference, got)]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_greedy_on_disk_equals_in_memory_equals_transformers(folders, hf_reference, tmp_path, arch):
    in_memory = token_ids(run(folders[arch], tmp_path, max_batch_size=8))
    on_disk = token_ids(run(folders[arch], tmp_path, offload={**ALL_DISK, "gpu_batch_size": 8}))
    assert on_disk == in_memory
    assert in_memory == eos_cut(hf_reference[arch], in_memory)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_overlap_on_equals_overlap_off(folders, tmp_path, arch):
    policy = {**MIXED, "gpu_batch_size": 2, "num_gpu_batches": 2}
    on = token_ids(run(folders[arch], tmp_path, offload={**policy, "overlap": True}))
    off = token_ids(run(folders[arch], tmp_path, offload={**policy, "overlap": False}))
    assert on == off


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_several_gpu_batches_equal_one_batch(folders, tmp_path, arch, monkeypatch):
    one = token_ids(run(folders[arch], tmp_path, offload={**MIXED, "gpu_batch_size": 5}))
    # 5 prompts over 3 GPU batches of 2, 2 and 1 rows; one weight load serves all three, and on the
    # CPU their decode steps run merged (one projection over all rows, attention per GPU batch)
    merges = []
    merge = OffloadedGenerator._merge
    monkeypatch.setattr(OffloadedGenerator, "_merge", lambda self, active: merges.append(merge(self, active)) or merges[-1])
    three = token_ids(
        run(folders[arch], tmp_path, offload={**MIXED, "gpu_batch_size": 2, "num_gpu_batches": 3})
    )
    assert three == one
    assert any(m is not None for m in merges) and any(m is None for m in merges)  # decode / prefill


def test_chunked_prefill_and_host_activations_change_nothing(folders, tmp_path):
    base = token_ids(run(folders["llama"], tmp_path, offload=ALL_DISK))
    chunked = token_ids(run(folders["llama"], tmp_path, offload=ALL_DISK, prefill_chunk_tokens=8))
    host = token_ids(run(folders["llama"], tmp_path, offload={"act_gpu_percent": 0, "act_cpu_percent": 100}))
    assert chunked == base == host


def test_sampled_outputs_match_llm_engine(folders, tmp_path):
    reference = LLMEngine.load(folders["opt"])
    try:
        want = token_ids(reference.generate(requests(temperature=0.8)).outcomes)
    finally:
        reference.close()
    got = token_ids(
        run(folders["opt"], tmp_path, requests(temperature=0.8), offload={**MIXED, "gpu_batch_size": 2})
    )
    assert got == want


def test_bad_requests_get_item_errors_and_metrics_are_reported(folders, tmp_path):
    engine = OffloadedLLMEngine.load(folders["llama"], offload=ALL_DISK, offload_dir=str(tmp_path))
    try:
        good = GenRequest(prompt="The mill stood", params=SamplingParams(max_tokens=4, temperature=0))
        reqs = [good, GenRequest(prompt=""), GenRequest(prompt_ids=[1] * 300), GenRequest(prompt_ids=[10**6])]
        done = []
        run_ = engine.generate(reqs, progress=done.append)
        assert isinstance(run_.outcomes[0], Completion)
        assert [o.code for o in run_.outcomes[1:]] == [
            "empty_prompt",
            "prompt_too_long",
            "invalid_prompt_ids",
        ]
        assert sum(done) == 4
        metrics = {m.name: m.value for m in run_.metrics}
        assert metrics["weight_bytes_resident"] == 0 and metrics["cache_bytes"] == 0
        assert metrics["disk_read_bytes"] > 0 and metrics["peak_rss_bytes"] > 0
        assert metrics["generated_tokens"] == 4 and metrics["tokens_per_s"] > 0
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([good])


def test_engine_options_are_checked(folders):
    with pytest.raises(ValueError, match="unknown LLM engine option"):
        OffloadedLLMEngine.load(folders["llama"], offload={}, compile=True)
    with pytest.raises(ValueError, match="w_gpu_percent"):
        OffloadedLLMEngine.load(folders["llama"], offload={"w_gpu_percent": 80, "w_cpu_percent": 30})
    engine = OffloadedLLMEngine.load(folders["llama"], max_batch_size=3, offload={"num_gpu_batches": 2})
    assert (engine.generator.policy.gpu_batch_size, engine.max_batch_size, engine.kind) == (3, 6, "llm")
    engine.close()


# ---- 4-bit compression ----

# head_dim 64, so the 4-bit groups are full as in real models (the default tiny models have 16)
WIDE = {
    "opt": {
        "hidden_size": 128,
        "num_attention_heads": 2,
        "ffn_dim": 256,
        "word_embed_proj_dim": 128,
        "init_std": 0.05,
    },
    "llama": {
        "hidden_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 256,
        "initializer_range": 0.05,
    },
}


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload_wide")
    return {arch: build_tiny_checkpoint(root / arch, arch=arch, seed=3, **kw) for arch, kw in WIDE.items()}


def _prompts(n: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(4, 320, (int(k),), generator=g).tolist()
        for k in torch.randint(3, 30, (n,), generator=g)
    ]


@dataclass
class _Run:
    ids: list[list[int]]
    logits: torch.Tensor  # [rows, steps, V]
    stats: OffloadStats
    homes: dict[str, WeightHome]


def _run_generator(folder: Path, policy: Policy, offload_dir: Path, teacher=None, n_tokens: int = 12) -> _Run:
    """Greedy token ids and every step's logits (teacher: fixed inputs, so logits are comparable)."""
    prompts = _prompts()
    gen = OffloadedGenerator(folder, policy, offload_dir=offload_dir)
    steps: dict[int, list[torch.Tensor]] = {}

    def on_logits(ids, logits):
        for i, row in zip(ids, logits):
            steps.setdefault(i, []).append(row.clone())

    try:
        params = [SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)] * len(prompts)
        outs, _ = gen.generate(
            prompts, params, frozenset(), lambda t: "", on_logits=on_logits, teacher=teacher
        )
        logits = torch.stack([torch.stack(steps[i]) for i in range(len(prompts))])
        return _Run([o.token_ids for o in outs], logits, gen.stats, dict(gen.homes))
    finally:
        gen.close()


def _compare(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    rel = float((got - ref).norm() / ref.norm())
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return rel, agree


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_compressed_weights_equal_a_fake_quantized_model(wide, tmp_path, arch):
    """The 4-bit path is exactly 'compress every matrix, decompress, run fp32' (no other error)."""
    from workers.llm.generate import prefill
    from workers.llm.loader import load_checkpoint

    prompts = _prompts()
    cfg = CompressionConfig(4, 64, group_dim=1, param_dtype=torch.float16)
    model = load_checkpoint(wide[arch]).model
    with torch.inference_mode():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(fake_compress(param, cfg))
        model.setup_caches(len(prompts), 64, torch.float32, "cpu")
        want = prefill(model, prompts, 0)
    policy = Policy(compress_weight=True, w_gpu_percent=0, w_cpu_percent=50)
    got = _run_generator(wide[arch], policy, tmp_path, n_tokens=1).logits[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compressed_weights_and_cache_accuracy_and_memory(wide, tmp_path):
    ref = _run_generator(wide["opt"], Policy(), tmp_path)
    w = _run_generator(wide["opt"], Policy(compress_weight=True, **ALL_DISK), tmp_path, teacher=ref.ids)
    c = _run_generator(
        wide["opt"], Policy(compress_cache=True, cache_gpu_percent=0), tmp_path, teacher=ref.ids
    )
    rel_w, agree_w = _compare(ref.logits, w.logits)
    rel_c, agree_c = _compare(ref.logits, c.logits)
    assert rel_w < 0.25 and agree_w >= 0.9, (rel_w, agree_w)  # measured: 0.18, 0.98
    assert rel_c < 0.06 and agree_c >= 0.95, (rel_c, agree_c)  # measured: 0.03, 1.0
    # 2-D weights: 36 bytes per 64 values (28% of fp16); vectors stay dense fp32
    matrices = [h for h in w.homes.values() if h.compressed]
    assert len(matrices) == 2 + 6 * 2  # embeddings, and q/k/v/o/fc1/fc2 of both layers
    fp16 = sum(2 * math.prod(h.shape) for h in matrices)
    assert sum(h.nbytes for h in matrices) == fp16 * 36 // 128
    assert w.stats.weight_bytes <= 0.30 * sum(2 * math.prod(h.shape) for h in w.homes.values())
    assert c.stats.cache_bytes <= 0.30 * c.stats.cache_bytes_fp16
    assert ref.stats.cache_bytes == 2 * ref.stats.cache_bytes_fp16  # the reference cache is fp32


def test_compressed_llama_accuracy(wide, tmp_path):
    ref = _run_generator(wide["llama"], Policy(), tmp_path)
    policy = Policy(compress_cache=True, cache_gpu_percent=0, cache_cpu_percent=0)
    got = _run_generator(wide["llama"], policy, tmp_path, teacher=ref.ids)
    rel, agree = _compare(ref.logits, got.logits)
    assert rel < 0.15 and agree >= 0.75, (rel, agree)  # measured: 0.09, 0.86
    # A random tiny SwiGLU model is far more sensitive to 4-bit weights than OPT or a trained model:
    # about half the argmaxes move (chance would be 1/320). That the 4-bit path adds no error of its
    # own is test_compressed_weights_equal_a_fake_quantized_model.
    got = _run_generator(wide["llama"], Policy(compress_weight=True), tmp_path, teacher=ref.ids)
    rel, agree = _compare(ref.logits, got.logits)
    assert rel < 0.4 and agree > 0.35, (rel, agree)  # measured: 0.32, 0.49


def test_bfloat16_on_disk_equals_in_memory(folders, tmp_path):
    reqs = requests()
    in_memory = token_ids(run(folders["llama"], tmp_path, reqs, dtype="bfloat16"))
    on_disk = token_ids(run(folders["llama"], tmp_path, reqs, dtype="bfloat16", offload={**ALL_DISK}))
    assert on_disk == in_memory


def test_compressed_disk_weights_are_written_once_to_offload_dir(wide, tmp_path):
    policy = Policy(compress_weight=True, w_gpu_percent=0, w_cpu_percent=0)
    first = _run_generator(wide["opt"], policy, tmp_path, n_tokens=3)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 + 2  # the embeddings and each layer; the head (norm vectors, tied) needs none
    stamps = [f.stat().st_mtime_ns for f in files]
    second = _run_generator(wide["opt"], policy, tmp_path, n_tokens=3)
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.glob("*.safetensors"))] == stamps
    assert first.ids == second.ids and torch.equal(first.logits, second.logits)
    assert not list(wide["opt"].glob(".genmill-offload*"))  # the checkpoint folder is left alone
