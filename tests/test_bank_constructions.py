"""Bank constructions (models/memory_bank.py): the centres each one gives for fixed seeds, pinned
before constructions became classes, and a toy construction added from outside the module."""

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cfa_lightning.models import memory_bank
from cfa_lightning.models.memory_bank import (
    CONSTRUCTIONS,
    NO_OWNER,
    Bytes,
    Construction,
    Coreset,
    KMeans,
    MemoryBank,
    Positional,
)
from tiny_models import bank_settings

DIM, H, W, N_IMAGES = 3, 2, 3, 5


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    """(5, 3, 2, 3) random phi outputs and their image ids 10..14."""
    feats = torch.randn(N_IMAGES, DIM, H, W, generator=torch.Generator().manual_seed(0))
    return feats, torch.arange(N_IMAGES) + 10


def _built(construction: str, **options) -> MemoryBank:
    """A bank of the five images, seeded, fed in two batches with the images' ids."""
    feats, ids = _features()
    settings = {**bank_settings(), "size": None, "seed": 7, "construction": construction, **options}
    bank = MemoryBank(DIM, H, W, **settings)
    bank.reset(N_IMAGES)
    bank.update(feats[:2], ids[:2])
    bank.update(feats[2:], ids[2:])
    bank.finalize()
    return bank


def test_positional_centres_are_the_exact_mean():
    bank = _built("positional")
    mean = _features()[0].double().mean(dim=0).flatten(1).t().float()  # (h*w, D')
    assert torch.allclose(bank.centres, mean, atol=1e-6)
    assert (bank.owners == NO_OWNER).all()


# Centres as the code before the construction classes gave them (faiss k-means, seeded).
PINNED_KMEANS = {
    ("positional", "gamma_c=2"): (
        {"gamma_c": 2},
        [[-0.0819, -0.1379, 0.5942], [0.8746, 0.5105, -0.2366], [-0.2397, -0.5726, 0.2392]],
        [NO_OWNER] * 3,
    ),
    ("kmeans", "size=4"): (
        {"size": 4},
        [
            [0.46, -0.5716, -0.7824],
            [-1.0196, 0.6113, -0.437],
            [0.0269, -1.3584, 1.3295],
            [1.0676, 1.0693, 0.5176],
        ],  # fmt: skip
        [NO_OWNER] * 4,
    ),
    ("kmeans", "size=0.3, max_patches=20"): (
        {"size": 0.3, "max_patches": 20},  # 4 of each image's 6 patches, drawn by the seed
        [
            [1.1065, -0.1306, -1.0845],
            [-0.5497, -0.4372, -1.3024],
            [0.4412, 2.3022, 0.1778],
            [0.7915, 1.6248, 0.0769],
            [0.516, 0.1935, 1.3604],
            [1.853, 1.5863, 0.2484],
            [-0.3378, -1.4884, 0.4983],
            [-0.3938, 1.6045, -0.9854],
            [-1.4368, -0.0509, -0.0714],
        ],
        [NO_OWNER, 14, 12, 14, NO_OWNER, 11, NO_OWNER, NO_OWNER, NO_OWNER],
    ),  # fmt: skip
}


@pytest.mark.parametrize("key", list(PINNED_KMEANS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_clustered_centres_are_those_of_the_same_seed_before(key):
    options, centres, owners = PINNED_KMEANS[key]
    bank = _built(key[0], **options)
    assert torch.allclose(bank.centres, torch.tensor(centres), atol=2e-4)
    assert bank.owners.tolist() == owners


# Coreset centres as (image, position) of the patch each one copies, as before the classes.
PINNED_CORESET = {
    "size=5, projection_dim=2": ({"size": 5, "projection_dim": 2},
                                 [(1, 2), (3, 3), (1, 3), (3, 5), (2, 5)]),
    "size=6, max_patches=15": ({"size": 6, "max_patches": 15},
                               [(0, 3), (1, 5), (3, 2), (3, 4), (0, 1), (1, 3)]),
}  # fmt: skip


@pytest.mark.parametrize("key", list(PINNED_CORESET))
def test_coreset_picks_the_patches_of_the_same_seed_before(key):
    options, picks = PINNED_CORESET[key]
    bank = _built("coreset", **options)
    patches = _features()[0].flatten(2).transpose(1, 2)  # (5, h*w, D')
    assert torch.equal(bank.centres, torch.stack([patches[i, p] for i, p in picks]))
    assert bank.owners.tolist() == [10 + i for i, _ in picks]


class EveryNth(Construction):
    """A toy construction, defined outside memory_bank.py: every ``stride``-th patch of the pool
    (an option of its own, which its config file sets)."""

    name = "every_nth"

    def __init__(self, stride: int = 2, **options) -> None:
        super().__init__(**options)
        self.stride = stride

    @property
    def size_follows_data(self) -> bool:
        return True  # M is known once the patches are

    def n_centres(self, height, width, n_patches=None):
        return None if n_patches is None else -(-n_patches // self.stride)

    def finish(self, kept, count, owners, m):
        return kept[:: self.stride].float(), owners[:: self.stride]

    def work_bytes(self, rows, dim, m):
        return Bytes(m * dim * 4, 0)


TOY_CONFIG = """\
# conf/model/bank/every_nth.yaml: every stride-th patch of all bank images
construction: every_nth
size: null
max_patches: 131072
projection_dim: 128
stride: 3
"""


@pytest.mark.parametrize("by", ["name", "path"])
def test_a_new_construction_is_one_class_and_one_config_file(tmp_path, by):
    (tmp_path / "every_nth.yaml").write_text(TOY_CONFIG)
    config = OmegaConf.to_container(OmegaConf.load(tmp_path / "every_nth.yaml"))
    if by == "path":  # or by its dotted path, for a class in a module nothing imports yet
        config["construction"] = f"{__name__}.EveryNth"
    bank = _built(**config)
    patches = _features()[0].flatten(2).transpose(1, 2).reshape(-1, DIM)  # (30, D'), image-major
    ids = torch.arange(N_IMAGES).repeat_interleave(H * W) + 10  # (30,) each patch's image
    assert torch.equal(bank.centres, patches[::3]) and torch.equal(bank.owners, ids[::3])
    assert bank.build_bytes(N_IMAGES) > 0
    restored = MemoryBank(DIM, H, W, **bank_settings(**config))  # the row count it was built at
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.centres, bank.centres)


def test_the_toy_construction_builds_a_models_bank():
    from torch.utils.data import DataLoader

    from tiny_models import tiny_module

    bank = OmegaConf.to_container(OmegaConf.create(TOY_CONFIG))
    module = tiny_module(input_size=[32, 32], bank=bank)
    images = [{"image": torch.rand(3, 32, 32), "image_path": f"{i}.png"} for i in range(3)]
    module.build_bank(DataLoader(images, batch_size=2))
    assert module.model.bank.n_centres == 3 * 64 // 3 and module.model.bank.most_owned() == 22


def test_the_bank_names_no_construction_in_a_branch():
    """memory_bank.py asks no "which construction?": each one is a class."""
    source = Path(memory_bank.__file__).read_text()
    branches = re.findall(r"^\s*(?:el)?if .*$|\bif .* else .*$", source, re.MULTILINE)
    named = [b for b in branches for name in CONSTRUCTIONS if f'"{name}"' in b or f"'{name}'" in b]
    assert named == [] and len(branches) > 10
    assert CONSTRUCTIONS == ("positional", "kmeans", "coreset")


@pytest.mark.parametrize(
    ("group", "cls"), [("positional", Positional), ("kmeans", KMeans), ("coreset", Coreset)]
)
def test_each_config_file_names_its_class_and_the_commands_stay_the_same(hydra_ctx, group, cls):
    from hydra import compose

    overrides = [f"model/bank={group}"] + (
        ["model.bank.size=16384"] if group != "positional" else []
    )
    bank = OmegaConf.to_container(compose("train", overrides=overrides).model.bank)
    assert bank["construction"] == group  # the name checkpoints store, as before
    made = MemoryBank(64, 128, 128, **bank, gamma_c=1, seed=0)  # the group gives the rest
    assert type(made.strategy) is cls and made.construction == group
    assert made.n_centres == (128 * 128 if group == "positional" else 16384)
