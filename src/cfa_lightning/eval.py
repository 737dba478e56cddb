"""Score a trained checkpoint on the test split: `python -m cfa_lightning.eval ckpt_path=...`.

The data scored is the data the checkpoint was trained on (its data hyper-parameters), with the
command line's ``data.*`` options on top; ``data=<group>`` on the command line, or a checkpoint
that records no data, scores ``conf/eval.yaml``'s data group instead. One log line says which.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpoint import exits_on_checkpoint_error, load_checkpoint
from .config import CONFIG_DIR, command_line_keys, job_choices
from .models.lit_module import CFALitModule
from .sizes import model_input_size
from .utils import (
    closing_loggers,
    format_table,
    instantiate_dict,
    log,
    output_dir,
    plain,
    write_metrics,
)

# The data module a checkpoint's data hyper-parameters describe, told by an argument only it takes.
DATA_MODULES = {
    "normal_dir": "cfa_lightning.data.FolderDataModule",
    "generator_seed": "cfa_lightning.data.SyntheticDataModule",
}
MVTEC_MODULE = "cfa_lightning.data.MVTecDataModule"
_ABSENT = object()


def data_module_target(trained: Mapping[str, Any]) -> str:
    """``_target_`` of the data module that saved these hyper-parameters."""
    return next((t for key, t in DATA_MODULES.items() if key in trained), MVTEC_MODULE)


def init_arguments(cls: type) -> set[str]:
    """The named arguments of a class's constructors, along its bases (``**kwargs`` passes on)."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        p.name
        for klass in cls.__mro__
        if "__init__" in vars(klass)
        for p in inspect.signature(vars(klass)["__init__"]).parameters.values()
        if p.kind in named and p.name != "self"
    }


def _where(data: DictConfig) -> str:
    return f"category {data.get('category')} under {data.get('root')}"


def data_config(cfg: DictConfig, trained: Mapping[str, Any] | None) -> tuple[DictConfig, str]:
    """The data to score and the log line that says where it comes from.

    The checkpoint's data hyper-parameters, then each ``data.*`` option of the command line
    (``~data.x`` removes one); the sizes are eval.yaml's (the checkpoint's trained input size,
    unless the command line gives one). ``data=<group>`` on the command line, or a checkpoint
    without data hyper-parameters, keeps eval.yaml's data config as composed.
    """
    given = sorted(k for k in command_line_keys(cfg) if k == "data" or k.startswith("data."))
    choice = job_choices(cfg).get("data")
    if "data" in given:
        return cfg.data, (
            f"scoring data={choice} from the command line ({_where(cfg.data)}); the data config "
            f"of {cfg.ckpt_path} is not used"
        )
    if not trained:
        return cfg.data, (
            f"{cfg.ckpt_path} records no data config (a checkpoint from an older version): "
            f"scoring eval.yaml's data={choice} ({_where(cfg.data)}); give data=... and data.* "
            "options to choose"
        )
    target = data_module_target(trained)
    known = init_arguments(get_class(target))
    dropped = sorted(k for k in trained if k not in known)
    data = OmegaConf.create(
        {"_target_": target, **{k: v for k, v in trained.items() if k in known}}
    )
    for key in ("image_size", "crop_size"):  # eval.yaml: from the checkpoint, or the command line
        data[key] = cfg.data.get(key)
    for key in given:
        path = key.removeprefix("data.")
        value = OmegaConf.select(cfg.data, path, default=_ABSENT)
        if value is _ABSENT:  # ~data.x
            parent, _, leaf = path.rpartition(".")
            node = OmegaConf.select(data, parent) if parent else data
            if isinstance(node, DictConfig):
                node.pop(leaf, None)
        else:
            OmegaConf.update(data, path, value, merge=False)
    line = f"scoring the data {cfg.ckpt_path} was trained on ({target.rsplit('.', 1)[-1]}, "
    line += f"{_where(data)})"
    if given:
        line += f", with {', '.join(given)} from the command line"
    if dropped:
        line += f"; options this version does not know were left out: {', '.join(dropped)}"
    return data, line


def evaluate(cfg: DictConfig) -> dict[str, float]:
    pl.seed_everything(cfg.seed, workers=True)
    ckpt = load_checkpoint(cfg.ckpt_path)
    model = CFALitModule.from_checkpoint_dict(ckpt, cfg.ckpt_path)
    data, source = data_config(cfg, ckpt.get("datamodule_hyper_parameters"))
    log.info(source)
    trained = list(model.model.input_size)
    asked = list(model_input_size(plain(data.image_size), plain(data.crop_size)))
    if trained != asked:
        raise ValueError(
            f"{cfg.ckpt_path} was trained at input size {trained} but data.image_size/data.crop_size "
            f"give {asked}; set them to the training values"
        )
    datamodule = instantiate(data)
    loggers = instantiate_dict(cfg.get("logger"))
    with closing_loggers(loggers):
        trainer = instantiate(cfg.trainer, logger=loggers or False)
        trainer.test(model, datamodule=datamodule)
        metrics = dict(model.test_results)
        if trainer.is_global_zero:  # every rank holds the same gathered metrics; one writes
            path = write_metrics(
                output_dir() / "metrics.json",
                metrics,
                seed=cfg.seed,
                ckpt_path=str(cfg.ckpt_path),
                backbone=model.hparams.backbone["name"],
                category=data.category,
                root=str(data.root),
                image_size=plain(data.image_size),
                crop_size=plain(data.crop_size),
                input_size=trained,
            )
            title = f"CFA test metrics ({data.category}, {cfg.ckpt_path})"
            print(format_table(metrics, title))
            log.info("metrics written to %s", path)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@exits_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
