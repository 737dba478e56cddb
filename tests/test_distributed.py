"""The padding a DistributedSampler adds is recognised and dropped, batch by batch."""

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cfa_lightning.distributed import PaddingFilter, rank_sample_indices


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
