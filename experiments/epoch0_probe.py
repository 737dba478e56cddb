"""Test a bank with the un-adapted phi (no training): what a bank construction gives before CFA
adapts anything. A coreset bank of every patch (``--size 1.0``) is an exact kNN over all training
patches of phi's initial output, the closest this project has to PatchCore on its own taps.

    python experiments/epoch0_probe.py --category cookies --bank coreset --size 1.0

PatchCore's differences can be probed here (issue 27):
- The taps' scale: ``-- model.tap_norm=true`` (each tap scaled to mean patch norm 1), or
  ``--scale X``, which multiplies every tap by X: their ratios stay, the distances' absolute
  size (and with it the softmin of the patch score, docs/method.md section 5) changes.
  The taps themselves are a Hydra override: ``-- backbone.out_indices=[2,3]``.
- ``--image-scores``: a second pass over the test set that also prints the image AUROC of two
  other image scores: the largest un-blurred patch score, and PatchCore's re-weighting of it
  (Roth et al. 2022, eq. 7: the score times 1 - softmax over its distances to the nearest
  centre's ``--support`` nearest centres, taken at the nearest centre).
- ``--distances B``: quartiles of the squared distance to the 1st, K-th, (K+1)-th and (K+J)-th
  nearest centre over the patches of B bank batches: the scale that alpha and r act on.
- The probes in experiments/results/bank/ before ``model.K`` defaulted to 1 ran at K = 3: add
  ``-- model.K=3`` to repeat them.
- ``--identity-phi``: phi's 1x1 convolution set to the identity on the taps (coordinates and bias
  dropped), so that the bank and the search see the raw pooled taps, as PatchCore does, instead
  of their random projection by the untrained phi.

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
from torch import Tensor
from torchmetrics.classification import BinaryAUROC

from cfa_lightning.config import CONFIG_DIR
from cfa_lightning.models.distances import squared_distances
from cfa_lightning.models.maps import patch_scores, score_maps


@torch.no_grad()
def image_score_aurocs(cfa, loader, support: int) -> dict[str, float]:
    """Image AUROC of the blurred map's max (the model's score), the largest raw patch score,
    and PatchCore's re-weighted largest patch score."""
    centres = cfa.bank.centres
    aurocs = {name: BinaryAUROC() for name in ("blurred max", "raw max", "re-weighted raw max")}
    for batch in loader:
        images, labels = batch["image"], batch["label"].long()
        desc = cfa.describe(images)  # (B, D', h, w)
        b, _, h, w = desc.shape
        p = cfa.flatten_patches(desc)
        nearest_sq, idx = cfa.nearest(p, cfa.K)
        out = score_maps(nearest_sq, (b, h, w), images.shape[-2:], cfa.blur)
        raw = patch_scores(nearest_sq).view(b, -1)  # (B, h * w)
        top = raw.argmax(dim=1)  # the most anomalous patch of each image
        rows = top + torch.arange(b) * raw.shape[1]
        best = p[rows]  # (B, D')
        nn = idx[rows, 0]  # its nearest centre
        # The nearest centre's `support` nearest centres (itself first), then the patch's
        # distances to them: weight = 1 - softmax(distances)[nearest centre].
        near = squared_distances(centres[nn], centres).topk(support, dim=1, largest=False).indices
        dist = (best.unsqueeze(1) - centres[near]).norm(dim=2)  # (B, support)
        weight = 1 - torch.softmax(dist, dim=1)[:, 0]
        scores = {"blurred max": out.image_scores, "raw max": raw.amax(dim=1),
                  "re-weighted raw max": weight * raw.amax(dim=1)}  # fmt: skip
        for name, metric in aurocs.items():
            metric.update(scores[name], labels)
    return {name: float(metric.compute()) for name, metric in aurocs.items()}


@torch.no_grad()
def distance_quantiles(cfa, loader, batches: int) -> dict[int, Tensor]:
    """Quartiles of the squared distance to the k-th nearest centre, k = 1, K, K + 1, K + J, over
    the patches of the first `batches` bank batches: the scale that the loss's margin alpha
    and radius r act on (docs/method.md, section 4)."""
    ranks = sorted({1, cfa.K, cfa.K + cfa.J} | ({cfa.K + 1} if cfa.J else set()))
    found = []
    for i, batch in enumerate(loader):
        if i == batches:
            break
        found.append(cfa.nearest(cfa.flatten_patches(cfa.describe(batch["image"])), ranks[-1])[0])
    d = torch.cat(found)
    q = torch.tensor([0.25, 0.5, 0.75])
    return {k: torch.quantile(d[:, k - 1], q) for k in ranks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", required=True)
    parser.add_argument("--bank", default="positional", choices=["positional", "kmeans", "coreset"])
    parser.add_argument("--size", default=None, help="model.bank.size (int or fraction)")
    parser.add_argument("--experiment", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=float, default=None, help="multiply every tap by this")
    parser.add_argument("--image-scores", action="store_true", help="compare image scores")
    parser.add_argument("--identity-phi", action="store_true", help="phi = the raw taps")
    parser.add_argument("--support", type=int, default=9, help="PatchCore's re-weighting support")
    parser.add_argument(
        "--distances",
        type=int,
        default=0,
        metavar="B",
        help="print distance quartiles over the first B bank batches",
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = parser.parse_args(argv)
    if args.scale is not None and "model.tap_norm=true" in args.overrides:
        parser.error("--scale and model.tap_norm=true: tap_norm would undo the scale; give one")
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
    backbone = model.model.backbone
    if args.identity_phi:
        conv = model.model.descriptor.coord_conv  # (D', D + 2, 1, 1); D' = D at gamma_d = 1
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, : conv.out_channels, 0, 0] = torch.eye(conv.out_channels)
            conv.bias.zero_()
    if args.scale is not None:

        def rescale(module, inputs, taps: list[Tensor]) -> list[Tensor]:
            return [t * args.scale for t in taps]

        backbone.register_forward_hook(rescale)
    start = time.perf_counter()
    model.build_bank(datamodule.bank_dataloader())
    build = time.perf_counter() - start
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False)  # fmt: skip
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = [
        model.test_results[f"test/{k}"] for k in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
    ]
    print(f"{args.category} epoch 0, bank {args.bank} size {args.size}, taps "
          f"{list(cfg.backbone.out_indices)}{', tap_norm' if cfg.model.tap_norm else ''}"
          f"{f', x{args.scale:g}' if args.scale is not None else ''}"
          f"{', identity phi' if args.identity_phi else ''}: "
          f"{model.model.bank.n_centres} centres built in {build:.1f} s; image AUROC / pixel AUROC "
          f"/ AUPRO {' / '.join(f'{m:.3f}' for m in metrics)}")  # fmt: skip
    if args.distances:
        quartiles = distance_quantiles(model.model.eval(), datamodule.bank_dataloader(),
                                       args.distances)  # fmt: skip
        print("squared distance to the k-th nearest centre, quartiles over bank patches: "
              + "; ".join(f"k={k} " + " / ".join(f"{v:.4g}" for v in q.tolist())
                          for k, q in quartiles.items()))  # fmt: skip
    if args.image_scores:
        aurocs = image_score_aurocs(model.model.eval(), datamodule.test_dataloader(), args.support)
        print("image AUROC by image score: "
              + ", ".join(f"{name} {value:.3f}" for name, value in aurocs.items()))  # fmt: skip


if __name__ == "__main__":
    main()
