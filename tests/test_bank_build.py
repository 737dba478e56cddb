"""The memory a bank build needs, checked before the pass (models/memory_bank.py estimates,
models/bank_build.py decides): free memory injected, so no GPU and no large machine is needed."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cfa_lightning.models import memory_bank
from cfa_lightning.models.bank_build import tap_bytes_per_image
from cfa_lightning.models.memory_bank import Bytes, MemoryBank
from tiny_models import bank_group, bank_settings, tiny_module

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
LOTS = 2**50


def _bank(construction: str = "kmeans", **options) -> MemoryBank:
    options.setdefault("size", None)  # h * w = 320 unless given
    return MemoryBank(64, 16, 20, **bank_settings(construction, **options))  # 320 patches an image


def test_a_build_that_fits_passes_and_one_byte_less_is_refused_naming_size_and_need():
    bank = _bank(size=1000)
    need = bank.build_bytes(10)
    assert bank.memory_problem(10, CPU, free=Bytes(None, need)) is None
    assert bank.memory_problem(10, CPU, free=Bytes(None, None)) is None  # unknown: no verdict
    problem = bank.memory_problem(10, CPU, free=Bytes(None, need - 1))
    assert problem.startswith(f"building the kmeans bank needs about {need / 2**30:.3g} GiB of ")
    assert "1000 centres (model.bank.size=1000) from a pool of 3200 patches of 64 dims" in problem
    assert "model.bank.max_patches" in problem and "model.tap_cache_mb" in problem


def test_the_tap_cache_filling_during_the_pass_is_counted():
    bank = _bank()
    cache = 3 * 2**20
    assert bank.build_bytes(10, cache_bytes=cache) == bank.build_bytes(10) + cache
    need = bank.build_bytes(10)
    problem = bank.memory_problem(10, CPU, cache_bytes=cache, free=Bytes(None, need))
    assert "and up to 0.00293 GiB of taps (model.tap_cache_mb)" in problem


def test_on_a_gpu_the_card_and_the_host_are_checked_apart():
    """The pool lives on the descriptors' device; k-means copies it to the host for faiss, the
    coreset selects on the device."""
    kmeans, coreset = _bank("kmeans"), _bank("coreset")
    for bank in (kmeans, coreset):
        phases = bank.build_phases(10)
        device, host = max(p.device for p in phases), max(p.host for p in phases)
        assert bank.memory_problem(10, GPU, free=Bytes(device, host)) is None
        problem = bank.memory_problem(10, GPU, free=Bytes(device - 1, LOTS))
        assert f"of memory on cuda:0 for {bank.n_centres} centres" in problem
    pool = 3200 * 64 * 4
    assert max(p.host for p in kmeans.build_phases(10)) > pool  # faiss's host copy
    assert max(p.host for p in coreset.build_phases(10)) < pool  # the owners only
    problem = kmeans.memory_problem(10, GPU, free=Bytes(LOTS, pool))
    assert "GiB of host memory" in problem


def test_under_ddp_rank_0_counts_the_gathered_pool_and_the_others_only_their_share():
    bank = _bank("coreset", size=100)
    pool, share = 3200 * 64 * 4, 5 * 320 * 64 * 4  # 10 images over 2 ranks: 5 each
    one = bank.build_phases(10)
    rank0, rank1 = bank.build_phases(10, world=2, rank=0), bank.build_phases(10, world=2, rank=1)
    assert [p.device for p in rank1] == [2 * share]  # its batches, then joined; no selection
    assert share + pool in [p.device for p in rank0]  # its own share beside the whole pool
    assert max(p.device for p in rank0) >= max(p.device for p in one)
    need0, need1 = bank.build_bytes(10, 2, 0), bank.build_bytes(10, 2, 1)
    assert need1 < need0
    problem = bank.memory_problem(10, CPU, world=2, rank=1, free=Bytes(None, need1 - 1))
    assert problem.endswith("is available on rank 1 of 2; lower model.bank.max_patches or "
                            "model.tap_cache_mb, or model.gamma_d or data.image_size")  # fmt: skip
    assert bank.memory_problem(10, CPU, world=2, rank=1, free=Bytes(None, need1)) is None


def test_host_memory_is_the_smaller_of_meminfo_and_a_cgroup_limit(tmp_path, monkeypatch):
    assert memory_bank.cgroup_free_bytes(tmp_path) is None  # no cgroup v2 files
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("4096\n")
    assert memory_bank.cgroup_free_bytes(tmp_path) is None  # no limit
    (tmp_path / "memory.max").write_text("10000\n")
    assert memory_bank.cgroup_free_bytes(tmp_path) == 10000 - 4096
    monkeypatch.setattr(memory_bank, "_meminfo_available", lambda: 8000)
    monkeypatch.setattr(memory_bank, "cgroup_free_bytes", lambda: 3000)
    assert memory_bank.available_memory_bytes() == 3000
    monkeypatch.setattr(memory_bank, "cgroup_free_bytes", lambda: None)
    assert memory_bank.available_memory_bytes() == 8000
    assert memory_bank.free_memory(CPU) == Bytes(None, 8000)


class RecordedImages(Dataset):
    def __init__(self, n: int) -> None:
        self.read: list[int] = []
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.read.append(i)
        return {"image": torch.rand(3, 64, 80)}


def test_a_build_that_does_not_fit_stops_before_the_pass(monkeypatch):
    module = tiny_module(tap_cache_mb=1024, bank=bank_group("coreset", size=100))
    monkeypatch.setattr(
        memory_bank, "available_memory_bytes", lambda: 2**20
    )  # 1 MiB: less than the pool alone
    data = RecordedImages(3)
    with pytest.raises(MemoryError) as failed:
        module.build_bank(DataLoader(data, batch_size=2))
    assert data.read == []  # not one image read
    taps = 3 * tap_bytes_per_image(module.model)
    assert taps < 1024 * 2**20
    message = str(failed.value)
    assert message.startswith("building the coreset bank needs about ")
    assert "model.bank.size=100" in message and "GiB of memory" in message
    assert f"up to {taps / 2**30:.3g} GiB of taps" in message  # the cache holds 3 images' taps
    assert not bool(module.model.bank.fitted)
