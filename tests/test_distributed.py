"""DDP helpers: evaluation padding is recognised and dropped, batch by batch; the bank loader is
sharded over the ranks without padding, and a bank build that fails on one rank ends on all
(2 gloo processes)."""

import datetime
import socket
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from cfa_lightning.distributed import PaddingFilter, rank_sample_indices
from tiny_models import bank_group, tiny_module

N_IMAGES = 5  # 3 batches of 2: rank 0 reads images 0, 2, 4 and rank 1 images 1, 3


def _loader(n: int, world: int, rank: int, batch_size: int) -> DataLoader:
    data = TensorDataset(torch.arange(n))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(data, batch_size=batch_size, sampler=sampler)


@pytest.mark.parametrize(
    ("n", "world", "batch_size"), [(9, 2, 2), (10, 4, 3), (5, 8, 4), (12, 3, 16)]
)
def test_every_sample_is_kept_exactly_once_over_the_ranks(n, world, batch_size):
    kept = []
    for rank in range(world):
        loader = _loader(n, world, rank, batch_size)
        filt = PaddingFilter(loader)
        for (batch,) in loader:
            keep = filt.keep(len(batch))
            assert batch[: len(keep)].tolist() == keep  # real samples are a prefix of the batch
            kept += keep
    assert sorted(kept) == list(range(n))


def test_without_a_distributed_sampler_everything_is_real():
    loader = DataLoader(TensorDataset(torch.arange(7)), batch_size=3)
    assert rank_sample_indices(loader) == list(range(7))
    assert PaddingFilter().keep(4) is None


class CountingImages(Dataset):
    """Random images that remember which indices this process read."""

    def __init__(self, n: int) -> None:
        self.images = torch.rand(n, 3, 64, 80, generator=torch.Generator().manual_seed(0))
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        self.read.append(i)
        return {"image": self.images[i]}


class ObjectBroadcastStrategy:
    """What Lightning's DDP strategy does with `broadcast`: pickle the object to every rank."""

    def reduce(self, tensor, reduce_op="sum"):
        torch.distributed.all_reduce(tensor)
        return tensor

    def broadcast(self, obj, src=0):
        objects = [obj]
        torch.distributed.broadcast_object_list(objects, src=src)
        return objects[0]


PICKLING = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")


def record_collectives(monkeypatch) -> dict:
    """Wraps torch.distributed's broadcasts: the (shape, dtype) of every tensor broadcast, and
    every call of a collective that pickles Python objects."""
    seen = {"tensors": [], "pickled": []}
    broadcast = torch.distributed.broadcast

    def tensor_broadcast(tensor, *args, **kwargs):
        seen["tensors"].append((tuple(tensor.shape), str(tensor.dtype)))
        return broadcast(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.distributed, "broadcast", tensor_broadcast)
    for name in PICKLING:
        real = getattr(torch.distributed, name)

        def pickled(*args, _real=real, _name=name, **kwargs):
            seen["pickled"].append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.distributed, name, pickled)
    return seen


def _build_bank_on_rank(
    rank: int, world: int, port: int, out: str, bank=None, tap_norm: bool = False
) -> None:
    from pytorch_lightning.plugins.precision import Precision

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)  # fmt: skip
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            seen = record_collectives(monkeypatch)
            pl.seed_everything(0)
            options = {"gamma_c": 2} if bank is None else {"bank": bank}  # k-means on every rank
            module = tiny_module(tap_norm=tap_norm, **options)
            module._trainer = SimpleNamespace(  # the parts of a DDP Trainer that build_bank may use
                world_size=world, global_rank=rank, is_global_zero=rank == 0,
                strategy=ObjectBroadcastStrategy(), progress_bar_callback=None,
                precision_plugin=Precision(),
            )  # fmt: skip
            data = CountingImages(N_IMAGES)
            module.build_bank(DataLoader(data, batch_size=2))
        scales = module.model.descriptor.state_dict().get("tap_scales")
        torch.save({"centres": module.model.bank.centres, "read": data.read, "scales": scales,
                    **seen}, f"{out}/rank{rank}.pt")  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def test_bank_ranks_read_their_own_share_and_take_rank0s_centres_as_a_tensor(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_build_bank_on_rank, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # each image is read by exactly one rank (no padding, no batch read and thrown away)
    assert sorted(ranks[0]["read"] + ranks[1]["read"]) == list(range(N_IMAGES))
    assert len(ranks[0]["read"]) == 3 and len(ranks[1]["read"]) == 2
    # the centres and their owners travel once, as tensors (torch.distributed.broadcast); nothing
    # of the build is pickled (Lightning's strategy.broadcast and the *_object collectives would be)
    m = ranks[0]["centres"].shape[0]
    sent = [((m, ranks[0]["centres"].shape[1]), "torch.float32"), ((m,), "torch.int64")]
    for r in ranks:
        assert r["tensors"] == sent, r["tensors"]
        assert r["pickled"] == [], r["pickled"]
    assert torch.equal(ranks[0]["centres"], ranks[1]["centres"])
    # ... and they are the bank one process builds from all the images
    pl.seed_everything(0)
    single = tiny_module(gamma_c=2)
    single.build_bank(DataLoader(CountingImages(N_IMAGES), batch_size=2))
    assert torch.allclose(ranks[0]["centres"], single.model.bank.centres, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "bank, tap_norm",
    [
        (bank_group("kmeans", size=40), False),
        (bank_group("coreset", size=40), False),
        (bank_group("coreset", size=40), True),
        (bank_group("coreset", size=1.0), False),
    ],
)
def test_pooled_banks_are_identical_on_every_rank_and_built_from_all_images(
    tmp_path, bank, tap_norm
):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, port, str(tmp_path), bank, tap_norm)
    torch.multiprocessing.spawn(_build_bank_on_rank, args=args, nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert sorted(ranks[0]["read"] + ranks[1]["read"]) == list(range(N_IMAGES))
    assert torch.equal(ranks[0]["centres"], ranks[1]["centres"])
    if tap_norm:  # one set of tap scales, averaged over the ranks' first batches
        assert torch.equal(ranks[0]["scales"], ranks[1]["scales"])
        assert not torch.equal(ranks[0]["scales"], torch.ones(3))
    for r in ranks:  # the pools travel as tensors; nothing of the build is pickled
        assert r["pickled"] == [], r["pickled"]
    pl.seed_everything(0)
    single = tiny_module(bank=bank)
    single.build_bank(DataLoader(CountingImages(N_IMAGES), batch_size=2))
    expected = single.model.bank.centres
    assert ranks[0]["centres"].shape == expected.shape
    if bank["size"] == 1.0:  # every patch of every image, whichever rank read it
        key = lambda c: sorted(map(tuple, c.tolist()))  # noqa: E731
        assert key(ranks[0]["centres"]) == key(expected)


def _failing_build_on_rank(rank: int, world: int, port: int, out: str, failure: str) -> None:
    """A build that fails on one rank: rank 1's memory check ("memory"), or rank 0's selection
    after the pass ("selection": a coreset larger than the distinct patches of identical
    images). Each rank saves what it raised; a hang ends at the process group's timeout."""
    from pytorch_lightning.plugins.precision import Precision

    from cfa_lightning.models import memory_bank

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world,
                                         timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        data = CountingImages(N_IMAGES)
        with pytest.MonkeyPatch.context() as monkeypatch:
            if failure == "memory" and rank == 1:
                monkeypatch.setattr(memory_bank, "available_memory_bytes", lambda: 2**20)
            if failure == "selection":  # 5 identical images: 320 distinct patches of 1600
                data.images = data.images[:1].expand_as(data.images)
            pl.seed_everything(0)
            size = 40 if failure == "memory" else 0.25  # 400 of 1600 patches
            module = tiny_module(bank=bank_group("coreset", size=size))
            module._trainer = SimpleNamespace(
                world_size=world, global_rank=rank, is_global_zero=rank == 0,
                strategy=ObjectBroadcastStrategy(), progress_bar_callback=None,
                precision_plugin=Precision(),
            )  # fmt: skip
            try:
                module.build_bank(DataLoader(data, batch_size=2))
                raised = ("nothing", "")
            except Exception as err:
                raised = (type(err).__name__, str(err))
        torch.save({"raised": raised, "read": data.read}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["memory", "selection"])
def test_a_build_that_fails_on_one_rank_ends_on_every_rank(tmp_path, failure):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, port, str(tmp_path), failure)
    torch.multiprocessing.spawn(_failing_build_on_rank, args=args, nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    if failure == "memory":  # rank 1's verdict, raised alike by both before any image is read
        assert ranks[0]["raised"] == ranks[1]["raised"]
        kind, message = ranks[0]["raised"]
        assert kind == "MemoryError" and "is available on rank 1 of 2" in message
        assert "model.bank.size=40" in message
        assert ranks[0]["read"] == ranks[1]["read"] == []
        return
    assert ranks[0]["raised"][0] == "ValueError"  # rank 0's own error
    selection = "model.bank.size=0.25 asks for 400 centres, but the pool holds only 320 distinct"
    assert ranks[0]["raised"][1].startswith(selection)
    assert ranks[1]["raised"] == (
        "RuntimeError",
        "the memory bank could not be built on rank 0: " + ranks[0]["raised"][1],
    )


def test_fewer_training_images_than_ranks_is_refused_in_one_line():
    from cfa_lightning.distributed import shard_loader

    with pytest.raises(ValueError, match=r"1 training image\(s\) cannot be shared over 2 ranks"):
        shard_loader(DataLoader(TensorDataset(torch.arange(1))), rank=1, world=2)
