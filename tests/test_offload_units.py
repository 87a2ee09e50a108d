"""Offloaded decoding, unit level: the Policy, the midpoint placement rule, the disk tiers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from workers.llm import cpu_kernels, offload, offload_store
from workers.llm.compression import CompressionConfig
from workers.llm.offload import OffloadedGenerator, Policy, midpoint_tiers
from workers.llm.offload_store import (
    MAPPED_READS,
    DiskIO,
    DiskSeqStore,
    DiskStored,
    HostBuffers,
    MemorySeqStore,
    MemoryStored,
    cache_components,
    compress_kv,
    decompress_kv,
    read_header,
)
from workers.llm.sampling import SamplingParams
from workers.llm.tiny import build_tiny_checkpoint

pytest.importorskip("transformers")


# ---- policy ----


@pytest.mark.parametrize(
    "options, field",
    [
        ({"w_gpu_percent": 70, "w_cpu_percent": 50}, "w_gpu_percent + w_cpu_percent"),
        ({"cache_gpu_percent": 60, "cache_cpu_percent": 60}, "cache_gpu_percent + cache_cpu_percent"),
        ({"cache_cpu_percent": -1}, "cache_cpu_percent"),
        ({"w_cpu_percent": 101}, "w_cpu_percent"),
        ({"w_gpu_percent": "all"}, "w_gpu_percent"),
        ({"w_gpu_percent": True}, "w_gpu_percent"),
        ({"act_gpu_percent": 50, "act_cpu_percent": 50}, "act_gpu_percent"),
        ({"act_gpu_percent": 0, "act_cpu_percent": 0}, "act_gpu_percent"),
        ({"gpu_batch_size": 0}, "gpu_batch_size"),
        ({"num_gpu_batches": 1.5}, "num_gpu_batches"),
        ({"overlap": "yes"}, "overlap"),
        ({"pin_weight": 1}, "pin_weight"),
        ({"compress_cache": None}, "compress_cache"),
        ({"weight_group_size": 63}, "weight_group_size"),
        ({"cache_group_size": 0}, "cache_group_size"),
        ({"sep_layer": True}, "sep_layer"),
        ({"percent": [100, 0, 100]}, "percent"),
        ({"percent": [0, 0, 100, 0, 100, 0], "w_gpu_percent": 0}, "w_gpu_percent"),
    ],
)
def test_policy_errors_name_the_field(options, field):
    with pytest.raises(ValueError, match=field.replace("+", r"\+")):
        Policy.from_dict(options)


def test_policy_from_dict_defaults_and_shorthand():
    p = Policy.from_dict(None, gpu_batch_size=12)
    assert (p.gpu_batch_size, p.num_gpu_batches, p.w_gpu_percent, p.w_disk_percent) == (12, 1, 100, 0)
    p = Policy.from_dict({"percent": [20, 30, 0, 100, 100, 0], "num_gpu_batches": 3}, gpu_batch_size=4)
    assert (p.w_gpu_percent, p.w_cpu_percent, p.w_disk_percent) == (20, 30, 50)
    assert (p.cache_disk_percent, p.act_tier, p.block_size) == (0, "gpu", 12)
    assert Policy.from_dict({"gpu_batch_size": 2}, gpu_batch_size=8).gpu_batch_size == 2  # the dict wins
    assert Policy(compress_weight=True).weight_config() == CompressionConfig(
        4, 64, 1, param_dtype=torch.float16
    )
    assert Policy().weight_config() is None and Policy().cache_config() is None


# ---- the midpoint rule ----


def test_midpoint_rule_on_known_sizes():
    # cumulative midpoints 5%, 25%, 50%, 80% over disk [0, 20) | cpu [20, 50) | gpu [50, 100]
    assert midpoint_tiers([10, 30, 20, 40], gpu_percent=50, cpu_percent=30) == ["disk", "cpu", "gpu", "gpu"]
    # equal sizes, half and half: midpoints 12.5, 37.5 | 62.5, 87.5
    assert midpoint_tiers([1, 1, 1, 1], gpu_percent=50, cpu_percent=50) == ["cpu", "cpu", "gpu", "gpu"]
    # a big tensor goes wholly to the tier its midpoint falls in, however the split is asked
    assert midpoint_tiers([90, 5, 5], gpu_percent=40, cpu_percent=20) == ["cpu", "gpu", "gpu"]
    assert midpoint_tiers([3, 1], gpu_percent=0, cpu_percent=0) == ["disk", "disk"]
    assert midpoint_tiers([3, 1], gpu_percent=0, cpu_percent=100) == ["cpu", "cpu"]
    assert midpoint_tiers([3, 1], gpu_percent=100, cpu_percent=0) == ["gpu", "gpu"]


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("offload_units") / "opt", arch="opt", seed=1)


def test_weights_are_placed_by_the_midpoint_rule_within_each_layer(tiny_opt, tmp_path):
    policy = Policy(w_gpu_percent=30, w_cpu_percent=30)
    gen = OffloadedGenerator(tiny_opt, policy, offload_dir=tmp_path)
    try:
        for j in range(gen.args.n_layers):
            prefix = f"layers.{j}."
            homes = {n: h for n, h in gen.homes.items() if n.startswith(prefix)}
            sizes = [math.prod(h.shape) for h in homes.values()]
            assert [h.tier for h in homes.values()] == midpoint_tiers(sizes, 30, 30)
            assert {h.tier for h in homes.values()} == {"disk", "cpu", "gpu"}
        disk = [h for h in gen.homes.values() if h.tier == "disk"]
        assert disk and all(isinstance(p, DiskStored) for h in disk for p in h.parts.values())
        s = gen.stats
        assert s.weight_bytes == s.weight_bytes_resident + s.weight_bytes_disk
        assert s.weight_bytes_disk == sum(h.nbytes for h in disk)
    finally:
        gen.close()


# ---- disk tiers ----


def test_disk_weights_are_read_on_demand_and_unmapped_after_use(tiny_opt, tmp_path):
    policy = Policy(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)
    gen = OffloadedGenerator(tiny_opt, policy, offload_dir=tmp_path)
    try:
        assert gen.stats.weight_bytes_resident == 0 and gen.io.read_bytes == 0  # nothing read at load
        gen.generate([[5, 6, 7]], [SamplingParams(max_tokens=3, temperature=0)], frozenset(), lambda t: "")
        # every step reads every layer again (the head too, from the tied embedding); the position
        # table is only gathered at the rows a step uses
        streamed = gen.stats.weight_bytes_disk - gen.homes["pos_embeddings.weight"].nbytes
        assert 3 * streamed <= gen.io.read_bytes < 3 * gen.stats.weight_bytes_disk
        if MAPPED_READS:
            # on the CPU a read is a mapping of the file: only the windows in use are mapped (and
            # count in RSS), never the whole model, and none is left once the run is done
            assert 0 < gen.io.peak_mapped_bytes < gen.stats.weight_bytes_disk
            assert gen.io.mapped_bytes == 0
            maps = Path("/proc/self/maps").read_text()
            assert str(tiny_opt / "model.safetensors") not in maps
        assert not list(tmp_path.glob("genmill-kv-*"))  # cache files are removed after the run
    finally:
        gen.close()


@pytest.mark.skipif(not MAPPED_READS, reason="mapped reads are Linux-only")
def test_mapped_reads_see_the_file_and_only_shared_writes_reach_it(tmp_path):
    path = tmp_path / "f.bin"
    data = torch.arange(3000, dtype=torch.float32)
    path.write_bytes(b"\x07" * 4100 + data.numpy().tobytes())  # not page-aligned
    io = DiskIO(zero_copy=True)
    private = io.map(str(path), 4100, (30, 100), torch.float32)
    assert torch.equal(private.flatten(), data)
    private[0, 0] = -1.0  # stays in this process
    shared = io.map(str(path), 4100, (3000,), torch.float32, shared=True)
    assert shared[0] == 0.0 and shared[2000] == 2000.0
    shared[2000] = -5.0  # reaches the file
    on_disk = torch.frombuffer(bytearray(path.read_bytes()[4100:]), dtype=torch.float32)
    assert on_disk[0] == 0.0 and on_disk[2000] == -5.0
    assert io.mapped_bytes > 0
    del private, shared
    assert io.mapped_bytes == 0 and io.peak_mapped_bytes >= 2 * 3000 * 4
    assert not io.can_map(4102, torch.float32)  # a misaligned tensor is read, not mapped
    io.close()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
PARAMS = [SamplingParams(max_tokens=n, temperature=0) for n in (6, 4, 7, 5)]
ON_DISK = {"w_gpu_percent": 0, "w_cpu_percent": 0, "cache_gpu_percent": 0, "cache_cpu_percent": 0}


def _offload_tokens(folder: Path, policy: Policy, tmp_path: Path, kernels: bool = True) -> tuple[list, int]:
    gen = OffloadedGenerator(folder, policy, offload_dir=tmp_path)
    gen.kernels = gen.kernels and kernels
    try:
        outs, _ = gen.generate(PROMPTS, PARAMS, frozenset(), lambda t: "")
        return [o.token_ids for o in outs], gen.io.peak_mapped_bytes
    finally:
        gen.close()


def test_copied_and_mapped_disk_reads_give_the_same_tokens(tiny_opt, tmp_path, monkeypatch):
    policy = Policy(**ON_DISK, gpu_batch_size=2, num_gpu_batches=2)
    mapped, peak = _offload_tokens(tiny_opt, policy, tmp_path)
    monkeypatch.setattr(offload_store, "MAPPED_READS", False)
    copied, none = _offload_tokens(tiny_opt, policy, tmp_path)
    assert copied == mapped and none == 0 and (peak > 0) == MAPPED_READS


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not build here")
@pytest.mark.parametrize("placement", ["memory", "disk"])
def test_decode_attention_runs_in_the_cpu_kernel_on_caches_attended_in_place(
    tiny_opt, tmp_path, monkeypatch, placement
):
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, **(ON_DISK if placement == "disk" else {}))
    calls = []
    kernel = offload._kernel_attend
    monkeypatch.setattr(offload, "_kernel_attend", lambda *a: calls.append(1) or kernel(*a))
    with_kernel, _ = _offload_tokens(tiny_opt, policy, tmp_path)
    assert calls or (placement == "disk" and not MAPPED_READS)  # a copied cache is not in place
    calls.clear()
    without, _ = _offload_tokens(tiny_opt, policy, tmp_path, kernels=False)
    assert not calls and without == with_kernel


def _seq_stores(tmp_path: Path, comps, b=3, h=2, s=10, zero_copy=False):
    io = DiskIO(zero_copy=zero_copy)
    mem = MemorySeqStore(comps, b, h, s, torch.device("cpu"), "cpu")
    disk = DiskSeqStore(comps, b, h, s, tmp_path / "x.kv", io)
    return io, mem, disk


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copied", "mapped"])
def test_disk_cache_store_matches_memory_store(tmp_path, zero_copy):
    comps = cache_components(head_dim=8, dtype=torch.float32, config=None)
    io, mem, disk = _seq_stores(tmp_path, comps, zero_copy=zero_copy)
    assert disk.in_place == io.zero_copy  # a dense cache is attended in place when mapped
    torch.manual_seed(0)
    prefill = {c.name: torch.randn(3, 2, 4, 8) for c in comps}
    pos = torch.arange(4).expand(3, 4)
    for store in (mem, disk):
        store.write(pos, prefill)
    for step in range(3):  # rows at their own positions (ragged decode)
        pos = torch.tensor([[4 + step], [6 + step], [5]])
        new = {c.name: torch.randn(3, 2, 1, 8) for c in comps}
        for store in (mem, disk):
            store.write(pos, new)
    before = io.read_bytes
    got, want = disk.read(9, 10, torch.device("cpu")), mem.read(10, 10, torch.device("cpu"))
    for name in ("k", "v"):
        assert got[name].shape == (3, 2, 10, 8)
        assert torch.equal(got[name][:, :, :9], want[name][:, :, :9])
        assert not got[name][:, :, 9].any()  # past n: the fill value
    # a read copies positions [0, 9); a mapped (in-place) home is handed out whole
    assert disk.nbytes == 0 and io.read_bytes - before == 2 * (10 if disk.in_place else 9) * 3 * 2 * 8 * 4
    if disk.in_place:  # a write into the view is the store: the next read sees it
        got["k"][1, 0, 9] = 3.0
        assert (disk.read(10, 10, torch.device("cpu"))["k"][1, 0, 9] == 3.0).all()
    del got
    disk.close()
    io.close()
    assert not (tmp_path / "x.kv").exists()


def test_compressed_cache_components_round_trip(tmp_path):
    config = CompressionConfig(4, 64, -1, param_dtype=torch.float16)
    comps = cache_components(head_dim=64, dtype=torch.float32, config=config)
    io, mem, disk = _seq_stores(tmp_path, comps)
    torch.manual_seed(1)
    k = torch.randn(3, 2, 5, 64)
    parts = compress_kv(k, config, "k") | compress_kv(k, config, "v")
    for store in (mem, disk):
        store.write(torch.arange(5).expand(3, 5), parts)
        read = store.read(5, 7, torch.device("cpu"))
        dense = decompress_kv(read, "k", 64, config, torch.float32)
        assert dense.shape == (3, 2, 7, 64)
        assert torch.isfinite(dense).all() and not dense[:, :, 5:].any()  # unwritten slots decode to 0
        step = (k.amax(-1) - k.amin(-1)) / 15
        assert ((dense[:, :, :5] - k).abs().amax(-1) <= 0.5 * step * 1.01 + 1e-3).all()
    # 64 fp32 values: 32 bytes of codes + fp16 scale + fp16 min (28% of fp16)
    assert mem.nbytes == 2 * 3 * 2 * 10 * 36
    disk.close()
    io.close()


def test_read_header_and_memory_stored_rows(tmp_path):
    from safetensors.torch import save_file

    t = torch.arange(24, dtype=torch.bfloat16).view(6, 4)
    save_file({"w": t}, str(tmp_path / "w.safetensors"))
    entries, _ = read_header(tmp_path / "w.safetensors")
    disk, mem = DiskStored(entries["w"], DiskIO(), pin=False), MemoryStored(t, "cpu")
    cpu = torch.device("cpu")
    for stored in (disk, mem):
        assert torch.equal(stored.all(cpu), t)
        assert torch.equal(stored.rows(2, 5, cpu), t[2:5])
        assert torch.equal(
            stored.take(torch.tensor([[5, 0], [5, 3]]), cpu), t[torch.tensor([[5, 0], [5, 3]])]
        )


def test_host_buffers_are_reused_and_foreign_tensors_never_handed_out():
    pool = HostBuffers()
    mib = HostBuffers.MIN_BYTES
    a = pool.take((mib // 4,), torch.float32)  # 1 MiB
    ptr = a.data_ptr()
    pool.give(a)
    b = pool.take((mib // 8, 2), torch.float32)  # same bytes, another shape: the same memory
    assert b.data_ptr() == ptr and b.shape == (mib // 8, 2)
    resident = torch.zeros(mib, dtype=torch.uint8)  # e.g. a weight held in memory: not ours
    pool.give(b, resident, None)
    c, d = pool.take((mib,), torch.uint8), pool.take((mib,), torch.uint8)
    assert c.data_ptr() == ptr and d.data_ptr() != resident.data_ptr()
    assert int(resident.sum()) == 0
    small = pool.take((16,), torch.float32)  # below MIN_BYTES: a plain allocation, nothing pooled
    pool.give(small)
    assert pool.take((16,), torch.float32).data_ptr() != ptr


def test_host_buffers_keep_no_more_than_a_quarter_over_the_working_set():
    # a KV read grows each step: outgrown buffers are dropped, not hoarded
    pool = HostBuffers()
    for step in range(1, 40):
        bufs = [pool.take((step, HostBuffers.MIN_BYTES // 4), torch.float32) for _ in range(3)]
        pool.give(*bufs)
        lent = sum(t.numel() * 4 for t in bufs)
        free = sum(t.numel() for t in pool._free)
        assert free <= lent * 5 // 4 + 3 * HostBuffers.ROUND
    disabled = HostBuffers(enabled=False)
    x = disabled.take((HostBuffers.MIN_BYTES,), torch.uint8)
    disabled.give(x)
    assert not disabled._free
