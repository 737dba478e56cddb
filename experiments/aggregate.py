"""Collect the metrics.json files of a sweep into CSV files and a Markdown results table.

    python experiments/aggregate.py multirun/train_categories/<time> --out results/
    python experiments/aggregate.py <sweep dirs...> --readme README.md   # rewrite the README table

One table per setting (backbone, resolution, epoch cap, selection rule, gamma_c, gamma_d, initial
radius): one row per category with mean +- std over seeds (sample std, n - 1) and the epoch each
seed tested, then the mean over categories (its std is over the per-seed category means, from
the seeds every category has). The header states the protocol: resolution, epochs, seed list,
how the tested epoch was chosen (never on the test set). Values are in %.
Failed jobs (``"status": "failed"``) are listed under the table and left out of the numbers.

Writes ``runs.csv`` (one row per job), ``summary.csv`` (one row per setting and category) and
``results.md``; ``--reference`` adds the literature numbers of ``docs/method.md`` below the mean;
``--wandb-project`` also logs the summary as a W&B table (offline with WANDB_MODE=offline).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cfa_lightning.utils import METRICS_FILE, job_results  # noqa: E402

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1", "pixel_F1")
SETTING_KEYS = (
    "backbone",
    "taps",
    "resolution",
    "bank",
    "epochs",
    "selection",
    "gamma_c",
    "gamma_d",
    "radius_init",
    "loss",
)
README_START = "<!-- benchmark-table:start -->"
README_END = "<!-- benchmark-table:end -->"
# docs/method.md, "Reference numbers": MVTec AD 15-class mean, image / pixel AUROC (%).
REFERENCES = (
    ("paper, wide_resnet50_2 (CFA++, per-class max of two runs, best test epoch)", 99.5, 98.5),
    ("authors' README, resize 256 + crop 224, best test epoch", 99.3, 98.2),
    ("a popular Lightning port, wide_resnet50_2, attraction-only, 224 no crop", 95.6, 98.3),
    ("same port, resnet18, 224 no crop", 93.0, 97.9),
    ("PatchCore, wide_resnet50_2, 10% coreset, resize 256 + crop 224", 99.2, 98.1),
)


def resolution(image_size: Any, crop_size: Any) -> str:
    def fmt(size: Any) -> str:
        if isinstance(size, (list, tuple)):
            return str(size[0]) if len(set(size)) == 1 else "x".join(map(str, size))
        return str(size)

    text = f"resize {fmt(image_size)}"
    return text if crop_size in (None, "null") else f"{text} + crop {fmt(crop_size)}"


def load_runs(roots: Iterable[Path]) -> list[dict[str, Any]]:
    """Every metrics.json under the roots, flattened into one dict per job."""
    runs = []
    for root in roots:
        for job_dir, result in job_results(root, recursive=True).items():
            run = {
                "job": result.get("job", job_dir.name),
                "path": str(job_dir / METRICS_FILE),
                "status": result["status"],
                "error": result.get("error", ""),
                "category": result.get("category"),
                "seed": result.get("seed"),
                "backbone": result.get("backbone"),
                "resolution": resolution(result.get("image_size"), result.get("crop_size")),
                "epochs": result.get("max_epochs", result.get("epochs")),  # the cap
                "selection": selection_rule(result.get("selection")),
                "epoch_tested": tested_epoch(result),
                "taps": str(result.get("taps") or ""),
                "bank": bank_label(result.get("bank")),
                "gamma_c": result.get("gamma_c"),
                "gamma_d": result.get("gamma_d"),
                "radius_init": result.get("radius_init"),
                "loss": loss_label(result),
                "train_time_s": result.get("train_time_s"),
            }
            for name in METRICS:
                run[name] = result["metrics"].get(f"test/{name}")
            runs.append(run)
    return runs


def loss_label(result: dict[str, Any]) -> str:
    """K, J and alpha of a job, e.g. "K 1, J 3, alpha 0.1" ("" for a job that predates them)."""
    if "K" not in result:
        return ""
    return f"K {result['K']}, J {result.get('J')}, alpha {result.get('alpha')}"


def bank_label(bank: Any) -> str:
    """The bank construction and its size setting, e.g. "coreset 0.1" ("positional" when the
    job predates the bank group)."""
    if not isinstance(bank, dict):
        return "positional"
    construction = bank.get("construction", "positional")
    size = bank.get("size")
    return (
        construction if construction == "positional" or size is None else f"{construction} {size}"
    )


def selection_rule(selection: Any) -> str:
    """How a job chose the epoch it tested, as the table header states it."""
    if not isinstance(selection, dict) or selection.get("rule", "last") == "last":
        return "last epoch"
    return (
        f"best validated epoch ({selection.get('metric', 'val')}, {selection.get('mode', 'max')})"
    )


def tested_epoch(result: dict[str, Any]) -> Any:
    """The epoch whose model was tested: the chosen one, else the last one trained."""
    selection = result.get("selection")
    chosen = selection.get("epoch") if isinstance(selection, dict) else None
    return chosen if chosen is not None else result.get("epochs")


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (n - 1; None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def seed_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One table row from runs that differ only in their seed: mean ± std per metric, the seeds."""
    ordered = sorted(runs, key=lambda r: r["seed"])
    row: dict[str, Any] = {
        "seeds": [r["seed"] for r in ordered],
        "epochs": [r.get("epoch_tested") for r in ordered],  # the epoch each seed tested
    }
    for name in METRICS:
        values = [r[name] for r in runs if r[name] is not None]
        row[name] = mean_std(values) if values else None
    return row


def summarise(runs: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per setting: per-category mean/std over seeds, and the mean over categories."""
    ok = [r for r in runs if r["status"] == "ok"]
    by_setting: dict[tuple, list[dict]] = defaultdict(list)
    for run in ok:
        by_setting[tuple(run[k] for k in SETTING_KEYS)].append(run)
    summary = {}
    for setting, setting_runs in sorted(by_setting.items(), key=lambda kv: str(kv[0])):
        categories: dict[str, dict[str, Any]] = {}
        per_seed: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
        for run in setting_runs:
            per_seed[run["seed"]][run["category"]] = run
        names = sorted({r["category"] for r in setting_runs})
        for category in names:
            categories[category] = seed_summary(
                [r for r in setting_runs if r["category"] == category]
            )
        mean_row: dict[str, Any] = {}
        complete = sorted(s for s, cats in per_seed.items() if set(cats) == set(names))
        for name in METRICS:
            cat_means = [categories[c][name][0] for c in names if categories[c][name]]
            if len(cat_means) != len(names):
                mean_row[name] = None
                continue
            seed_means = [statistics.fmean(per_seed[s][c][name] for c in names) for s in complete]
            std = statistics.stdev(seed_means) if len(seed_means) > 1 else None
            mean_row[name] = (statistics.fmean(cat_means), std)
        mean_row["seeds"] = complete
        seeds = sorted({r["seed"] for r in setting_runs})
        summary[setting] = {"categories": categories, "mean": mean_row, "seeds": seeds}
    return summary


def _cell(value: tuple[float, float | None] | None) -> str:
    if value is None or value[0] is None or math.isnan(value[0]):
        return "-"
    mean, std = value
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def table(label: str, rows: dict[str, dict[str, Any]], bold: Sequence[str] = ()) -> list[str]:
    """The mean ± std table (values in %): one line per row of ``rows`` (``seed_summary``'s form),
    the rows named in ``bold`` set in bold. ``aggregate.py`` and ``tune_then_test.py`` print it."""
    lines = [
        f"| {label} | " + " | ".join(METRICS) + " | seeds |",
        "| --- |" + " ---: |" * len(METRICS) + " --- |",
    ]
    with_epochs = any(row.get("epochs") for row in rows.values())
    if with_epochs:
        lines[0] += " epoch tested |"
        lines[1] += " --- |"
    for name, row in rows.items():
        cells = [_cell(row[metric]) for metric in METRICS]
        if name in bold:
            name, cells = f"**{name}**", [f"**{cell}**" for cell in cells]
        line = f"| {name} | {' | '.join(cells)} | {', '.join(map(str, row['seeds']))} |"
        if with_epochs:
            line += f" {', '.join(str(e) for e in row.get('epochs') or [])} |"
        lines.append(line)
    return lines


def taps_note(taps: str) -> str:
    return f" (taps {taps})" if taps else ""


def markdown(runs: list[dict[str, Any]], summary: dict, reference: bool = False) -> str:
    lines: list[str] = []
    for setting, block in summary.items():
        info = dict(zip(SETTING_KEYS, setting, strict=True))
        n = len(block["categories"])
        mean_name = f"mean ({n} categories)" if n != 1 else "mean (1 category)"
        lines += [
            f"**{info['backbone']}**{taps_note(info['taps'])}, {info['resolution']}, bank "
            f"{info['bank']}, at most {info['epochs']} epochs, "
            f"seeds {', '.join(map(str, block['seeds']))}, tested: {info['selection']} (no "
            f"selection on the test set); gamma_c = {info['gamma_c']}, gamma_d = {info['gamma_d']}, "
            f"initial r = {info['radius_init']}{'; ' + info['loss'] if info['loss'] else ''}. "
            "Values in %, mean ± std over seeds.",
            "",
            *table("category", {**block["categories"], mean_name: block["mean"]}, [mean_name]),
        ]
        if reference:
            for source, image, pixel in REFERENCES:
                cells = {"image_AUROC": f"{image:.1f}", "pixel_AUROC": f"{pixel:.1f}"}
                row = " | ".join(cells.get(name, "") for name in METRICS)
                lines.append(f"| *reference: {source}* | {row} | |")
        lines.append("")
    keys = [
        (*(r[k] for k in SETTING_KEYS), r["category"], r["seed"])
        for r in runs
        if r["status"] == "ok"
    ]
    repeated = len(keys) - len(set(keys))
    if repeated:
        lines.append(f"Warning: {repeated} job(s) repeat a setting, category and seed of another "
                     "job; their values are averaged as if they were further seeds.\n")  # fmt: skip
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        lines.append(f"Failed jobs ({len(failed)}), left out of the table:")
        lines += [
            f"- `{r['job']}`: {' '.join((r['error'] or r['status']).split())}" for r in failed
        ]
        lines.append("")
    if not summary and not failed:
        lines.append("No metrics.json found.")
    return "\n".join(lines).rstrip() + "\n"


def write_csvs(runs: list[dict[str, Any]], summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run_fields = ["job", "status", "category", "seed", *SETTING_KEYS, "epoch_tested", *METRICS, "train_time_s",
                  "error", "path"]  # fmt: skip
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=run_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*SETTING_KEYS, "category", "seeds",
                         *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))])  # fmt: skip
        for setting, block in summary.items():
            rows = [*block["categories"].items(), ("mean", block["mean"])]
            for category, row in rows:
                values = []
                for name in METRICS:
                    mean, std = row[name] if row[name] else (None, None)
                    values += [mean, std]
                seeds = " ".join(map(str, row["seeds"]))
                writer.writerow([*setting, category, seeds, *values])


def update_readme(readme: Path, table: str, command: str) -> None:
    """Replace the text between the benchmark markers of the README."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = f"{README_START}\n<!-- generated by: {command} -->\n\n{table}\n{README_END}"
    readme.write_text(head + body + tail)


def log_wandb(summary: dict, project: str) -> None:
    import wandb

    columns = [*SETTING_KEYS, "category", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))]
    rows = []
    for setting, block in summary.items():
        for category, row in [*block["categories"].items(), ("mean", block["mean"])]:
            values = []
            for name in METRICS:
                values += list(row[name]) if row[name] else [None, None]
            rows.append([*map(str, setting), category, *values])
    run = wandb.init(project=project, job_type="aggregate", name="results-table")
    try:
        run.log({"results": wandb.Table(columns=columns, data=rows)})
    finally:
        run.finish()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="sweep folders (searched recursively)")
    parser.add_argument("--out", type=Path, help="folder for runs.csv, summary.csv, results.md")
    parser.add_argument("--readme", type=Path, help="rewrite this README's benchmark table")
    parser.add_argument("--reference", action="store_true", help="add the literature numbers")
    parser.add_argument("--wandb-project", help="also log the summary as a W&B table")
    args = parser.parse_args(argv)

    runs = load_runs(args.roots)
    summary = summarise(runs)
    table = markdown(runs, summary, reference=args.reference)
    print(table)
    if args.out:
        write_csvs(runs, summary, args.out)
        (args.out / "results.md").write_text(table)
    if args.readme:
        command = "python experiments/aggregate.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        update_readme(args.readme, table, command)
    if args.wandb_project:
        log_wandb(summary, args.wandb_project)
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
