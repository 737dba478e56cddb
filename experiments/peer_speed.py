"""Our CFA beside anomalib's, on the same random input, backbone, size and batch: img/s and peak RSS.

The driver (run it with the project's environment) alternates rounds. In each round every
(backbone, phase) runs once per side, each in a child process of its own, the sides' order
swapped from round to round so that the drift of a shared machine hits both alike:

- ours: `--child ours`, run by the driver's Python. The model is the LightningModule that the
  project's default configuration composes (`conf/train.yaml`, so `conf/model/cfa.yaml` with its
  bank and taps settings), with only the backbone's name, random weights and the image size
  overridden. `--ours-overrides` adds another configuration of ours (Hydra overrides, such as
  `model/bank=positional`), timed in the same rounds and set beside the same peer. Training = `CFA.loss` + backward + the module's own optimiser step; inference =
  the pure model's maps under inference mode.
- peer: `--child peer`, run by `.venv-peer/bin/python` (anomalib 2.7.0 needs `lightning`, which
  the project's environment never holds: `make peer-env`). anomalib's `Cfa` with its own defaults
  provides `CfaModel`, `CfaLoss`, its optimiser and its backward (`retain_graph=True`).
  Training = `CfaLoss(CfaModel(x))` + backward + step; inference = `CfaModel` in eval mode
  producing anomaly maps. anomalib's feature extractor always loads torchvision's ImageNet
  weights from the network; the child swaps in the same torchvision network and taps with
  random weights (weights do not change speed), nothing else.

Both sides build their memory bank from the same `--bank-images` random images, untimed. Each
child times one warm-up step and then `--steps` steps: img/s = batch / median step time. Peak
memory is the child process's peak RSS (imports, model, bank and steps: the same for both sides).
anomalib's CFA cannot take tf_efficientnet_lite0 (docs/speed.md says why): the backbones of
`--ours-only-backbones` are timed for ours alone.

    make peer-env && make peer-bench        # = python experiments/peer_speed.py (defaults below)
    python experiments/peer_speed.py --size 64 --batch 2 --rounds 1 --steps 2 --threads 1
    python experiments/peer_speed.py --backbones resnet18 --ours-overrides model/bank=positional
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = os.environ.get("CFA_PEER_PYTHON", str(ROOT / ".venv-peer" / "bin" / "python"))
PEER_INSTALL = (
    "python3 -m venv .venv-peer && .venv-peer/bin/python -m pip install torch==2.14.1 "
    "torchvision==0.29.1 anomalib==2.7.0"
)
PHASES = ("train", "infer")
SIDES = ("ours", "peer")
# The heavy imports of each side's child, made before its model is built.
IMPORTS = {"ours": ["hydra", "cfa_lightning.models.lit_module"],
           "peer": ["anomalib.models.image.cfa.lightning_model"]}  # fmt: skip


# ---- one child: one side, one backbone, one phase -----------------------------------------------


def random_images(n: int, size: int, seed: int):
    import torch

    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step``, after one untimed warm-up call."""
    step()  # allocator, kernels, caches
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return seconds


def ours_side(args: argparse.Namespace, images, bank_images) -> tuple[dict, object, object]:
    """Our model as the default config composes it; returns (settings, train step, infer step)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from cfa_lightning.config import CONFIG_DIR

    overrides = [f"backbone.name={args.backbone}", "backbone.pretrained=false",
                 f"data.image_size={args.size}", "data.crop_size=null", *args.overrides]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    module = instantiate(cfg.model)  # CFALitModule
    loader = DataLoader([{"image": image} for image in bank_images], batch_size=args.batch)
    module.build_bank(loader)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    model = module.model.train(args.phase == "train")

    def train() -> None:
        loss, _ = model.loss(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode():
            model(images).maps.sum().item()

    keys = ("K", "J", "gamma_c", "gamma_d", "tap_norm")
    settings = {k: cfg.model[k] for k in keys if k in cfg.model}
    settings["bank"] = cfg.model.get("bank", {}).get("construction", "positional")
    settings["centres"] = module.model.bank.n_centres
    settings["taps"] = list(cfg.backbone.out_indices)
    return settings, train, infer


def random_weights_in_anomalib() -> None:
    """anomalib 2.7.0's CFA has no option for random weights: its `get_feature_extractor` always
    loads torchvision's DEFAULT (ImageNet) weights from the network. Swap in the same torchvision
    network and taps with random weights; nothing else of anomalib changes."""
    import torchvision
    from anomalib.models.image.cfa import torch_model
    from torchvision.models.feature_extraction import create_feature_extractor

    def random_extractor(backbone: str, return_nodes: list[str]):
        net = getattr(torchvision.models, backbone)(weights=None)
        return create_feature_extractor(net, return_nodes=return_nodes).eval()

    torch_model.get_feature_extractor = random_extractor


def peer_side(args: argparse.Namespace, images, bank_images) -> tuple[dict, object, object]:
    """anomalib's CfaModel and CfaLoss, from its `Cfa` with its defaults; random weights."""
    from types import SimpleNamespace

    import anomalib
    import torch
    from anomalib.models.image.cfa import torch_model
    from anomalib.models.image.cfa.lightning_model import Cfa
    from torch.utils.data import DataLoader

    random_weights_in_anomalib()
    cfa = Cfa(backbone=args.backbone, pre_processor=False, post_processor=False,
              evaluator=False, visualizer=False)  # fmt: skip
    model, loss_fn = cfa.model, cfa.loss  # CfaModel, CfaLoss
    loader = DataLoader(list(bank_images), batch_size=args.batch,
                        collate_fn=lambda batch: SimpleNamespace(image=torch.stack(batch)))  # fmt: skip
    model.initialize_centroid(loader)
    optimizer = cfa.configure_optimizers()
    model.train(args.phase == "train")

    def train() -> None:
        loss = loss_fn(model(images))  # model(images): the (B, h*w, M) distances in training
        optimizer.zero_grad(set_to_none=True)
        cfa.backward(loss)  # anomalib's: loss.backward(retain_graph=True)
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode():
            model(images).anomaly_map.sum().item()

    settings = {"K": loss_fn.num_nearest_neighbors, "J": loss_fn.num_hard_negative_features,
                "gamma_c": model.gamma_c, "gamma_d": model.gamma_d, "bank": "positional",
                "centres": model.memory_bank.shape[1], "taps": torch_model.get_return_nodes(args.backbone),
                "anomalib": anomalib.__version__}  # fmt: skip
    return settings, train, infer


def child(args: argparse.Namespace) -> dict:
    """Run one side's phase and return its measurement (printed as one JSON line)."""
    import torch

    for module in IMPORTS[args.child]:  # first, so that their share of the peak is known
        importlib.import_module(module)
    imports_mb = peak_rss_mb()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = random_images(args.batch, args.size, seed=0)
    bank_images = random_images(args.bank_images, args.size, seed=1)
    side = ours_side if args.child == "ours" else peer_side
    settings, train, infer = side(args, images, bank_images)
    seconds = time_steps(train if args.phase == "train" else infer, args.steps)
    result = {
        "side": args.child, "backbone": args.backbone, "phase": args.phase,
        "ips": args.batch / statistics.median(seconds), "step_s": seconds,
        "peak_rss_mb": peak_rss_mb(), "imports_rss_mb": imports_mb,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "settings": settings,
    }  # fmt: skip
    if args.child == "ours":
        from benchmark import machine  # experiments/benchmark.py, beside this script

        result["machine"] = machine(torch.device("cpu"))
    return result


# ---- the driver ---------------------------------------------------------------------------------


def peer_ready(python: str) -> bool:
    """Whether ``python`` runs and imports anomalib."""
    try:
        done = subprocess.run([python, "-c", "import anomalib"], capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def peer_missing_message(python: str) -> str:
    return (f"no anomalib at {python}: install the peer environment with `make peer-env` "
            f"({PEER_INSTALL}), then run make peer-bench")  # fmt: skip


def ours_configs(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each configuration of ours by its label: "ours" (the default) and one per --ours-overrides."""
    configs = {"ours": []}
    for overrides in args.ours_overrides:
        configs["ours " + " ".join(overrides)] = list(overrides)
    return configs


def run_child(python: str, side: str, phase: str, backbone: str, args) -> dict:
    """One child process; its result (its side named by ``side``, a label of ours_configs or
    "peer"), or {"error": its last line of stderr}."""
    overrides = ours_configs(args).get(side, [])
    kind = "peer" if side == "peer" else "ours"
    command = [python, str(Path(__file__).resolve()), "--child", kind, "--phase", phase,
               "--backbone", backbone, "--size", str(args.size), "--batch", str(args.batch),
               "--steps", str(args.steps), "--threads", str(args.threads),
               "--bank-images", str(args.bank_images)]  # fmt: skip
    if overrides:
        command += ["--overrides", *overrides]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "side": side}
    errors = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
    return {"side": side, "backbone": backbone, "phase": phase, "error": errors[-1][:300]}


def plan(args: argparse.Namespace) -> list[tuple[int, str, str, str]]:
    """(round, backbone, phase, side) in running order; the order of the sides (each
    configuration of ours, then the peer) reverses every round."""
    order = [*ours_configs(args), "peer"]
    runs = []
    for round_ in range(args.rounds):
        sides = order if round_ % 2 == 0 else order[::-1]
        for backbone in [*args.backbones, *args.ours_only_backbones]:
            both = backbone not in args.ours_only_backbones
            for phase in PHASES:
                runs += [(round_, backbone, phase, s) for s in sides if both or s != "peer"]
    return runs


HEADER = ("backbone", "ours", "px", "batch", "train img/s ours / peer", "train x",
          "infer img/s ours / peer", "infer x", "train peak MB ours / peer", "train MB x",
          "infer peak MB ours / peer", "infer MB x")  # fmt: skip


def summarise(results: list[dict]) -> dict[tuple[str, str, str], dict]:
    """(backbone, side, phase) -> median img/s and max peak RSS over rounds (errors left out)."""
    cells: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        if "error" not in r:
            cells.setdefault((r["backbone"], r["side"], r["phase"]), []).append(r)
    return {key: {"ips": statistics.median(r["ips"] for r in rs),
                  "peak_mb": max(r["peak_rss_mb"] for r in rs), "rounds": len(rs)}
            for key, rs in cells.items()}  # fmt: skip


def table(
    results: list[dict], backbones: list[str], size: int, batch: int, configs=("ours",)
) -> list[str]:
    """The Markdown table, one row per backbone and configuration of ours (a label of
    ours_configs): ours / peer per phase and the ratios ours / peer ("-" where a side has no
    result)."""
    cells = summarise(results)

    def pair(backbone: str, config: str, phase: str, key: str, fmt: str) -> tuple[str, str]:
        ours, peer = (cells.get((backbone, s, phase), {}).get(key) for s in (config, "peer"))
        text = " / ".join("-" if v is None else f"{v:{fmt}}" for v in (ours, peer))
        return text, "-" if ours is None or peer is None else f"x{ours / peer:.2f}"

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for backbone in backbones:
        for config in configs:
            name = config.removeprefix("ours").strip() or "default"
            row = [backbone, name, str(size), str(batch)]
            for key, fmt in (("ips", ".2f"), ("peak_mb", ".0f")):
                for phase in PHASES:
                    row += pair(backbone, config, phase, key, fmt)
            lines.append("| " + " | ".join(row) + " |")
    return lines


def header(results: list[dict], args: argparse.Namespace) -> str:
    """What ran where: the CPU and threads (from our child), versions and settings of each side."""
    labels = [*ours_configs(args), "peer"]
    first = {s: next((r for r in results if r.get("side") == s and "error" not in r), None)
             for s in labels}  # fmt: skip
    ours = next((first[s] for s in labels if s != "peer" and first[s]), None)
    where = ours["machine"] if ours else f"{os.cpu_count()} CPUs, {args.threads} thread(s)"
    sides = []
    for label, r in first.items():
        name = "peer (anomalib CfaModel + CfaLoss)" if label == "peer" else label
        if r is not None:
            settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
            sides.append(f"{name}: torch {r['torch']}, {r['threads']} thread(s), {settings}, "
                         f"imports alone {r['imports_rss_mb']:.0f} MB of the peak")  # fmt: skip
    return (f"# CFA, ours vs anomalib's, on {where}; random weights, {args.rounds} round(s), "
            f"sides alternating, one child process per (side, phase); img/s = batch / median of "
            f"{args.steps} step(s) after one warm-up; peak MB = the child's peak RSS; "
            f"x = ours / peer\n# " + "; ".join(sides))  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "wide_resnet50_2"],
                        help="timed for both sides")  # fmt: skip
    parser.add_argument("--ours-only-backbones", nargs="*", default=["tf_efficientnet_lite0"],
                        help="timed for ours alone (anomalib's CFA cannot take them)")  # fmt: skip
    parser.add_argument("--size", type=int, default=256, help="image size (px)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="rounds, sides alternating")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every child")
    parser.add_argument("--bank-images", type=int, default=16,
                        help="random images of each bank; 16 fill the default's 16384 centres at "
                             "256 px (1024 patches each), fewer give it a smaller bank")  # fmt: skip
    parser.add_argument("--peer-python", default=PEER_PYTHON,
                        help="the peer environment's Python (env CFA_PEER_PYTHON)")  # fmt: skip
    parser.add_argument("--ours-overrides", nargs="+", action="append", default=[],
                        metavar="OVERRIDE",
                        help="Hydra overrides of one more configuration of ours, timed beside the "
                             "default in the same rounds (repeat the option for more), e.g. "
                             "model/bank=positional")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every child's result to this file")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=PHASES, default="train", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key in ("size", "batch", "rounds", "steps", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} {getattr(args, key)}: must be at least 1")
    if args.bank_images is not None and args.bank_images < 1:
        parser.error(f"--bank-images {args.bank_images}: a bank needs at least one image")
    if args.child and not args.backbone:
        parser.error("--child needs --backbone")
    both = set(args.backbones) & set(args.ours_only_backbones)
    if both:
        parser.error(f"{sorted(both)} in both --backbones and --ours-only-backbones")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    if args.backbones and not peer_ready(args.peer_python):
        print(peer_missing_message(args.peer_python))
        return 2
    results = []
    for round_, backbone, phase, side in plan(args):
        python = args.peer_python if side == "peer" else sys.executable
        r = {**run_child(python, side, phase, backbone, args), "round": round_}
        results.append(r)
        done = r.get("error") or f"{r['ips']:.2f} img/s, peak {r['peak_rss_mb']:.0f} MB"
        print(f"round {round_ + 1}/{args.rounds} {backbone} {phase} {side}: {done}",
              file=sys.stderr, flush=True)  # fmt: skip
    print(header(results, args) + "\n")
    backbones, configs = [*args.backbones, *args.ours_only_backbones], list(ours_configs(args))
    print("\n".join(table(results, backbones, args.size, args.batch, configs)))
    if args.rounds > 1:  # each round's own figures, to see how far the rounds agree
        for round_ in range(args.rounds):
            print(f"\nround {round_ + 1} alone:\n")
            own = [r for r in results if r.get("round") == round_]
            print("\n".join(table(own, backbones, args.size, args.batch, configs)))
    errors = [r for r in results if "error" in r]
    for r in errors:
        print(f"error: {r['backbone']} {r['phase']} {r['side']} round {r['round'] + 1}: "
              f"{r['error']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
