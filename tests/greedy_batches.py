"""Request batches the greedy-screen tests generate: all greedy, and greedy with one sampled row
(which must keep the full LM head)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.llm.engine import GenRequest, LLMEngine
from workers.llm.sampling import SamplingParams

WAYS = {"picked": {}, "full head": {"greedy_screen": False}, "module path": {"fast_decode": False}}


def greedy_and_mixed() -> dict[str, list[GenRequest]]:
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True)
    prompts = [[5 + i, 17, 40 + 3 * i, 9] for i in range(4)]
    return {
        "greedy": [GenRequest(prompt_ids=p, params=greedy) for p in prompts],
        "mixed": [
            GenRequest(prompt_ids=p, params=sampled if i == 2 else greedy) for i, p in enumerate(prompts)
        ],
    }


def generate_three_ways(folder: Path, dtype: str) -> tuple[dict[str, dict[str, list]], dict[str, Any]]:
    """The token ids of each `greedy_and_mixed` batch generated three ways (WAYS: the engine's
    greedy pick, the full LM head, the module path), by way and batch; and each way's greedy pick
    object (None where the full head picks)."""
    tokens: dict[str, dict[str, list]] = {}
    picks: dict[str, Any] = {}
    for way, options in WAYS.items():
        engine = LLMEngine.load(folder, dtype=dtype, max_batch_size=4, **options)
        tokens[way] = {
            name: [o.token_ids for o in engine.generate(requests).outcomes]
            for name, requests in greedy_and_mixed().items()
        }
        picks[way] = engine.steps._fast.screen if engine.steps._fast is not None else None
    return tokens, picks
