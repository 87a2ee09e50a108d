"""glibc malloc settings: the in-memory engine reuses freed activation blocks, the offloaded executor
hands them back, and the offloaded one wins. Each case runs in a fresh interpreter: the settings
are process-wide."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workers.llm import malloc

pytestmark = pytest.mark.skipif(malloc._libc() is None, reason="not glibc: nothing to tune")

# A prefill whose widest activation passes glibc's 32 MiB mmap ceiling: 16 prompts x 128 tokens
# through a gate/up projection 2 x 2048 wide in fp32 is 2048 rows x 16 KiB = 32 MiB, and the
# attention's and MLP's other buffers come and go around it, layer after layer. Prints the mode
# and the median page faults of calls 4-10 of the same generate: the heap can still grow in an
# occasional call, mostly among the first few (how freed blocks coalesce depends on the order
# earlier calls freed them in, and small long-lived blocks can land between them; seen: 4-8
# thousand faults in one or two of calls 2-6, in about one run in three), and what the setting
# promises is the steady state.
_PREFILL = """
import resource
from workers.llm import malloc
from workers.llm.engine import GenRequest, LLMEngine
from workers.llm.sampling import SamplingParams
from workers.llm.tiny import build_tiny_checkpoint
{setup}
folder = build_tiny_checkpoint({folder!r}, "llama", intermediate_size=2048, num_hidden_layers=3)
engine = LLMEngine.load(folder, max_batch_size=16, prefill_chunk_tokens=2048)
params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
requests = [GenRequest(prompt_ids=[5 + i] * 128, params=params) for i in range(16)]
for _ in range(3):
    engine.generate(requests)
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    engine.generate(requests)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(malloc.mode(), sorted(faults)[3])
"""


def _steady_prefill(folder: Path, setup: str = "") -> tuple[str, int]:
    code = textwrap.dedent(_PREFILL.format(setup=setup, folder=str(folder)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    mode, faults = out.stdout.split()[-2:]
    return mode, int(faults)


def test_the_engine_reuses_prefill_activations_instead_of_faulting_them_in_again(tmp_path):
    mode, faults = _steady_prefill(tmp_path / "m")
    assert mode == "reuse" and faults < 2_000, faults
    # glibc's own settings, for contrast: the same call maps its big blocks afresh (tens of
    # thousands of page faults), which is what the engine's setting removes
    mode, faults = _steady_prefill(tmp_path / "m", "malloc.reuse_freed_memory = lambda: 'default'")
    assert mode == "default" and faults > 8_000, faults


def test_the_offloaded_executors_setting_wins_over_reuse():
    code = textwrap.dedent(
        """
        from workers.llm import malloc
        assert malloc.mode() == "default"
        first = malloc.reuse_freed_memory()
        second = malloc.return_freed_memory_promptly()
        third = malloc.reuse_freed_memory()
        print(first, second, third)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reuse", "return", "return"]
