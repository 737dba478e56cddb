import copy
import inspect

import pytest
import pytorch_lightning as pl
import torch

from cfa_lightning.checkpoint import CheckpointError
from cfa_lightning.data import MVTecDataModule
from cfa_lightning.models.cfa import CFA, settings_of
from cfa_lightning.models.lit_module import CFALitModule, model_config
from cfa_lightning.models.loss import CFALoss
from tiny_models import bank_group, tiny_module


def _trainer(tmp_path, epochs=1, **kwargs):
    return pl.Trainer(default_root_dir=tmp_path, max_epochs=epochs, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      **kwargs)  # fmt: skip


@pytest.fixture()
def datamodule(synthetic_root):
    return MVTecDataModule(str(synthetic_root), "synthetic", image_size=(64, 80), batch_size=4,
                           eval_batch_size=5, val_fraction=0.25)  # fmt: skip


def test_checkpoint_round_trip_scores_identically(tmp_path, datamodule):
    pl.seed_everything(0)
    module = tiny_module(gamma_c=2)
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=datamodule)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    assert bool(module.model.bank.fitted)
    batch = next(iter(datamodule.test_dataloader()))
    module.eval()
    with torch.no_grad():
        expected = module.model(batch["image"])
    pl.seed_everything(123)  # a different init must be overwritten by the checkpoint
    restored = CFALitModule.from_checkpoint(ckpt).eval()
    with torch.no_grad():
        got = restored.model(batch["image"])
    assert torch.equal(got.maps, expected.maps)
    assert torch.equal(restored.model.loss_fn.radius, module.model.loss_fn.radius)
    assert restored.hparams.gamma_c == 2


def test_bank_is_built_once_and_not_rebuilt_on_resume(tmp_path, datamodule, monkeypatch):
    pl.seed_everything(0)
    module = tiny_module()
    calls = []
    original = CFALitModule.build_bank
    monkeypatch.setattr(
        CFALitModule, "build_bank", lambda self, loader: calls.append(1) or original(self, loader)
    )
    trainer = _trainer(tmp_path, epochs=1)
    trainer.fit(module, datamodule=datamodule)
    assert calls == [1]
    bank = module.model.bank.centres.clone()
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = tiny_module()
    _trainer(tmp_path, epochs=2).fit(resumed, datamodule=datamodule, ckpt_path=str(ckpt))
    assert calls == [1]  # restored from the checkpoint, not built again
    assert torch.equal(resumed.model.bank.centres, bank)
    assert resumed.trainer.current_epoch == 2


def test_bank_mean_independent_of_batch_size(synthetic_root):
    banks = []
    for batch_size in (1, 5):  # 9 training images: 9 x 1, and 5 + a partial 4
        pl.seed_everything(0)
        dm = MVTecDataModule(str(synthetic_root), "synthetic", image_size=(64, 80),
                             eval_batch_size=batch_size, val_fraction=0.25)  # fmt: skip
        dm.setup("fit")
        module = tiny_module()
        module.build_bank(dm.bank_dataloader())
        banks.append(module.model.bank.centres)
    assert torch.allclose(banks[0], banks[1], atol=1e-5)


def _rank_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUROC: the chance that an anomalous sample outscores a normal one, ties
    counting half (average ranks)."""
    values, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0) - (counts - 1) / 2).double()[inverse]  # 1-based, ties averaged
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    return float((ranks[labels.bool()].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _best_f1(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Best F1 over every threshold (flagged: score >= threshold), with its lowest threshold."""
    best = (-1.0, 0.0)
    for t in torch.unique(scores).tolist():
        flagged = scores >= t
        tp = int((flagged & labels.bool()).sum())
        f1 = 2 * tp / (int(flagged.sum()) + int(labels.sum()))
        best = max(best, (f1, -t))
    return best[0], -best[1]


def test_test_metrics_equal_an_independent_computation(tmp_path, datamodule):
    pl.seed_everything(0)
    module = tiny_module()
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    keys = {
        "test/image_AUROC",
        "test/pixel_AUROC",
        "test/pixel_AUPRO",
        "test/image_F1",
        "test/pixel_F1",
    }
    assert keys <= set(module.test_results)
    # The answer computed here without Lightning or torchmetrics, from the model's own outputs
    # on every test image (12: 4 normal, 8 defective; batches of 5, the last one partial).
    module.eval()
    scores, labels, maps, masks = [], [], [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            out = module.model(batch["image"])
            scores.append(out.image_scores)
            maps.append(out.maps)
            labels.append(batch["label"])
            masks.append(batch["mask"][:, 0])
    scores, labels = torch.cat(scores), torch.cat(labels)
    maps, masks = torch.cat(maps).flatten(), torch.cat(masks).flatten()
    assert labels.tolist() == [0] * 4 + [1] * 8
    f1, threshold = _best_f1(scores, labels)
    got = module.test_results
    assert got["test/image_AUROC"] == pytest.approx(_rank_auroc(scores, labels), abs=1e-6)
    assert got["test/image_F1"] == pytest.approx(f1, abs=1e-6)
    assert got["test/image_F1max_threshold"] == pytest.approx(threshold, rel=1e-6)
    assert got["test/pixel_AUROC"] == pytest.approx(_rank_auroc(maps, masks), abs=1e-5)


def test_radius_is_trained_and_can_be_frozen(tmp_path, datamodule):
    for learn in (True, False):
        pl.seed_everything(0)
        module = tiny_module(learn_radius=learn, radius=0.5)
        _trainer(tmp_path).fit(module, datamodule=datamodule)
        moved = float(module.model.loss_fn.radius) != 0.5
        assert moved == learn
        n_opt = sum(
            p.numel() for g in module.trainer.optimizers[0].param_groups for p in g["params"]
        )
        assert n_opt == module.model.descriptor.coord_conv.weight.numel() + 448 + int(learn)


def test_foreign_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, path)
    with pytest.raises(ValueError, match="not a cfa-lightning checkpoint"):
        CFALitModule.from_checkpoint(path)
    with pytest.raises(CheckpointError, match="ckpt_path"):
        CFALitModule.from_checkpoint(tmp_path / "missing.ckpt")


def test_thresholds_are_calibrated_on_validation_and_saved(tmp_path, datamodule):
    pl.seed_everything(0)
    module = tiny_module(threshold_quantile=0.9)
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=datamodule)
    cal = module.model.calibration
    assert bool(cal.fitted)
    with torch.no_grad():
        scores = torch.cat(
            [module.model(b["image"]).image_scores for b in datamodule.val_dataloader()]
        )
    assert float(cal.image_threshold) == pytest.approx(float(torch.quantile(scores, 0.9)), rel=1e-4)
    ckpt = tmp_path / "cal.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = CFALitModule.from_checkpoint(ckpt).model.calibration
    assert torch.equal(restored.image_threshold, cal.image_threshold) and bool(restored.fitted)


@pytest.mark.slow
def test_compiled_descriptor_matches_eager():
    pl.seed_everything(0)
    module = tiny_module(input_size=[64, 64], compile=True)
    module.setup("fit")
    x = torch.rand(2, 3, 64, 64)
    eager = module.model.descriptor(module.model.backbone(x))
    assert torch.allclose(module.model.describe(x), eager, atol=1e-5)


def test_fit_without_ckpt_path_rebuilds_the_bank_from_the_new_data(tmp_path, datamodule,
                                                                   synthetic_root):  # fmt: skip
    pl.seed_everything(0)
    module = tiny_module()
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=datamodule)
    old_bank = module.model.bank.centres.clone()
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = CFALitModule.from_checkpoint(ckpt)
    new_data = MVTecDataModule(str(synthetic_root), "synthetic", image_size=(64, 80), batch_size=4,
                               eval_batch_size=5, val_fraction=0.5, split_seed=1)  # fmt: skip
    new_data.setup("fit")
    expected = copy.deepcopy(restored)  # the bank the restored phi gives on the new images
    expected.build_bank(new_data.bank_dataloader())
    with pytest.warns(UserWarning, match="already has a memory bank: it is rebuilt"):
        _trainer(tmp_path).fit(restored, datamodule=new_data)
    assert torch.allclose(restored.model.bank.centres, expected.model.bank.centres, atol=1e-6)
    assert not torch.allclose(restored.model.bank.centres, old_bank, atol=1e-3)


def test_bank_is_built_under_the_training_precision(tmp_path, datamodule):
    pl.seed_everything(0)
    module = tiny_module()
    initial = copy.deepcopy(module.model)  # phi as it is when the bank is built
    trainer = _trainer(tmp_path, precision="bf16-mixed", limit_train_batches=1,
                       limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)

    def bank_mean(autocast: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            descs = [initial.describe(b["image"]).double() for b in datamodule.bank_dataloader()]
        return torch.cat(descs).mean(dim=0).float().flatten(1).transpose(0, 1)  # (h*w, D')

    bf16, fp32 = bank_mean(autocast=True), bank_mean(autocast=False)
    assert not torch.allclose(bf16, fp32, atol=1e-4)  # the precisions really differ
    assert torch.allclose(module.model.bank.centres, bf16, atol=1e-6)


def test_the_repulsion_term_changes_what_training_learns(tmp_path, datamodule):
    """J = 0 against J = 3, with r^2 = median d_(K+1) + alpha of the initial model, so that the
    repulsion hinge max(0, r^2 - d_(j) - alpha) is active for about half the patches. (At the
    default r = 1e-5 it stays exactly zero in a short training, so J = 0 changes nothing there:
    cookies, 2 epochs, J = 0 gives the same metrics as J = 3; see README, Results.)"""
    pl.seed_everything(0)
    probe = tiny_module()
    datamodule.setup("fit")
    probe.build_bank(datamodule.bank_dataloader())
    images = next(iter(datamodule.bank_dataloader()))["image"]
    with torch.no_grad():
        p = probe.model.flatten_patches(probe.model.describe(images))
        d = torch.cdist(p, probe.model.bank.centres).pow(2).sort(dim=1).values  # (N, M) ascending
    K, alpha = probe.model.K, probe.model.loss_fn.alpha
    radius = float((d[:, K].median() + alpha).sqrt())  # d_(K+1) is column K
    test_images = next(iter(datamodule.test_dataloader()))["image"]
    scores = {}
    for J in (0, 3):
        pl.seed_everything(0)
        module = tiny_module(J=J, radius=radius)
        _trainer(tmp_path, epochs=2, limit_val_batches=0).fit(module, datamodule=datamodule)
        with torch.no_grad():
            scores[J] = module.model.eval()(test_images).image_scores
    assert not torch.allclose(scores[0], scores[3], rtol=1e-2)


class _Outputs(pl.Callback):
    """Keeps the maps of every test batch."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.maps.append(outputs.maps)


def test_bf16_mixed_scores_maps_and_metrics_in_float32(tmp_path, datamodule, monkeypatch):
    """Under bf16-mixed, validation, test and predict maps are float32, keep as many
    distinct values as in fp32, and the test metrics are those of the same model in fp32.

    Tolerance 1e-3 on the metrics: bf16 autocast still runs the backbone and the descriptor
    (phi's output carries ~2^-9 relative rounding), so pixel scores move slightly, and the
    rank-based metrics move where that swaps a normal and an anomalous pixel: measured 3e-5
    here (pixel AUROC 0.98335 vs 0.98336, AUPRO 0.94243 vs 0.94246), so 1e-3 leaves room for
    other seeds and torch versions. On this small set, maps computed in bf16 (388 distinct
    values instead of 61,247) move these metrics by as little; the dtype and distinct-value
    checks are the ones that catch them."""
    pl.seed_everything(0)
    module = tiny_module()
    _trainer(tmp_path).fit(module, datamodule=datamodule)  # a trained model, in fp32
    seen = {}
    for precision in ("32-true", "bf16-mixed"):
        val_maps = []
        update = module.val_metrics.update
        monkeypatch.setattr(module.val_metrics, "update",
                            lambda s, y, m, t, seen=val_maps, f=update, **kw:
                            (seen.append(m), f(s, y, m, t, **kw)))  # fmt: skip
        trainer = _trainer(tmp_path, precision=precision, callbacks=[(test := _Outputs())])
        trainer.validate(module, datamodule=datamodule, verbose=False)
        monkeypatch.undo()
        trainer.test(module, datamodule=datamodule, verbose=False)
        predicted = trainer.predict(module, dataloaders=datamodule.test_dataloader())
        maps = {"val": val_maps, "test": test.maps, "predict": [o.maps for o in predicted]}
        assert all(m.dtype == torch.float32 for ms in maps.values() for m in ms), precision
        assert all(o.image_scores.dtype == torch.float32 for o in predicted)
        seen[precision] = ({k: torch.cat(v).unique().numel() for k, v in maps.items()},
                           dict(module.test_results))  # fmt: skip
    (distinct32, metrics32), (distinct16, metrics16) = seen["32-true"], seen["bf16-mixed"]
    for stage, n in distinct32.items():
        assert abs(distinct16[stage] - n) <= 0.05 * n, (stage, distinct16[stage], n)
    for name in ("test/image_AUROC", "test/pixel_AUROC", "test/pixel_AUPRO"):
        assert abs(metrics16[name] - metrics32[name]) <= 1e-3, (name, metrics16, metrics32)


def _validated_fit(tmp_path, synthetic_root, cache_mb):
    """Two epochs with synthetic validation; the backbone's calls counted by the stage they
    ran in (the bank build, in on_fit_start, counts as "train")."""
    pl.seed_everything(0)
    dm = MVTecDataModule(str(synthetic_root), "synthetic", image_size=(64, 80), batch_size=4,
                         eval_batch_size=5, val_fraction=0.34, val_anomalies="synthetic")  # fmt: skip
    module = tiny_module(tap_cache_mb=cache_mb)
    stages = []
    module.model.backbone.register_forward_hook(
        lambda *_: stages.append(module.trainer.state.stage.value)
    )
    losses = []
    module.on_train_batch_end = lambda out, *_: losses.append(float(out["loss"]))
    trainer = _trainer(tmp_path, epochs=2)
    trainer.fit(module, datamodule=dm)
    curves = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    counts = {"train": len(dm.train_dataloader()), "validate": len(dm.val_dataloader())}
    counts["bank"] = len(dm.bank_dataloader())
    return stages, curves, losses, counts, module


def test_a_fit_runs_the_backbone_once_per_image_and_trains_the_same(tmp_path, synthetic_root):
    stages, cached, losses, n, module = _validated_fit(tmp_path / "a", synthetic_root, 2048)
    # the bank build keeps the training images' taps, the first validation the validation ones
    assert stages.count("train") == n["bank"]  # no training step ran it
    assert stages.count("validate") == n["validate"]  # the first validation only, of 2
    assert len(module._taps) == 0  # freed at the end of the fit
    stages, fresh, fresh_losses, _, _ = _validated_fit(tmp_path / "b", synthetic_root, 0)
    assert stages.count("train") == n["bank"] + 2 * n["train"]
    assert stages.count("validate") == 2 * n["validate"]
    assert set(cached) == set(fresh) and "val/pixel_AUPRO" in cached
    # The kept taps come from the bank's batches of 5, the fresh ones from training batches of
    # 4: the same images, so the same taps up to the convolutions' rounding per batch size.
    assert losses == pytest.approx(fresh_losses, rel=1e-5)
    for name, value in fresh.items():
        assert cached[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_taps_kept_in_validation_never_enter_a_training_step():
    """An image seen first by validation (inference mode) is recomputed for training, whose
    autograd cannot take inference tensors; past the budget nothing is kept."""
    from cfa_lightning.models.tap_cache import TapCache

    backbone = tiny_module().model.backbone
    images, paths = torch.rand(2, 3, 64, 80), ["a.png", "b.png"]
    cache = TapCache(2**30)
    with torch.inference_mode():
        kept = cache.taps(backbone, images, paths)
        again = cache.taps(backbone, images, paths)  # from the cache, in the same mode
    assert all(torch.equal(k, a) for k, a in zip(kept, again, strict=True)) and len(cache) == 2
    fresh = cache.taps(backbone, images, paths)
    assert not any(t.is_inference() for t in fresh)
    one_image = sum(t[:1].numel() * t.element_size() for t in fresh)
    small = TapCache(one_image)
    small.taps(backbone, images, paths)
    assert len(small) == 1 and small.bytes == one_image
    assert len(TapCache(0).taps(backbone, images, paths)) == len(fresh) and len(TapCache(0)) == 0


@pytest.mark.parametrize("value", [-1, "lots", True])
def test_a_bad_tap_cache_budget_is_refused_naming_the_option(value):
    with pytest.raises(ValueError, match="model.tap_cache_mb"):
        tiny_module(tap_cache_mb=value)


def test_a_bank_count_beyond_the_data_takes_every_patch_and_a_fraction_beyond_the_pool_stops():
    module = tiny_module(bank=bank_group("coreset", size=10_000))
    images = [{"image": torch.rand(3, 64, 80)} for _ in range(3)]  # 3 x 320 patches
    module.build_bank(torch.utils.data.DataLoader(images, batch_size=2))
    assert module.model.bank.n_centres == 960  # the count is the most: every patch is a centre
    module = tiny_module(bank=bank_group("coreset", size=0.9, max_patches=600))
    with pytest.raises(ValueError, match=r"model.bank.size=0.9.*largest valid size is 600"):
        module.build_bank(torch.utils.data.DataLoader(images, batch_size=2))
    assert not bool(module.model.bank.fitted)


def test_a_bank_that_would_not_fit_stops_before_the_build(monkeypatch):
    from cfa_lightning.models import memory_bank

    module = tiny_module(bank=bank_group("kmeans"))
    monkeypatch.setattr(memory_bank, "available_memory_bytes", lambda: 1000)
    images = [{"image": torch.rand(3, 64, 80)} for _ in range(3)]
    with pytest.raises(MemoryError, match=r"kmeans bank needs about .* GiB.*max_patches"):
        module.build_bank(torch.utils.data.DataLoader(images, batch_size=2))


def test_resuming_a_checkpoint_of_another_input_size_is_refused_naming_both():
    module = tiny_module()
    module.on_load_checkpoint({"hyper_parameters": {"input_size": [64, 80]}})  # its own: fine
    with pytest.raises(ValueError, match=r"trained at input size \[48, 96\].*model is \[64, 80\].*"
                                         r"data.image_size=\[48, 96\]"):  # fmt: skip
        module.on_load_checkpoint({"hyper_parameters": {"input_size": [48, 96]}})


def test_the_config_is_the_one_home_of_every_model_setting():
    """Each key of conf/model/cfa.yaml goes to exactly one constructor (the loss, the pure model
    or the recipe), and none of them has a default for it: a model built in Python is the one
    the command line builds."""
    config = model_config("model.input_size=[64,80]")  # the shipped values
    random_backbone = ("backbone=resnet18", "backbone.name=resnet18", "backbone.pretrained=false")
    config["backbone"] = model_config("model.input_size=[64,80]", *random_backbone)["backbone"]
    taken = [*settings_of(CFALoss), *settings_of(CFA), *settings_of(CFALitModule)]
    assert len(taken) == len(set(taken)), "a key taken by two constructors"
    # every key of the config has a constructor; untrained_epoch is train.py's validate_untrained
    assert set(config) == set(CFALitModule.config_keys()) - {"untrained_epoch"}
    constructors = (CFALoss, CFA, CFA.from_config, CFALitModule, CFALitModule.from_config)
    for constructor in constructors:
        for name, parameter in inspect.signature(constructor).parameters.items():
            if name in config:
                assert parameter.default is inspect.Parameter.empty, (
                    f"{constructor.__qualname__}({name}={parameter.default!r}): a default beside "
                    f"conf/model/cfa.yaml's {name}: {config[name]!r}"
                )
    module = CFALitModule.from_config(**config)  # each value where the config puts it
    assert (module.model.K, module.model.loss_fn.alpha) == (config["K"], config["alpha"])
    assert module.model.bank.construction == config["bank"]["construction"]
    assert {k: module.hparams[k] for k in config} == config  # all saved for the checkpoint


def test_the_backbone_and_bank_groups_are_the_one_home_of_their_settings():
    """Backbone, MemoryBank and the bank constructions take every key of their config groups
    (conf/backbone/*.yaml, conf/model/bank/*.yaml; gamma_c and the seed from the model's) and
    have no default for any: a bank or backbone built in Python is the one the config builds."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from cfa_lightning.config import CONFIG_DIR
    from cfa_lightning.models.backbone import Backbone
    from cfa_lightning.models.memory_bank import Construction, MemoryBank

    groups = {
        Backbone: Path(CONFIG_DIR).glob("backbone/*.yaml"),
        MemoryBank: Path(CONFIG_DIR).glob("model/bank/*.yaml"),
    }
    for cls, paths in groups.items():
        paths = sorted(paths)
        assert paths, cls
        keys = {k for path in paths for k in OmegaConf.load(path) if k != "_target_"}
        if cls is MemoryBank:
            keys |= {"gamma_c", "seed"}  # model.gamma_c and model.kmeans_seed
        parameters = inspect.signature(cls).parameters
        assert keys <= parameters.keys(), (cls.__name__, keys - parameters.keys())
        defaults = {k: parameters[k].default for k in keys}
        assert all(d is inspect.Parameter.empty for d in defaults.values()), (cls, defaults)
    construction = inspect.signature(Construction).parameters.values()
    assert all(
        p.default is inspect.Parameter.empty for p in construction if p.kind == p.KEYWORD_ONLY
    )
