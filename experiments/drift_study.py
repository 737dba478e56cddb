"""Per-epoch validation and development-test curves of one CFA training (the drift study).

One run trains with the project's own config (lite0 real weights, ``data=shared``, 256 px,
synthetic validation anomalies on a 10% split of train/good) for ``--epochs`` epochs and writes
one JSON under ``experiments/results/drift/``: for every epoch, including epoch 0 (the
un-adapted phi, right after the memory bank is built), the validation metrics the module logs
and the test metrics of the same weights.

The test curves are DEVELOPMENT DATA: they are measured on the test sets of ``../shared/data``
only, to study over-adaptation and to choose the defaults (patience, schedule). They are never
used by the training itself, and no epoch of a reported model is chosen from them.

    OMP_NUM_THREADS=1 nice -n 10 python experiments/drift_study.py --category cookies --seed 0
    python experiments/drift_study.py --category metal_plate --seed 1 --variant cosine
    python experiments/drift_study.py --category magnetic_tile --seed 0 --test-every 4 \
        --epochs 15

Variants: ``base`` (the default training: AdamW lr 1e-3, constant), ``cosine``
(``model.lr_schedule=cosine``), ``lr1e-4`` (``model.lr=1e-4``), ``ema`` (Lightning's
``EMAWeightAveraging`` of phi, half-life ``--ema-epochs`` epochs; validation and test see the
average), ``refit`` (all of train/good, no validation: the test curve of the refit model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch.utils.data import DataLoader, Subset

from cfa_lightning.config import CONFIG_DIR, register_resolvers
from cfa_lightning.export import git_revision
from cfa_lightning.metrics import AnomalyMetrics
from cfa_lightning.train import fix_input_size

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CFA_SHARED_DATA", ROOT.parent / "shared" / "data"))
VARIANTS = {
    "base": [],
    "cosine": ["model.lr_schedule=cosine"],
    "lr1e-4": ["model.lr=1e-4"],
    "ema": [],
    "refit": ["data.val_fraction=0", "data.val_anomalies=none"],
}
KEYS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")


class PhiEMA(EMAWeightAveraging):
    """Lightning's EMA of the weights, for a model whose buffers (the bank) appear in on_fit_start.

    The averaged copy is made in ``setup``, before CFA builds its memory bank; it is re-synced
    with the module once the bank exists, so validation and test (which swap the averaged
    weights in) see the real bank. Buffers are not averaged (``use_buffers=False``): the bank
    is frozen, and the calibration is refitted at every validation.
    """

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None and self._latest_update_step == 0:
            self._average_model.module.load_state_dict(pl_module.state_dict())

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)


PATIENCES = (1, 2, 3, 5, 8, 10, 15)
PLOT_EPOCHS = (0, 1, 2, 3, 5, 8, 12, 17, 23, 30)


def early_stop_epoch(values: list[float], patience: int, mode: str = "max") -> tuple[int, int]:
    """(chosen epoch, stop epoch) of EarlyStopping(patience) + best checkpoint on a curve.

    ``values[e]`` is the validation metric after e epochs (e = 0: before training). Like
    Lightning's EarlyStopping (min_delta 0): a value counts as better only when strictly better;
    training stops after ``patience`` validations without improvement.
    """
    sign = 1.0 if mode == "max" else -1.0
    best, wait = 0, 0
    for epoch in range(1, len(values)):
        if sign * values[epoch] > sign * values[best]:
            best, wait = epoch, 0
        else:
            wait += 1
            if wait >= patience:
                return best, epoch
    return best, len(values) - 1


class DriftRecorder(pl.Callback):
    """Per epoch: the logged validation metrics and phi's weights as validation saw them.

    The test metrics are computed at the end of the fit, only for the epochs the study needs
    (the epoch EarlyStopping would choose for every patience in PATIENCES, the best validated
    and the last epoch, and PLOT_EPOCHS), from the stored weights: the trainable parameters are
    a few tens of thousands of numbers, the bank is frozen, so an epoch's model is exact.
    ``test_epochs`` (refit, no validation) gives them instead.
    """

    def __init__(
        self,
        test_loader: DataLoader,
        refit: bool,
        monitor: str,
        test_epochs: list[int] | None,
        plot_epochs: tuple[int, ...] = PLOT_EPOCHS,
        val_loader: DataLoader | None = None,
    ) -> None:
        self.plot_epochs = tuple(plot_epochs)
        self.val_loader = val_loader  # --val-by-family: each family's validation metrics
        self.test_loader = test_loader
        self.refit = refit
        self.monitor = monitor
        self.test_epochs = test_epochs
        self.rows: list[dict[str, Any]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self._epoch_start = time.perf_counter()

    @torch.no_grad()
    def _val_by_family(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Validation metrics of each synthetic defect family alone: the normal validation images
        with that family's defective copies. Tells which families' curves follow the test's."""
        scores, labels, maps, masks, kinds = [], [], [], [], []
        was_training = pl_module.training
        pl_module.eval()
        for batch in self.val_loader:
            out = pl_module.model(batch["image"].to(pl_module.device))
            scores.append(out.image_scores.cpu())
            labels.append(batch["label"])
            maps.append(out.maps.cpu())
            masks.append(batch["mask"][:, 0])
            kinds += list(batch["defect_type"])
        pl_module.train(was_training)
        scores, labels = torch.cat(scores), torch.cat(labels)
        maps, masks = torch.cat(maps), torch.cat(masks)
        normal = labels == 0
        families = sorted({k for k, lab in zip(kinds, labels.tolist(), strict=True) if lab})
        groups = {family: {family} for family in families}
        groups["all"] = set(families)  # and every family but one: which one moves the choice
        groups |= {f"all_but_{f.removeprefix('synthetic_')}": set(families) - {f} for f in families}
        result = {}
        for family, members in groups.items():
            keep = normal | torch.tensor([k in members for k in kinds])
            metrics = AnomalyMetrics(pixel=True)
            metrics.update(scores[keep], labels[keep], maps[keep], masks[keep])
            for key, value in metrics.compute().items():
                if key in KEYS:
                    result[f"val_family/{family}/{key}"] = float(value)
        return result

    @torch.no_grad()
    def _test(self, pl_module: pl.LightningModule) -> dict[str, float]:
        start = time.perf_counter()
        metrics = AnomalyMetrics(pixel=True)
        was_training = pl_module.training
        pl_module.eval()
        for batch in self.test_loader:
            out = pl_module.model(batch["image"].to(pl_module.device))
            metrics.update(out.image_scores, batch["label"], out.maps, batch["mask"][:, 0])
        pl_module.train(was_training)
        result = {f"test/{k}": float(v) for k, v in metrics.compute().items() if k in KEYS}
        result["time/test_s"] = round(time.perf_counter() - start, 2)
        return result

    @staticmethod
    def _trainable(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        wall = time.perf_counter() - self._epoch_start
        row: dict[str, Any] = {"epoch": epoch, "time/epoch_wall_s": round(wall, 2)}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("val/", "train/", "time/")):
                row[key] = float(value)
        row["lr"] = (
            float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None
        )
        # the EMA callback swaps the averaged weights in for validation and back at its end:
        # store the weights validation saw
        ema = next((c for c in trainer.callbacks if isinstance(c, PhiEMA)), None)
        swapped = ema is not None and ema._average_model is not None
        if swapped:
            ema._swap_models(pl_module)
        self.weights.append(self._trainable(pl_module))
        if swapped:
            ema._swap_models(pl_module)
        self.rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k in ("epoch", "time/epoch_wall_s", self.monitor)}), flush=True)  # fmt: skip
        self._epoch_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the sanity check (all validation batches) is epoch 0: the un-adapted phi
        epoch = 0 if trainer.sanity_checking else trainer.current_epoch + 1
        self._record(trainer, pl_module, epoch)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.refit:  # no validation: epoch 0 is recorded here
            self._record(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.refit:
            self._record(trainer, pl_module, trainer.current_epoch + 1)

    def needed_epochs(self) -> list[int]:
        last = len(self.rows) - 1
        if self.refit and self.test_epochs is None:
            return list(range(last + 1))
        if self.test_epochs is not None:
            return sorted({e for e in self.test_epochs if e <= last} | {0, last})
        values = [row[self.monitor] for row in self.rows]
        needed = {e for e in self.plot_epochs if e <= last} | {last}
        needed |= {early_stop_epoch(values, p)[0] for p in PATIENCES}
        return sorted(needed)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        current = self._trainable(pl_module)
        for epoch in self.needed_epochs():
            pl_module.load_state_dict(self.weights[epoch], strict=False)
            self.rows[epoch].update(self._test(pl_module))
            if self.val_loader is not None:
                self.rows[epoch].update(self._val_by_family(pl_module))
            print(json.dumps({"epoch": epoch, **{k: round(v, 4) for k, v in self.rows[epoch].items()
                              if k.startswith("test/")}}), flush=True)  # fmt: skip
        pl_module.load_state_dict(current, strict=False)


def compose_config(args: argparse.Namespace, out_dir: str) -> Any:
    register_resolvers()
    overrides = [
        "+experiment=efficientnet_lite0",
        "data=shared",
        f"data.root={SHARED}",
        f"data.category={args.category}",
        "data.val_anomalies=synthetic",
        # cookies: 4 of 21; kolektorsdd as data=shared runs it (its default 0.2)
        f"data.val_fraction={0.2 if args.category in ('cookies', 'kolektorsdd') else 0.1}",
        "data.num_workers=0",
        "data.cache_images=true",
        f"seed={args.seed}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.default_root_dir={out_dir}",
        *VARIANTS[args.variant],
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return cfg, overrides


def load_runs(folder: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The run JSONs of a folder, grouped by (category, variant + tag), sorted by seed."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        tag = path.stem.removeprefix(f"{run['category']}_").rsplit("_seed", 1)[0]
        groups.setdefault((run["category"], tag), []).append(run)
    for runs in groups.values():
        runs.sort(key=lambda r: r["seed"])
    return groups


def _cell(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return f"{float(t.mean()):.3f} ± {std:.3f}"


def report(folder: Path, monitor: str) -> str:
    """Markdown tables: EarlyStopping simulated on each validation curve, against the last epoch."""
    lines = [
        "Test metrics are DEVELOPMENT DATA (../shared/data test sets); the epoch is chosen on "
        f"validation ({monitor}, synthetic anomalies) only. mean ± std over seeds.",
        "",
    ]
    head = "| category | variant | rule | seeds | image AUROC | pixel AUROC | AUPRO | AUPRO - last (paired) | chosen epoch | epochs trained | epoch 0 chosen |"
    groups = load_runs(folder)
    for (category, variant), runs in sorted(groups.items()):
        if variant.startswith("refit"):
            continue
        caps = sorted({run["epochs"] for run in runs})
        lines += [f"{category}, {variant}: capped at {'/'.join(map(str, caps))} epochs", ""]
        lines += [head, "|" + "---|" * 11]
        rules: list[tuple[str, Any]] = [(f"patience {p}", p) for p in PATIENCES]
        rules += [("best val of all", 10**6), ("last epoch", None)]
        for name, patience in rules:
            picked, trained = [], []
            for run in runs:
                values = [row[monitor] for row in run["curve"]]
                if patience is None:
                    chosen, stop = len(values) - 1, len(values) - 1
                else:
                    chosen, stop = early_stop_epoch(values, patience)
                picked.append(run["curve"][chosen])
                trained.append(stop)
            cells = [_cell([row[f"test/{k}"] for row in picked]) for k in KEYS]
            last = [run["curve"][-1]["test/pixel_AUPRO"] for run in runs]
            cells.append(
                _cell([row["test/pixel_AUPRO"] - b for row, b in zip(picked, last, strict=True)])
            )
            epochs = ", ".join(str(row["epoch"]) for row in picked)
            zero = sum(row["epoch"] == 0 for row in picked)
            lines.append(
                f"| {category} | {variant} | {name} | {len(runs)} | {' | '.join(cells)} | {epochs} "
                f"| {', '.join(map(str, trained))} | {zero}/{len(runs)} |"
            )
        lines.append("")
    lines += refit_report(groups, monitor)
    return "\n".join(lines)


UNTRAINED_MARGIN = 0.015  # the candidate of results/drift/README.md: a prior against adaptation
FAMILY_RULES = {  # rule -> (the pixel AUPRO curve that EarlyStopping(3) watches, margin)
    "as the run validates (every 2nd pixel; the default)": ("val/pixel_AUPRO", 0.0),
    "all pixels, five families (crack left out)": ("val_family/all_but_crack/pixel_AUPRO", 0.0),
    "all pixels, six families": ("val_family/all/pixel_AUPRO", 0.0),
    "crack alone": ("val_family/synthetic_crack/pixel_AUPRO", 0.0),
    "mean of the six families' own": ("mean", 0.0),
    f"as the run validates, adapted only {UNTRAINED_MARGIN} above epoch 0": (
        "val/pixel_AUPRO",
        UNTRAINED_MARGIN,
    ),
}


def family_value(row: dict[str, Any], key: str) -> float:
    """A FAMILY_RULES curve's value at one epoch (``mean``: of each family's own AUPRO)."""
    if key != "mean":
        return row.get(key, float("nan"))
    own = [v for k, v in row.items() if k.startswith("val_family/synthetic_") and "AUPRO" in k]
    return sum(own) / len(own) if own else float("nan")


def chosen_with_margin(values: list[float], patience: int, margin: float) -> int:
    """The epoch early_stop_epoch chooses, or epoch 0 unless that one validates at least
    ``margin`` above epoch 0."""
    best = early_stop_epoch(values, patience)[0]
    return best if values[best] >= values[0] + margin else 0


def family_report(folder: Path, patience: int = 3) -> str:
    """Runs made with ``--val-by-family``: the epoch that EarlyStopping(patience) and the best
    checkpoint would choose on each validation curve of FAMILY_RULES, and its test metrics."""
    lines = [
        f"EarlyStopping(patience {patience}) simulated on each validation curve; test metrics "
        "are DEVELOPMENT DATA. mean ± std over seeds; epochs per seed.",
        "",
        "| category | validation curve | seeds | image AUROC | pixel AUROC | AUPRO | chosen epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for (category, tag), runs in sorted(load_runs(folder).items()):
        runs = [r for r in runs if any(k.startswith("val_family/") for k in r["curve"][0])]
        label = category if tag == "base" else f"{category} ({tag})"
        for name, (key, margin) in FAMILY_RULES.items() if runs else []:
            picked = []
            for run in runs:
                values = [family_value(row, key) for row in run["curve"]]
                picked.append(run["curve"][chosen_with_margin(values, patience, margin)])
            cells = [_cell([row[f"test/{k}"] for row in picked]) for k in KEYS]
            epochs = ", ".join(str(row["epoch"]) for row in picked)
            lines.append(f"| {label} | {name} | {len(runs)} | {' | '.join(cells)} | {epochs} |")
    return "\n".join(lines)


def refit_report(groups: dict, monitor: str, patience: int = 3) -> list[str]:
    """Refit against no refit, paired by seed: the epoch EarlyStopping(patience) chooses on the
    base run's validation curve, tested after the base run's fit (the split's bank and
    training) and after the refit run's fit of that many epochs on all of train/good."""
    lines = [f"Refit (patience {patience}): the chosen epoch retrained on all of train/good", "",
             "| category | seeds | chosen epochs | no refit | refit | AUPRO refit - no refit (paired) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for (category, variant), refits in sorted(groups.items()):
        if variant != "refit":
            continue
        base = {run["seed"]: run for run in groups.get((category, "base"), [])}
        pairs = []
        for refit in refits:
            if refit["seed"] not in base:
                continue
            values = [row[monitor] for row in base[refit["seed"]]["curve"]]
            chosen = early_stop_epoch(values, patience)[0]
            rows = {row["epoch"]: row for row in refit["curve"]}
            if "test/pixel_AUPRO" in rows.get(chosen, {}):
                pairs.append((chosen, base[refit["seed"]]["curve"][chosen], rows[chosen]))
        if not pairs:
            continue

        def triple(rows: list[dict]) -> str:
            return " / ".join(f"{float(torch.tensor([r[f'test/{k}'] for r in rows]).mean()):.3f}"
                              for k in KEYS)  # fmt: skip

        diff = _cell([r["test/pixel_AUPRO"] - b["test/pixel_AUPRO"] for _, b, r in pairs])
        lines.append(
            f"| {category} | {len(pairs)} | {', '.join(str(e) for e, _, _ in pairs)} "
            f"| {triple([b for _, b, _ in pairs])} | {triple([r for _, _, r in pairs])} | {diff} |"
        )
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--category", choices=["cookies", "metal_plate", "magnetic_tile", "kolektorsdd"]
    )
    parser.add_argument(
        "--val-by-family",
        action="store_true",
        help="also each synthetic family's validation metrics at tested epochs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="base")
    parser.add_argument("--ema-epochs", type=float, default=3.0, help="EMA half-life in epochs")
    parser.add_argument("--test-every", type=int, default=1,
                        help="per-epoch test on every k-th test image (a fixed subset; 1: all)")  # fmt: skip
    parser.add_argument("--limit-train-batches", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--monitor", default="val/pixel_AUPRO")
    parser.add_argument("--plot-epochs", type=int, nargs="+", default=list(PLOT_EPOCHS),
                        help="epochs tested for the figure, besides those the patiences choose")  # fmt: skip
    parser.add_argument("--test-epochs", type=int, nargs="+", default=None,
                        help="refit: the epochs to test (default: every epoch)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "drift")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    parser.add_argument("--report", action="store_true", help="print the tables of --out")
    parser.add_argument(
        "--family-report",
        action="store_true",
        help="print the rule table of the --val-by-family runs in --out",
    )
    args = parser.parse_args(argv)
    if args.family_report:
        print(family_report(args.out))
        return
    if args.report:
        print(report(args.out, args.monitor))
        return

    revision = git_revision()  # the code this run imports, even if the checkout moves meanwhile
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="drift_") as tmp:
        cfg, overrides = compose_config(args, tmp)
        pl.seed_everything(cfg.seed, workers=True)  # as train.py: phi's init and the bank
        datamodule = instantiate(cfg.data)
        fix_input_size(cfg, datamodule)  # data.image_size=auto: measured as train.py does
        model = instantiate(cfg.model)
        datamodule.setup("fit")
        test_set = datamodule.test_set
        indices = list(range(0, len(test_set), args.test_every))
        test_loader = DataLoader(Subset(test_set, indices), batch_size=cfg.data.eval_batch_size)
        refit = args.variant == "refit"
        val_loader = None
        if args.val_by_family:
            val_loader = DataLoader(datamodule.val_set, batch_size=cfg.data.eval_batch_size)
        recorder = DriftRecorder(
            test_loader, refit, args.monitor, args.test_epochs, args.plot_epochs, val_loader
        )
        callbacks: list[pl.Callback] = [recorder]
        steps = math.ceil(len(datamodule.train_set) / cfg.data.batch_size)
        if args.limit_train_batches is not None:
            steps = max(1, math.ceil(steps * args.limit_train_batches))
        decay = None
        if args.variant == "ema":  # half-life of --ema-epochs epochs, in optimiser steps
            decay = 0.5 ** (1.0 / (args.ema_epochs * steps))
            callbacks.insert(0, PhiEMA(decay=decay, use_buffers=False))
        trainer_kwargs = (
            {"limit_train_batches": args.limit_train_batches} if args.limit_train_batches else {}
        )
        trainer = instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0 if refit else -1,  # the full validation set, before training
            **trainer_kwargs,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        total = time.perf_counter() - start
    name = f"{args.category}_{args.variant}{args.tag}_seed{args.seed}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "data": "development data (../shared/data test sets): test curves are for this study only",
        "category": args.category,
        "seed": args.seed,
        "variant": args.variant,
        "epochs": args.epochs,
        "overrides": overrides,
        "ema_decay": decay,
        "limit_train_batches": args.limit_train_batches,
        "n_train": len(datamodule.train_set),
        "n_val_items": len(datamodule.val_set) if datamodule.val_set is not None else 0,
        "n_test": len(indices),
        "n_test_total": len(test_set),
        "test_every": args.test_every,
        "tested_epochs": recorder.needed_epochs(),
        "steps_per_epoch": steps,
        "fit_wall_s": round(total, 1),
        "revision": revision,
        "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} cores (shared), "
        f"torch {torch.__version__}, {args.threads} thread(s)",
        "curve": recorder.rows,
    }
    (args.out / name).write_text(json.dumps(record, indent=1))
    print(f"written {args.out / name} ({total:.0f} s)")


if __name__ == "__main__":
    main()
