"""Test a bank with the un-adapted phi (no training): what a bank construction gives before CFA
adapts anything. A coreset bank of every patch (``--size 1.0``) is an exact kNN over all training
patches of phi's initial output, the closest this project has to PatchCore on its own taps.

    python experiments/epoch0_probe.py --category cookies --bank coreset --size 1.0

Prints the test metrics (development figures: never use them to choose anything but a
project-wide default, and say so). Uses the composed training config (`+experiment=...`,
``data=shared``), so any other override can follow ``--``.
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from cfa_lightning.config import CONFIG_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", required=True)
    parser.add_argument("--bank", default="positional", choices=["positional", "kmeans", "coreset"])
    parser.add_argument("--size", default=None, help="model.bank.size (int or fraction)")
    parser.add_argument("--experiment", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"+experiment={args.experiment}", "data=shared", f"data.category={args.category}",
                 f"model/bank={args.bank}", "logger=none", "callbacks=none", "data.image_size=256",
                 *([f"model.bank.size={args.size}"] if args.size else []), *args.overrides]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
    pl.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model)
    start = time.perf_counter()
    model.build_bank(datamodule.bank_dataloader())
    build = time.perf_counter() - start
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False)  # fmt: skip
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = [
        model.test_results[f"test/{k}"] for k in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
    ]
    print(f"{args.category} epoch 0, bank {args.bank} size {args.size}: "
          f"{model.model.bank.n_centres} centres built in {build:.1f} s; image AUROC / pixel AUROC "
          f"/ AUPRO {' / '.join(f'{m:.3f}' for m in metrics)}")  # fmt: skip


if __name__ == "__main__":
    main()
