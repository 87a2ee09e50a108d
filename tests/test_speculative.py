"""Speculative decoding (workers/llm/speculative.py) on tiny random checkpoints from workers.llm.tiny."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.engine import ItemError
from workers.llm.engine import Completion, GenRequest, LLMEngine
from workers.llm.quantize import quantize_checkpoint
from workers.llm.sampling import SamplingParams, probabilities
from workers.llm.speculative import SpeculativeLLMEngine, verify
from workers.llm.tiny import build_tiny_checkpoint

chisquare = pytest.importorskip("scipy.stats").chisquare

P_MIN = 1e-3  # chi-square p-value floor; every draw below is seeded, so a pass is reproducible


PROMPTS = [
    "The mill stood",
    "In spring the river was high and brown with mud from the hills. The wheel began",
    "Please bring me",
    "A careful record is worth more than a clever guess, and",
]
MAX_TOKENS = [30, 6, 21, 13]  # rows finish in different rounds, so the batch shrinks mid-way


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speculative")
    out = {
        "llama": build_tiny_checkpoint(root / "llama", arch="llama", seed=3),
        "other": build_tiny_checkpoint(root / "other", arch="llama", seed=11),  # same tokenizer
        "opt": build_tiny_checkpoint(root / "opt", arch="opt", seed=3),
    }
    for name in ("llama", "opt"):
        out[f"{name}-int4"] = root / f"{name}-int4"
        quantize_checkpoint(out[name], out[f"{name}-int4"], "int4", group_size=32)
    return out


@pytest.fixture(scope="module")
def plain(folders) -> dict[str, LLMEngine]:
    engines = {arch: LLMEngine.load(folders[arch]) for arch in ("llama", "opt")}
    yield engines
    for engine in engines.values():
        engine.close()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def token_ids(engine, requests: list[GenRequest]) -> list[list[int]]:
    run = engine.generate(requests)
    assert all(isinstance(o, Completion) for o in run.outcomes), run.outcomes
    return [o.token_ids for o in run.outcomes]


def metrics(run) -> dict[str, float]:
    return {m.name: m.value for m in run.metrics}


# ---- the acceptance rule ----


def _chi2_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square of samples against probs; categories expected < 5 times pooled."""
    n = samples.numel()
    observed = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    exp = exp * obs.sum() / exp.sum()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_verify_emits_the_target_distribution() -> None:
    """Context-free case: p_j and q_j do not depend on earlier tokens, so the token emitted at offset j
    (when a round reaches it) must be distributed as p_j, whatever q is."""
    g = torch.Generator().manual_seed(0)
    n, k, v = 200_000, 2, 6
    q = torch.distributions.Dirichlet(torch.ones(v)).sample((k,))
    p = torch.distributions.Dirichlet(torch.ones(v)).sample((k + 1,))
    draft_tokens = torch.stack(
        [torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(k)], 1
    )
    u_accept = torch.rand(n, k, generator=g)
    u_final = 1 - torch.rand(n, generator=g)  # in (0, 1]
    accepted, nxt = verify(draft_tokens, q.expand(n, k, v), p.expand(n, k + 1, v), u_accept, u_final)

    first = torch.where(accepted >= 1, draft_tokens[:, 0], nxt)
    assert _chi2_pvalue(first, p[0]) > P_MIN
    reached = accepted >= 1
    second = torch.where(accepted >= 2, draft_tokens[:, 1], nxt)[reached]
    assert _chi2_pvalue(second, p[1]) > P_MIN
    # P(accept d1) = sum_x min(p0(x), q0(x)), the overlap of the two distributions
    overlap = float(torch.minimum(p[0], q[0]).sum())
    assert abs(float(reached.float().mean()) - overlap) < 4 * (overlap * (1 - overlap) / n) ** 0.5


def test_verify_greedy_one_hot() -> None:
    """One-hot p and q (greedy rows): accept the leading run of agreements, then the target's argmax."""
    v, k = 5, 3
    target_argmax = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]])
    draft_tokens = torch.tensor([[1, 2, 0], [1, 2, 3], [1, 0, 0]])
    p = torch.nn.functional.one_hot(target_argmax, v).float()
    q = torch.nn.functional.one_hot(draft_tokens, v).float()
    n, nxt = verify(draft_tokens, q, p, torch.zeros(3, k), torch.ones(3))
    assert n.tolist() == [2, 3, 0]
    assert nxt.tolist() == [3, 4, 0]  # the correction, the bonus token, the correction


# ---- greedy: exactly the target's output ----


@pytest.mark.parametrize(
    "target,draft,k",
    [
        ("llama", "other", 4),  # a different model: almost every draft token is rejected
        ("llama", "llama-int4", 3),  # an int4 copy of the target
        ("llama", "llama", 4),  # the target itself: every token accepted
        ("opt", "opt-int4", 2),
    ],
)
def test_greedy_equals_target_greedy(plain, folders, target, draft, k) -> None:
    requests = [GenRequest(prompt=p, params=greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    expected = token_ids(plain[target], requests)
    engine = SpeculativeLLMEngine.load(folders[target], draft_model=folders[draft], speculate_k=k)
    run = engine.generate(requests)
    assert [o.token_ids for o in run.outcomes] == expected
    m = metrics(run)
    counts = [m[f"accept_count_{i}"] for i in range(k + 1)]
    rounds, accepted = sum(counts), sum(i * c for i, c in enumerate(counts))
    # each round emits its accepted tokens plus one; the first token of a row comes from the prefill
    assert 0 < m["generated_tokens"] - len(requests) <= accepted + rounds
    assert 0 <= m["acceptance_rate"] <= 1
    assert m["accepted_tokens_per_step"] == pytest.approx(
        sum(i * c for i, c in enumerate(counts)) / sum(counts)
    )
    if draft == target:
        assert counts[:-1] == [0] * k and m["acceptance_rate"] == 1
    # solo runs give the same tokens as the batch (rows step at their own positions)
    solo = token_ids(engine, [requests[0]])
    assert solo == [expected[0]]
    engine.close()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_bfloat16_verification_scores_exactly_what_decoding_would(folders, arch) -> None:
    # in bf16 too: the (k+1)-token verification forward runs each token with the arithmetic of a
    # one-token decode step (the CPU kernels), so the target as its own draft accepts everything and
    # the output is the plain engine's, token for token
    from workers.llm import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("torch's paths round a (k+1)-token forward differently from k+1 one-token steps")
    requests = [GenRequest(prompt=p, params=greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    plain = LLMEngine.load(folders[arch], dtype="bfloat16")
    engine = SpeculativeLLMEngine.load(folders[arch], dtype="bfloat16", draft_model=folders[arch], speculate_k=4)
    try:
        expected = token_ids(plain, requests)
        run = engine.generate(requests)
    finally:
        plain.close()
        engine.close()
    assert [o.token_ids for o in run.outcomes] == expected
    assert metrics(run)["acceptance_rate"] == 1


def test_stop_strings_eos_and_texts_match_plain_engine(plain, folders) -> None:
    llama = plain["llama"]
    full = token_ids(llama, [GenRequest(prompt=PROMPTS[0], params=greedy(30))])[0]
    stop = llama.tokenizer.decode(full[8:10], skip_special_tokens=True).strip()[:2]
    requests = [
        GenRequest(prompt=PROMPTS[0], params=greedy(30, stop=[stop])),
        GenRequest(prompt=PROMPTS[1], params=greedy(12)),
        GenRequest(messages=[{"role": "user", "content": "hello"}], params=greedy(9)),
    ]
    engine = SpeculativeLLMEngine.load(folders["llama"], draft_model=folders["llama-int4"], speculate_k=4)
    got, want = engine.generate(requests).outcomes, llama.generate(requests).outcomes
    for g, w in zip(got, want):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
    assert got[0].finish_reason == "stop"
    engine.close()


# ---- sampling: the target's distribution ----


@pytest.fixture(scope="module")
def sampling_engine(folders) -> SpeculativeLLMEngine:
    engine = SpeculativeLLMEngine.load(
        folders["llama"], draft_model=folders["other"], speculate_k=2, max_batch_size=4096
    )
    yield engine
    engine.close()


@torch.inference_mode()
def _exact_two_token_marginals(
    model, prompt: list[int], params: SamplingParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's exact P(t1) and P(t2) = sum_t1 P(t1) P(t2 | t1) under `params`, in one batch."""
    v, t = model.args.vocab_size, len(prompt)
    model.setup_caches(v, t + 1, torch.float32, "cpu")
    tokens = torch.tensor([prompt + [x] for x in range(v)])
    logits = model(tokens, torch.arange(t + 1).expand(v, -1))
    p1 = probabilities(logits[:, t - 1], [params] * v)[0]
    p2_given_1 = probabilities(logits[:, t], [params] * v)
    model.release_caches()
    return p1, (p1[:, None] * p2_given_1).sum(0)


@pytest.mark.parametrize("draft", ["other", "llama-int4"])  # low and high acceptance
def test_sampled_tokens_follow_the_target_distribution(folders, draft) -> None:
    """Second generated token = first speculative token: a chi-square against its exact marginal."""
    engine = SpeculativeLLMEngine.load(
        folders["llama"], draft_model=folders[draft], speculate_k=2, max_batch_size=4096
    )
    prompt = [1, 50, 60, 70]
    n = 4000
    params = [SamplingParams(max_tokens=2, temperature=0.9, top_k=60, seed=s) for s in range(n)]
    run = engine.generate([GenRequest(prompt_ids=prompt, params=p) for p in params])
    p1, p2 = _exact_two_token_marginals(engine.model, prompt, params[0])
    tokens = torch.tensor([o.token_ids for o in run.outcomes])
    assert _chi2_pvalue(tokens[:, 0], p1) > P_MIN
    assert _chi2_pvalue(tokens[:, 1], p2) > P_MIN
    assert 0 < metrics(run)["acceptance_rate"] < 1  # both the accept and the resample paths ran
    engine.close()


def test_seeded_sampling_is_batch_invariant(sampling_engine) -> None:
    mine = GenRequest(prompt="The river", params=SamplingParams(max_tokens=16, temperature=0.9, seed=42))
    others = [
        GenRequest(prompt=PROMPTS[1], params=SamplingParams(max_tokens=10, seed=1)),
        GenRequest(prompt=PROMPTS[2], params=greedy(4)),
        GenRequest(prompt=PROMPTS[3], params=SamplingParams(max_tokens=16, top_p=0.9, seed=7)),
    ]
    alone = token_ids(sampling_engine, [mine])[0]
    crowd = token_ids(sampling_engine, [others[0], others[1], mine, others[2]])[2]
    assert crowd == alone
    reseeded = GenRequest(prompt="The river", params=SamplingParams(max_tokens=16, temperature=0.9, seed=43))
    assert token_ids(sampling_engine, [reseeded])[0] != alone


# ---- engine contract ----


def test_bad_requests_are_item_errors_and_metrics(sampling_engine) -> None:
    run = sampling_engine.generate(
        [
            GenRequest(prompt="", params=greedy(4)),
            GenRequest(prompt_ids=[1, 2, 10_000], params=greedy(4)),
            GenRequest(prompt="The mill", params=greedy(sampling_engine.max_context)),
            GenRequest(prompt="The mill", params=greedy(5)),
        ]
    )
    codes = [o.code if isinstance(o, ItemError) else None for o in run.outcomes]
    assert codes == ["empty_prompt", "invalid_prompt_ids", "prompt_too_long", None]
    m = metrics(run)
    assert m["generated_tokens"] == 5
    k = sampling_engine.speculate_k
    assert sum(m[f"accept_count_{i}"] for i in range(k + 1)) >= 1
    for name in ("tokens_per_s", "peak_memory_bytes", "bandwidth_bytes_per_s", "acceptance_rate"):
        assert name in m
    assert m["model_bytes"] > 0 and m["draft_model_bytes"] > 0


def test_load_errors(folders, tmp_path) -> None:
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeLLMEngine.load(folders["llama"])
    with pytest.raises(ValueError, match="speculate_k"):
        SpeculativeLLMEngine.load(folders["llama"], draft_model=folders["other"], speculate_k=0)
    with pytest.raises(FileNotFoundError):
        SpeculativeLLMEngine.load(folders["llama"], draft_model=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown LLM engine option"):
        SpeculativeLLMEngine.load(folders["llama"], draft_model=folders["other"], colour="red")
    small_vocab = build_tiny_checkpoint(tmp_path / "small", arch="llama", vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeLLMEngine.load(folders["llama"], draft_model=small_vocab)


def test_small_batches_and_progress(plain, folders) -> None:
    """max_batch_size splits the work; progress counts every request once; outputs are unchanged."""
    requests = [GenRequest(prompt=p, params=greedy(n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    requests.append(GenRequest(prompt="", params=greedy(3)))  # an item error is progress too
    engine = SpeculativeLLMEngine.load(
        folders["llama"], draft_model=folders["llama-int4"], speculate_k=3, max_batch_size=2
    )
    done: list[int] = []
    run = engine.generate(requests, progress=done.append)
    assert sum(done) == len(requests)
    assert [o.token_ids for o in run.outcomes[:-1]] == token_ids(plain["llama"], requests[:-1])
    engine.close()
    with pytest.raises(RuntimeError):
        engine.generate(requests)
