"""workers.llm.engine end to end on tiny random Llama and OPT checkpoints built by workers.llm.tiny."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from workers.engine import EngineRun, ItemError
from workers.llm.engine import Completion, GenRequest, LLMEngine
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
MAX_TOKENS = [12, 5, 9, 12, 3]  # rows finish at different steps, so the batch shrinks mid-way


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm_engine")
    return {arch: build_tiny_checkpoint(root / arch, arch=arch, seed=3) for arch in ("llama", "opt")}


@pytest.fixture(scope="module")
def engines(folders) -> dict[str, LLMEngine]:
    loaded = {arch: LLMEngine.load(folder) for arch, folder in folders.items()}
    yield loaded
    for engine in loaded.values():
        engine.close()


@pytest.fixture(scope="module")
def llama(engines) -> LLMEngine:
    return engines["llama"]


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def completions(run: EngineRun) -> list[Completion]:
    assert all(isinstance(o, Completion) for o in run.outcomes), run.outcomes
    return run.outcomes


def hf_greedy(folder: Path, tokenizer, prompts: list[str], max_new_tokens: list[int]) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding involved)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    outputs = []
    for prompt, n in zip(prompts, max_new_tokens):
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
        outputs.append(out[0, enc["input_ids"].shape[1] :].tolist())
    return outputs


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_greedy_batch_equals_transformers_and_solo_runs(engines, folders, arch):
    engine = engines[arch]
    run = engine.generate([GenRequest(prompt=p, params=greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS)])
    got = completions(run)
    assert len({tuple(c.token_ids) for c in got}) == len(PROMPTS)  # prompts really steer the model
    reference = hf_greedy(folders[arch], engine.tokenizer, PROMPTS, MAX_TOKENS)
    for prompt, n, c, ref in zip(PROMPTS, MAX_TOKENS, got, reference):
        assert c.token_ids == ref, prompt
        assert c.prompt_tokens == len(engine.tokenizer(prompt)["input_ids"])
        assert c.completion_tokens == len(c.token_ids)
        assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        solo = completions(engine.generate([GenRequest(prompt=prompt, params=greedy(n))]))[0]
        assert solo.token_ids == c.token_ids


def test_seeded_sampling_is_batch_invariant(llama):
    mine = GenRequest(
        prompt="The river", params=SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=42)
    )
    others = [
        GenRequest(prompt=PROMPTS[1], params=SamplingParams(max_tokens=10, seed=1)),
        GenRequest(prompt=PROMPTS[2], params=greedy(4)),
        GenRequest(prompt=PROMPTS[3], params=SamplingParams(max_tokens=16, top_k=20, seed=7)),
    ]
    alone = completions(llama.generate([mine]))[0]
    crowd = completions(llama.generate([others[0], others[1], mine, others[2]]))[2]
    assert crowd.token_ids == alone.token_ids
    reseeded = GenRequest(
        prompt="The river", params=SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=43)
    )
    assert completions(llama.generate([reseeded]))[0].token_ids != alone.token_ids


def test_top_k_1_equals_greedy(llama):
    reqs = [GenRequest(prompt=p, params=greedy()) for p in PROMPTS[:3]]
    reqs += [
        GenRequest(prompt=p, params=SamplingParams(max_tokens=12, top_k=1, seed=s))
        for s, p in enumerate(PROMPTS[:3])
    ]
    got = completions(llama.generate(reqs))
    assert [c.token_ids for c in got[:3]] == [c.token_ids for c in got[3:]]


def test_stop_string_cuts_text(llama):
    full = completions(llama.generate([GenRequest(prompt=PROMPTS[0], params=greedy(20))]))[0]
    stop = full.text[len(full.text) // 2 :][:2]
    cut = full.text.index(stop)
    run = llama.generate(
        [
            GenRequest(prompt=PROMPTS[0], params=greedy(20, stop=["never in the text zz", stop])),
            GenRequest(prompt=PROMPTS[0], params=greedy(20, stop=["never in the text zz"])),
        ]
    )
    stopped, unstopped = completions(run)
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) < len(full.token_ids)
    assert stop in llama.tokenizer.decode(stopped.token_ids)  # the stop string's tokens are kept
    assert unstopped.finish_reason == "length" and unstopped.token_ids == full.token_ids


def test_eos_from_generation_config_stops_a_row(llama, folders, tmp_path):
    ref = completions(llama.generate([GenRequest(prompt=PROMPTS[0], params=greedy(12))]))[0].token_ids
    j = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    folder = tmp_path / "eos"
    shutil.copytree(folders["llama"], folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, ref[j]]}))
    engine = LLMEngine.load(folder)
    try:
        stopped, ignoring, other = completions(
            engine.generate(
                [
                    GenRequest(prompt=PROMPTS[0], params=greedy(12)),
                    GenRequest(prompt=PROMPTS[0], params=greedy(12, ignore_eos=True)),
                    GenRequest(prompt=PROMPTS[2], params=greedy(6, ignore_eos=True)),
                ]
            )
        )
    finally:
        engine.close()
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == ref[: j + 1]  # EOS included in the ids, as vLLM reports
    assert stopped.text == llama.tokenizer.decode(ref[:j], skip_special_tokens=True)  # but not in the text
    assert ignoring.finish_reason == "length" and ignoring.token_ids == ref
    assert other.finish_reason == "length" and len(other.token_ids) == 6


def test_prompt_too_long_fails_only_its_item(llama):
    ids = [1] + [45, 57, 50, 76, 268] * 49  # 246 tokens
    run = llama.generate(
        [
            GenRequest(prompt=PROMPTS[0], params=greedy(4)),
            GenRequest(prompt_ids=ids, params=greedy(11)),
            GenRequest(prompt_ids=ids, params=greedy(10, ignore_eos=True)),  # exactly fills the context
        ]
    )
    ok, too_long, fits = run.outcomes
    assert isinstance(ok, Completion)
    assert too_long == ItemError(
        "prompt_too_long",
        "prompt has 246 tokens; with max_tokens 11 it exceeds the model's context of 256",
    )
    assert isinstance(fits, Completion) and len(fits.token_ids) == 10
    assert llama.max_context == 256


def test_chat_messages_use_the_template(llama):
    messages = [{"role": "user", "content": "Where are you going?"}]
    ids = llama.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    chat, raw = completions(
        llama.generate(
            [GenRequest(messages=messages, params=greedy(8)), GenRequest(prompt_ids=ids, params=greedy(8))]
        )
    )
    assert chat.prompt_tokens == len(ids) and ids[0] == llama.tokenizer.bos_token_id
    assert chat.token_ids == raw.token_ids


def test_chat_without_template_is_an_item_error(llama):
    template = llama.tokenizer.chat_template
    llama.tokenizer.chat_template = None
    try:
        run = llama.generate(
            [
                GenRequest(messages=[{"role": "user", "content": "hi"}]),
                GenRequest(prompt="hi", params=greedy(2)),
            ]
        )
    finally:
        llama.tokenizer.chat_template = template
    assert isinstance(run.outcomes[0], ItemError) and run.outcomes[0].code == "no_chat_template"
    assert isinstance(run.outcomes[1], Completion)


def test_bad_requests_are_item_errors(llama):
    bad_params = SamplingParams()
    bad_params.top_p = 2.0  # mutated after validation
    reqs = [
        GenRequest(prompt=""),
        GenRequest(prompt_ids=[]),
        GenRequest(messages=[]),
        GenRequest(prompt_ids=[1, 10**6]),
        GenRequest(prompt="a", prompt_ids=[1, 5]),
        GenRequest(),
        GenRequest(prompt="hello", params=bad_params),
        GenRequest(prompt_ids=[1, 45, 57], params=greedy(3)),
    ]
    codes = [o.code if isinstance(o, ItemError) else "ok" for o in llama.generate(reqs).outcomes]
    assert codes == [
        "empty_prompt",
        "empty_prompt",
        "empty_prompt",
        "invalid_prompt_ids",
        "invalid_request",
        "invalid_request",
        "invalid_params",
        "ok",
    ]


def test_unknown_options_are_rejected(folders):
    with pytest.raises(ValueError, match="colour, turbo"):
        LLMEngine.load(folders["llama"], turbo=True, colour="red")
    with pytest.raises(ValueError, match="max_batch_size"):
        LLMEngine.load(folders["llama"], max_batch_size=0)


def test_small_batches_chunked_prefill_and_progress(llama, folders, monkeypatch):
    reqs = [GenRequest(prompt=p, params=greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    reqs.insert(2, GenRequest(prompt=""))
    expected = llama.generate(reqs).outcomes
    small = LLMEngine.load(folders["llama"], max_batch_size=2, prefill_chunk_tokens=8)
    cache_rows: list[int] = []
    setup = small.model.setup_caches
    monkeypatch.setattr(small.model, "setup_caches", lambda b, *a: (cache_rows.append(b), setup(b, *a)))
    seen: list[int] = []
    try:
        run = small.generate(reqs, progress=seen.append)
    finally:
        small.close()
    assert run.outcomes == expected  # same results, same (request) order
    assert cache_rows and max(cache_rows) == 2  # batches of at most 2 rows
    assert sum(seen) == len(reqs) and all(n > 0 for n in seen)
    assert len(seen) > 2  # reported as requests finish, not once at the end


def test_failed_batches_are_retried_in_halves(llama, monkeypatch):
    import workers.llm.engine as engine_module

    reqs = [GenRequest(prompt=p, params=greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    expected = llama.generate(reqs).outcomes
    poison = llama.tokenizer(PROMPTS[3])["input_ids"]
    real_generate = engine_module.generate
    calls: list[int] = []

    def flaky(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        out = real_generate(model, prompts, *args, **kwargs)  # progress is reported, then it fails
        if len(prompts) > 2 or poison in prompts:
            raise RuntimeError("out of memory (simulated)")
        return out

    monkeypatch.setattr(engine_module, "generate", flaky)
    seen: list[int] = []
    run = llama.generate(reqs, progress=seen.append)
    assert calls[0] == len(reqs) and len(calls) > 3
    assert run.outcomes[3] == ItemError("generation_failed", "RuntimeError: out of memory (simulated)")
    assert [o for i, o in enumerate(run.outcomes) if i != 3] == [o for i, o in enumerate(expected) if i != 3]
    assert sum(seen) == len(reqs)  # rows finished by a failed attempt are not counted twice


def test_progress_callback_errors_are_not_retried(llama):
    def cancel(n: int) -> None:
        raise KeyError("job cancelled")

    with pytest.raises(KeyError, match="job cancelled"):
        llama.generate([GenRequest(prompt=p, params=greedy(3)) for p in PROMPTS], progress=cancel)


def test_metrics(llama):
    run = llama.generate([GenRequest(prompt=p, params=greedy(6)) for p in PROMPTS])
    m = {metric.name: metric.value for metric in run.metrics}
    assert set(m) == {
        "prompt_tokens",
        "generated_tokens",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "tokens_per_s",
        "wall_s",
        "peak_memory_bytes",
        "model_bytes",
        "bandwidth_bytes_per_s",
    }
    got = completions(run)
    assert m["prompt_tokens"] == sum(c.prompt_tokens for c in got)
    assert m["generated_tokens"] == sum(c.completion_tokens for c in got)
    assert m["model_bytes"] == sum(p.numel() * 4 for p in llama.model.parameters())
    assert m["peak_memory_bytes"] > m["model_bytes"]
    assert all(m[k] > 0 for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "tokens_per_s", "wall_s"))
    assert m["tokens_per_s"] == pytest.approx(m["generated_tokens"] / m["wall_s"])


def test_bfloat16_engine_generates(folders):
    engine = LLMEngine.load(folders["opt"], dtype="bfloat16")
    try:
        for module in engine.model.modules():
            # packed linears keep fp32 copies where the CPU has no bf16 matmul (see PackedLinear)
            want = torch.float32 if getattr(module, "widened", False) else torch.bfloat16
            assert {p.dtype for p in module.parameters(recurse=False)} <= {want}, module
        got = completions(
            engine.generate([GenRequest(prompt=p, params=greedy(5, ignore_eos=True)) for p in PROMPTS])
        )
    finally:
        engine.close()
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in got)


def test_closed_engine_refuses_work(folders):
    engine = LLMEngine.load(folders["opt"])
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([GenRequest(prompt="hi")])


@pytest.mark.parametrize("variant", ["offloaded", "speculative"])
def test_every_llm_engine_fails_only_the_request_that_breaks_its_batch(folders, variant):
    """The retry-in-halves around `_generate_batch` is shared: a request that makes any batch it is
    in raise (say, out of memory) fails alone, and every request is reported to progress once."""
    if variant == "offloaded":
        from workers.llm.offload import OffloadedLLMEngine

        engine = OffloadedLLMEngine.load(folders["llama"], offload={"gpu_batch_size": 8})
    else:
        from workers.llm.speculative import SpeculativeLLMEngine

        engine = SpeculativeLLMEngine.load(folders["llama"], draft_model=folders["llama"], speculate_k=2)
    reqs = [GenRequest(prompt=f"the river number {i}", params=SamplingParams(max_tokens=4, temperature=0))
            for i in range(6)]
    poison = engine.tokenizer(reqs[3].prompt)["input_ids"]
    real = engine._generate_batch

    def flaky(items, on_finish):
        if any(list(it.ids) == list(poison) for it in items):
            raise MemoryError("out of memory")
        return real(items, on_finish)

    engine._generate_batch = flaky
    seen: list[int] = []
    run = engine.generate(reqs, progress=seen.append)
    assert isinstance(run.outcomes[3], ItemError) and run.outcomes[3].code == "generation_failed"
    assert all(isinstance(o, Completion) for i, o in enumerate(run.outcomes) if i != 3)
    assert sum(seen) == len(reqs)
    engine.close()
