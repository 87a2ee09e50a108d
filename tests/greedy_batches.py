"""Request batches the greedy-screen tests generate: all greedy, and greedy with one sampled row
(which must keep the full LM head)."""

from __future__ import annotations

from workers.llm.engine import GenRequest
from workers.llm.sampling import SamplingParams


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
