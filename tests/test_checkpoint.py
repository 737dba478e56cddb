"""Checkpoints from elsewhere: nothing but tensors and plain containers is unpickled, and bad
files stop every command with one line that names the file."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cfa_lightning.checkpoint import ADDED_HPARAMS, CheckpointError, load_checkpoint
from cfa_lightning.inference import Predictor
from cfa_lightning.models.lit_module import CFALitModule
from tiny_models import TINY

ROOT = Path(__file__).resolve().parents[1]


class WritesAFile:
    """Unpickling this calls os.system: a stand-in for a checkpoint crafted to run code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture()
def bad_files(tmp_path, trained_checkpoint) -> dict[str, Path]:
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"  # a zip archive, like a real checkpoint
    torch.save({"state_dict": {}, "hyper_parameters": {"x": WritesAFile(marker)}}, crafted)
    raw = tmp_path / "raw_pickle.ckpt"  # a bare pickle stream
    raw.write_bytes(pickle.dumps({"state_dict": WritesAFile(marker)}))
    data = trained_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("these are my notes, not a checkpoint\n" * 20)
    return {"crafted": crafted, "raw": raw, "truncated": truncated, "text": text,
            "marker": marker}  # fmt: skip


def test_a_crafted_pickle_is_refused_and_runs_nothing(bad_files, trained_checkpoint):
    with pytest.raises(CheckpointError, match=r"crafted\.ckpt was refused.*posix\.system"):
        load_checkpoint(bad_files["crafted"])
    with pytest.raises(CheckpointError, match="crafted.ckpt was refused"):
        CFALitModule.from_checkpoint(bad_files["crafted"])
    with pytest.raises(CheckpointError, match="crafted.ckpt was refused"):
        Predictor.from_checkpoint(bad_files["crafted"])
    with pytest.raises(CheckpointError, match="raw_pickle.ckpt is not a checkpoint"):
        Predictor.from_checkpoint(bad_files["raw"])
    assert not bad_files["marker"].exists()


def test_bad_files_get_one_line_that_says_what_is_wrong(bad_files, tmp_path):
    cases = {"truncated": "truncated.ckpt is truncated or damaged",
             "text": "notes.ckpt is not a checkpoint"}  # fmt: skip
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            CFALitModule.from_checkpoint(bad_files[name])
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        CFALitModule.from_checkpoint(tmp_path / "missing.ckpt")


def _command(module: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.mark.slow  # 30-55 s on 2 cores: keeps `make test` under 10 minutes
def test_every_command_stops_with_one_line(bad_files, tmp_path):
    """Each command with one kind of bad file (the Python API tests above cover every kind)."""
    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    commands = [
        ("cfa_lightning.eval", "truncated", ["data=synthetic", f"data.root={tmp_path}"]),
        ("cfa_lightning.predict", "text", [f"input={tmp_path}", f"output_dir={tmp_path}"]),
        ("cfa_lightning.export", "crafted", [f"output_dir={tmp_path}"]),
        ("cfa_lightning.train", "truncated", ["+experiment=demo", f"data.root={tmp_path}"]),
    ]  # train: resuming a fit with ckpt_path=
    for module, name, overrides in commands:
        path = bad_files[name]
        proc = _command(module, f"ckpt_path={path}", *overrides, run_dir)
        assert proc.returncode == 1, (module, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert errors[-1].startswith(f"error: {path} "), (module, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, module
    assert not bad_files["marker"].exists()


def test_checkpoints_of_a_hydra_built_run_load_with_weights_only(
    synthetic_root, tmp_path, hydra_ctx
):
    """Hydra passes DictConfig/ListConfig arguments; the checkpoint stores them as plain data."""
    pl.seed_everything(0)
    dm = instantiate(OmegaConf.create({
        "_target_": "cfa_lightning.data.MVTecDataModule", "root": str(synthetic_root),
        "category": "synthetic", "image_size": [64, 80], "download": {"enabled": False},
    }))  # fmt: skip
    model = instantiate(compose("train", overrides=list(TINY)).model)  # as train.py builds it
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1,
                         accelerator="cpu", logger=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "hydra.ckpt"
    trainer.save_checkpoint(path)
    ckpt = load_checkpoint(path)  # weights_only=True
    assert ckpt["datamodule_hyper_parameters"]["download"] == {"enabled": False}
    assert ckpt["hyper_parameters"]["input_size"] == [64, 80]
    # ... and Lightning's own resume (weights_only=True) reads it too
    resumed = CFALitModule.from_checkpoint(path)
    pl.Trainer(default_root_dir=tmp_path, max_epochs=2, limit_train_batches=1, accelerator="cpu",
               logger=False, enable_progress_bar=False).fit(
        resumed, datamodule=dm, ckpt_path=path, weights_only=True)  # fmt: skip
    assert resumed.trainer.current_epoch == 2


def test_a_checkpoint_with_retired_search_buffers_loads_and_scores_identically(
    trained_checkpoint, tmp_path, caplog
):
    """Older checkpoints hold the pruned search's buffers and options: they load, strictly,
    with at most a one-line notice, and score as the same model saved today."""
    ckpt = torch.load(trained_checkpoint, weights_only=True)
    state = ckpt["state_dict"]
    dim, m = state["model.bank.centres"].shape[1], state["model.bank.centres"].shape[0]
    state.update({
        "model.bank.centre_mean": torch.zeros(dim), "model.bank.basis": torch.eye(dim),
        "model.bank.basis_norm": torch.tensor(1.0, dtype=torch.float64),
        "model.bank.search_dims": torch.tensor(dim),
        "model.bank.group_of": torch.zeros(m, dtype=torch.int64),
    })  # fmt: skip
    ckpt["hyper_parameters"].update(chunk_mb=32, naive_loss=False, prune=False, search_dims=None,
                                    search_groups=None)  # fmt: skip
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("INFO"), torch.no_grad():
        loaded = CFALitModule.from_checkpoint(old).model.eval()(images)
    with torch.no_grad():
        today = CFALitModule.from_checkpoint(trained_checkpoint).model.eval()(images)
    assert torch.equal(loaded.maps, today.maps)
    notices = [r.getMessage() for r in caplog.records if "older version" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0] and "group_of" in notices[0]
    old_score = Predictor.from_checkpoint(old).predict(images[0]).score
    assert old_score == Predictor.from_checkpoint(trained_checkpoint).predict(images[0]).score


def test_a_bank_or_backbone_group_saved_before_its_newer_options_loads(
    trained_checkpoint, tmp_path
):
    """A checkpoint whose bank group lacks max_patches and projection_dim, and whose backbone
    group lacks weights (options added since), is read as the versions before them worked."""
    ckpt = torch.load(trained_checkpoint, weights_only=True)
    hparams = ckpt["hyper_parameters"]
    for key in ("max_patches", "projection_dim"):
        assert hparams["bank"][key] == ADDED_HPARAMS["bank"][key], key
        del hparams["bank"][key]
    del hparams["backbone"]["weights"]
    old = tmp_path / "before_the_bank_options.ckpt"
    torch.save(ckpt, old)
    loaded = CFALitModule.from_checkpoint(old)
    assert (
        loaded.hparams["bank"] == CFALitModule.from_checkpoint(trained_checkpoint).hparams["bank"]
    )


def test_a_checkpoint_of_an_earlier_version_loads_and_scores_identically(
    trained_checkpoint, tmp_path
):
    """A checkpoint written before the model took its settings from the config holds the same
    flat list, less the options added since (read as the versions before them worked)."""
    ckpt = torch.load(trained_checkpoint, weights_only=True)
    assert ckpt["cfa_lightning_version"]  # recorded since
    del ckpt["cfa_lightning_version"]
    for key in ("bank", "tap_norm", "tap_cache_mb", "untrained_epoch", "lr_schedule"):
        if key != "bank":  # the tiny model's bank is the positional one the old versions built
            assert ckpt["hyper_parameters"][key] == ADDED_HPARAMS[key], key
        del ckpt["hyper_parameters"][key]
    old = tmp_path / "before_the_bank_option.ckpt"
    torch.save(ckpt, old)
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded = CFALitModule.from_checkpoint(old)
        today = CFALitModule.from_checkpoint(trained_checkpoint)
        assert torch.equal(loaded.model.eval()(images).maps, today.model.eval()(images).maps)
    assert loaded.model.bank.construction == "positional" and loaded.hparams.K == 3


def test_a_checkpoint_this_version_cannot_rebuild_says_which_version_wrote_it(
    trained_checkpoint, tmp_path
):
    ckpt = torch.load(trained_checkpoint, weights_only=True)
    ckpt["cfa_lightning_version"] = "9.0.0"
    ckpt["hyper_parameters"]["warp"] = 2  # an option of that later version
    del ckpt["hyper_parameters"]["J"]
    later = tmp_path / "later.ckpt"
    torch.save(ckpt, later)
    with pytest.raises(CheckpointError) as refused:
        CFALitModule.from_checkpoint(later)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{later} was written by cfa-lightning 9.0.0")
    assert "does not know: warp" in message and "lacks: J" in message
    assert "load it with the version that wrote it, or train it again" in message
    del ckpt["cfa_lightning_version"]
    torch.save(ckpt, later)
    with pytest.raises(CheckpointError, match="an earlier cfa-lightning \\(it records none\\)"):
        CFALitModule.from_checkpoint(later)


def test_a_checkpoint_loads_with_its_own_bank_whatever_the_config_says(coreset_checkpoint):
    ckpt = torch.load(coreset_checkpoint, map_location="cpu", weights_only=True)
    saved = ckpt["state_dict"]["model.bank.centres"]
    assert ckpt["hyper_parameters"]["bank"]["construction"] == "coreset"
    pl.seed_everything(1)
    restored = CFALitModule.from_checkpoint(coreset_checkpoint)
    bank = restored.model.bank
    assert bank.construction == "coreset" and bank.size == 0.5
    assert torch.equal(bank.centres, saved) and saved.shape[0] > 16 * 20  # a fraction > h * w
    scales = ckpt["state_dict"]["model.descriptor.tap_scales"]  # fitted by model.tap_norm
    assert restored.model.descriptor.tap_norm and not torch.equal(scales, torch.ones(3))
    assert torch.equal(restored.model.descriptor.tap_scales, scales)
    images = torch.rand(2, 3, 64, 80)
    again = CFALitModule.from_checkpoint(coreset_checkpoint)
    with torch.no_grad():
        assert torch.equal(restored.model(images).maps, again.model(images).maps)
