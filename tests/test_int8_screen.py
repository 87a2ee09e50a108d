"""Greedy picks for a bf16 LM head from its int8 copy are the bf16 head's argmax, exactly
(workers.llm.logit_screen.Int8LogitScreen, csrc/int8_screen.h), for a head on the AVX-512 kernel
(VPDPBUSD sums, VDPBF16PS exact pass) and one on AMX tiles (TDPBUSD sums, exact pass on the tiles)."""

from __future__ import annotations

import pytest
import torch

from tests.greedy_batches import generate_three_ways
from workers.llm import cpu_kernels
from workers.llm.logit_screen import Int8LogitScreen, unpack_amx, unpack_avx512
from workers.llm.model import PackedLinear
from workers.llm.tiny import build_tiny_checkpoint

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available() or not cpu_kernels.int8_screen_available(),
    reason="needs the AVX-512 kernels with AVX512_BF16 and AVX512_VNNI",
)


# the head's kernel: "avx512" (a CPU without AMX; forced on an AMX one) or "amx"
HEADS = [
    "avx512",
    pytest.param(
        "amx", marks=pytest.mark.skipif(not cpu_kernels.int8_screen_available(amx=True), reason="no AMX here")
    ),
]


def _bf16_argmax(x: torch.Tensor, w: torch.Tensor, kernel: str) -> torch.Tensor:
    """What the engine's bf16 LM head on `kernel` and its greedy pick give."""
    if kernel == "amx":
        logits = cpu_kernels.amx_linear(x, cpu_kernels.amx_pack(w), None, w.shape[0], False)
    else:
        logits = cpu_kernels.avx512_linear(x, cpu_kernels.avx512_pack(w), None, w.shape[0], False)
    return cpu_kernels.argmax(logits)


def _screen(w: torch.Tensor, monkeypatch: pytest.MonkeyPatch, kernel: str) -> Int8LogitScreen:
    if kernel == "avx512":
        monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)  # the head on the AVX-512 kernel
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
    linear.weight.data = w.clone()
    head = PackedLinear(linear, batch_hint=8)
    assert head.amx if kernel == "amx" else head.avx512
    screen = Int8LogitScreen(head, w)
    assert screen.int8.amx == (kernel == "amx")
    return screen


@pytest.mark.parametrize("kernel", HEADS)
@pytest.mark.parametrize(("seed", "v", "k"), [(0, 3001, 96), (1, 5000, 70), (2, 2000, 256), (3, 50, 8)])
def test_the_pick_is_the_bf16_argmax_with_few_logits_recomputed(monkeypatch, seed, v, k, kernel):
    # narrow last panels, K not a multiple of 4, rows of very different norms, an outlier in x
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(v, k, generator=g) * torch.rand(v, 1, generator=g).mul(3).add(0.05)).bfloat16()
    x = torch.randn(13, k, generator=g) * (1 + seed)
    x[2, 1] = 40
    x = x.bfloat16()
    screen = _screen(w, monkeypatch, kernel)
    assert torch.equal(screen(x), _bf16_argmax(x, w, kernel))
    assert 13 <= screen.recomputed < 13 * max(v // 20, 16)


@pytest.mark.parametrize("kernel", HEADS)
def test_exact_and_near_ties_resolve_as_the_bf16_argmax_does(monkeypatch, kernel):
    g = torch.Generator().manual_seed(7)
    v, k = 700, 64
    w = torch.randn(v, k, generator=g) * 0.1
    w[300] = w[123]  # exact ties: the first index wins
    w[500] = w[123]
    w[601] = w[123] * (1 + 2**-7)  # a bf16 step larger in every value
    w[650] = w[123]
    w[650, 5] = w[123, 5] + w[123, 5].abs() * 2**-7  # one bf16 step apart in one value
    w = w.bfloat16()
    x = torch.stack([w[123].float() * 40, -w[123].float() * 40, torch.randn(k, generator=g)]).bfloat16()
    screen = _screen(w, monkeypatch, kernel)
    ids, kept = cpu_kernels.int8_screened_argmax(x, screen.int8, screen.weight)
    assert torch.equal(ids, _bf16_argmax(x, w, kernel))
    assert kept[0] >= 5  # the tied and near-tied rows were all recomputed


@pytest.mark.parametrize("kernel", HEADS)
@pytest.mark.parametrize("seed", range(3))
def test_a_crowd_closer_than_int8_can_tell_apart_still_gives_the_bf16_pick(monkeypatch, seed, kernel):
    # 400 rows within ~1e-2 of one another: int8 rounding (max/254 per value) cannot order them, so
    # the bound must keep the whole crowd for the exact pass
    g = torch.Generator().manual_seed(seed)
    k = 128
    base = torch.randn(k, generator=g)
    w = torch.cat(
        [base + 1e-2 * torch.randn(400, k, generator=g), torch.randn(600, k, generator=g)]
    ).bfloat16()
    x = torch.stack([base, base * 3 + 0.01 * torch.randn(k, generator=g)]).bfloat16()
    screen = _screen(w, monkeypatch, kernel)
    ids, kept = cpu_kernels.int8_screened_argmax(x, screen.int8, screen.weight)
    assert torch.equal(ids, _bf16_argmax(x, w, kernel))
    assert (kept >= 100).all()


@pytest.mark.parametrize("kernel", HEADS)
def test_rows_it_cannot_screen_take_the_full_head(monkeypatch, kernel):
    # an infinity in x; a zero row (every logit 0: the first index) and a crowd of 5000 equal
    # columns (more than the screen recomputes) both leave every logit in doubt
    g = torch.Generator().manual_seed(3)
    k = 32
    w = torch.cat([torch.randn(200, k, generator=g), torch.ones(5000, k)]).bfloat16()
    x = torch.randn(4, k, generator=g)
    x[1, 4] = float("inf")
    x[2] = 0
    x[3] = 1
    x = x.bfloat16()
    screen = _screen(w, monkeypatch, kernel)
    ids, kept = cpu_kernels.int8_screened_argmax(x, screen.int8, screen.weight)
    assert ids[0] >= 0 and (ids[1:] == -1).all() and kept[2] == 5200
    picks = screen(x)
    assert torch.equal(picks, _bf16_argmax(x, w, kernel))
    assert picks[2] == 0


def test_unpack_inverts_the_bf16_packings():
    w = torch.randn(101, 40).bfloat16()
    assert torch.equal(unpack_avx512(cpu_kernels.avx512_pack(w), 101, 40), w)
    assert torch.equal(unpack_amx(cpu_kernels.amx_pack(w), 101, 40), w)


@pytest.mark.parametrize("kernel", HEADS)
@pytest.mark.parametrize(("arch", "overrides"), [("opt", {}), ("llama", {"tie_word_embeddings": False})])
def test_bf16_greedy_generation_is_unchanged_by_the_screen(tmp_path, monkeypatch, arch, overrides, kernel):
    if kernel == "avx512":
        monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)  # bf16 linears on the AVX-512 kernel
    folder = build_tiny_checkpoint(tmp_path / arch, arch=arch, num_hidden_layers=2, **overrides)
    tokens, picks = generate_three_ways(folder, "bfloat16")
    assert isinstance(picks["picked"], Int8LogitScreen) and picks["picked"].recomputed > 0
    assert picks["picked"].int8.amx == (kernel == "amx")
    assert picks["full head"] is None and picks["module path"] is None
    assert tokens["picked"] == tokens["full head"] == tokens["module path"]


@pytest.mark.parametrize("kernel", HEADS)
def test_an_all_zero_column_leaves_its_panels_bound_alone(monkeypatch, kernel):
    # a zero column (OPT's padding token) has scale 1 and a zero sum: its a' is exact, so the bound's
    # rounding term, which grows with the panel's largest scale, must not take that 1
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(96, 64, generator=g) * 0.02).bfloat16()
    w[1] = 0
    x = torch.randn(5, 64, generator=g).bfloat16()
    screen = _screen(w, monkeypatch, kernel)
    assert screen.int8.scale[1] == 1 and screen.int8.scale_max[0] < 0.01
    assert torch.equal(screen(x), _bf16_argmax(x, w, kernel))


# ---- an fp32 head (on the AVX-512 kernel) screened from its int8 copy ----

# where the copy is summed: VPDPBUSD panels, or AMX tiles (TDPBUSD) on a CPU with them
SUMS = [
    "vnni",
    pytest.param(
        "amx", marks=pytest.mark.skipif(not cpu_kernels.int8_screen_available(amx=True), reason="no AMX here")
    ),
]


def _fp32_argmax(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = cpu_kernels.avx512_linear(x, cpu_kernels.avx512_pack(w), None, w.shape[0], False)
    return cpu_kernels.argmax(logits)


def _fp32_screen(w: torch.Tensor, monkeypatch: pytest.MonkeyPatch, sums: str) -> Int8LogitScreen:
    if sums == "vnni":
        available = cpu_kernels.int8_screen_available
        monkeypatch.setattr(cpu_kernels, "int8_screen_available", lambda amx=False: not amx and available())
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    head = PackedLinear(linear, batch_hint=8)
    assert head.avx512 and head.weight.dtype == torch.float32
    screen = Int8LogitScreen(head, w)
    assert screen.int8.amx == (sums == "amx") and screen.int8.dtype == torch.float32
    return screen


@pytest.mark.parametrize("sums", SUMS)
@pytest.mark.parametrize(("seed", "v", "k"), [(0, 3001, 96), (1, 5000, 71), (2, 50, 8)])
def test_an_fp32_heads_pick_is_its_argmax(monkeypatch, seed, v, k, sums):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, k, generator=g) * torch.rand(v, 1, generator=g).mul(3).add(0.05)
    x = torch.randn(13, k, generator=g) * (1 + seed)
    x[2, 1] = 40
    screen = _fp32_screen(w, monkeypatch, sums)
    assert torch.equal(screen(x), _fp32_argmax(x, w))
    assert 13 <= screen.recomputed < 13 * max(v // 20, 16)


@pytest.mark.parametrize("sums", SUMS)
def test_fp32_ties_one_ulp_apart_and_a_crowd_resolve_as_the_fp32_argmax_does(monkeypatch, sums):
    g = torch.Generator().manual_seed(7)
    k = 64
    base = torch.randn(k, generator=g) * 0.1
    w = torch.cat([torch.randn(300, k, generator=g) * 0.1, base + 1e-4 * torch.randn(300, k, generator=g)])
    w[100] = base  # exact ties with row 450: the first index wins
    w[450] = base
    w[451] = base
    w[451, 5] = torch.nextafter(base[5], torch.tensor(10.0))  # one ulp apart
    x = torch.stack([base * 40, -base * 40, base + 0.01 * torch.randn(k, generator=g)])
    screen = _fp32_screen(w, monkeypatch, sums)
    ids, kept = cpu_kernels.int8_screened_argmax(x, screen.int8, screen.weight)
    assert torch.equal(ids, _fp32_argmax(x, w))
    assert kept[0] >= 100  # the crowd of 300 near-copies stays for the exact pass


@pytest.mark.parametrize("sums", SUMS)
def test_an_fp32_row_with_an_infinity_takes_the_full_head(monkeypatch, sums):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 32, generator=g)
    x = torch.randn(3, 32, generator=g)
    x[1, 4] = float("inf")
    screen = _fp32_screen(w, monkeypatch, sums)
    ids, _ = cpu_kernels.int8_screened_argmax(x, screen.int8, screen.weight)
    assert ids[1] == -1 and ids[0] >= 0 and ids[2] >= 0
    assert torch.equal(screen(x), _fp32_argmax(x, w))


@pytest.mark.skipif(not cpu_kernels.int8_screen_available(amx=True), reason="fp32 heads take it on AMX CPUs")
@pytest.mark.parametrize(("arch", "overrides"), [("opt", {}), ("llama", {"tie_word_embeddings": False})])
def test_fp32_greedy_generation_is_unchanged_by_the_int8_screen(tmp_path, arch, overrides):
    folder = build_tiny_checkpoint(tmp_path / arch, arch=arch, num_hidden_layers=2, **overrides)
    tokens, picks = generate_three_ways(folder, "float32")
    assert isinstance(picks["picked"], Int8LogitScreen) and picks["picked"].int8.dtype == torch.float32
    assert picks["picked"].recomputed > 0
    assert picks["full head"] is None and picks["module path"] is None
    assert tokens["picked"] == tokens["full head"] == tokens["module path"]


def _near_worst_case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A row and a head on which the int8 copy errs by nearly its bound, one way for column 3 and
    the other way for column 7, whose logits tie (exactly: every product and sum is a multiple of
    2^-14): the row's values sit on midpoints of its int8 steps (1/128), rounding down on one half
    and up on the other, and the two columns' weights (exact in int8) follow and oppose those
    signs. Only a screen that keeps every column within twice the bound of the best lower bound
    keeps column 3, the first maximum."""
    k, c = 64, 2.0**-7
    x = torch.empty(1, k)
    x[0, 0] = 127 / 128  # the row's largest: its int8 step is 1/128
    x[0, 1:32] = 2.5 / 128  # rounds half to even: down
    x[0, 32:] = 1.5 / 128  # up
    w = torch.randn(12, k, generator=torch.Generator().manual_seed(0)) * 1e-3
    w[3], w[7] = 0, 0
    w[3, 1:32], w[3, 32:] = 127 * c, -127 * c  # under-estimated by ~(1/256) |w|_1
    w[7, 1:32], w[7, 32:], w[7, 0] = -127 * c, 127 * c, 59 * c  # over-estimated as much
    return x.to(dtype), w.to(dtype)


@pytest.mark.parametrize("kernel", HEADS)
def test_a_bf16_tie_the_int8_copy_misjudges_by_nearly_its_bound_still_gives_the_first(monkeypatch, kernel):
    x, w = _near_worst_case(torch.bfloat16)
    assert _bf16_argmax(x, w, kernel).item() == 3
    screen = _screen(w, monkeypatch, kernel)
    ids, kept = cpu_kernels.int8_screened_argmax(x, screen.int8, screen.weight)
    assert ids.item() == 3 and kept.item() >= 2


@pytest.mark.parametrize("sums", SUMS)
def test_an_fp32_tie_the_int8_copy_misjudges_by_nearly_its_bound_still_gives_the_first(monkeypatch, sums):
    x, w = _near_worst_case(torch.float32)
    assert _fp32_argmax(x, w).item() == 3
    screen = _fp32_screen(w, monkeypatch, sums)
    ids, kept = cpu_kernels.int8_screened_argmax(x, screen.int8, screen.weight)
    assert ids.item() == 3 and kept.item() >= 2


@pytest.mark.parametrize("kernel", HEADS)
def test_a_batch_of_rows_over_several_chunks_picks_each_rows_argmax(monkeypatch, kernel):
    # 300 rows: the AMX sums run them in chunks of 256 (K = 70: 128 bytes a quantized row), the
    # AVX-512 panels in their own row chunks; every row's bars and kept columns stay its own
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(1500, 70, generator=g) * 0.05).bfloat16()
    x = torch.randn(300, 70, generator=g).bfloat16()
    screen = _screen(w, monkeypatch, kernel)
    assert torch.equal(screen(x), _bf16_argmax(x, w, kernel))
