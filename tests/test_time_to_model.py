"""experiments/time_to_model.py without anomalib: its options, both sides' commands, the copy of
a category that anomalib pairs correctly, our metrics.json read back, and the table."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "time_to_model.py"
sys.path.insert(0, str(SCRIPT.parent))  # it imports peer_speed from beside itself
spec = importlib.util.spec_from_file_location("time_to_model", SCRIPT)
time_to_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(time_to_model)


@pytest.fixture()
def shared(tmp_path) -> Path:
    """A category in MVTec AD's layout whose names sort apart from their masks' names."""
    cat = tmp_path / "data" / "cookies"
    for name in ("train/good/0.png", "test/good/0.png", "test/anomaly/anomaly-1.png",
                 "test/anomaly/anomaly-10.png", "ground_truth/anomaly/anomaly-1_mask.png",
                 "ground_truth/anomaly/anomaly-10_mask.png"):  # fmt: skip
        (cat / name).parent.mkdir(parents=True, exist_ok=True)
        (cat / name).write_text(name)
    return tmp_path / "data"


def test_defaults_commands_and_refusals(shared, tmp_path, capsys):
    args = time_to_model.parse_args(["--data-root", str(shared), "--products", "cookies",
                                     "--threads", "1", "--out", str(tmp_path / "out")])  # fmt: skip
    assert (args.sides, args.backbone, args.peer_epochs) == (["peer", "ours"], "resnet18", 30)
    ours = time_to_model.ours_command(args, "cookies", tmp_path / "run")
    assert ours[1:] == ["-m", "cfa_lightning.train", "+experiment=resnet18", "data=shared",
                        "data.category=cookies", "backbone.pretrained=false",
                        f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    peer = time_to_model.peer_command(args, "cookies", tmp_path / "view", tmp_path / "run")
    assert peer[0] == args.peer_python and "--child" in peer
    assert peer[peer.index("--peer-epochs") + 1] == "30"
    assert peer[peer.index("--threads") + 1] == "1"
    for argv in (["--threads", "0"], ["--peer-epochs", "0"], ["--products", "botle"],
                 ["--child", "--category", "cookies"]):  # fmt: skip
        with pytest.raises(SystemExit):
            time_to_model.parse_args(["--data-root", str(shared), *argv])
        assert "error:" in capsys.readouterr().err


def test_peer_view_names_each_mask_after_its_image(shared, tmp_path):
    view = time_to_model.peer_view(shared / "cookies", tmp_path / "view" / "cookies")
    masks = sorted(p.name for p in (view / "ground_truth" / "anomaly").iterdir())
    images = sorted(p.name for p in (view / "test" / "anomaly").iterdir())
    assert masks == images == ["anomaly-1.png", "anomaly-10.png"]  # sorted alike: paired right
    mask = view / "ground_truth" / "anomaly" / "anomaly-10.png"
    assert mask.read_text() == "ground_truth/anomaly/anomaly-10_mask.png"
    assert os.path.samefile(mask, shared / "cookies/ground_truth/anomaly/anomaly-10_mask.png")
    assert (view / "train" / "good" / "0.png").is_file()
    time_to_model.peer_view(shared / "cookies", view)  # made again over the old one


def test_ours_result_and_table(tmp_path):
    saved = {"metrics": {"test/image_AUROC": 0.61, "test/pixel_AUROC": 0.7, "test/pixel_AUPRO": 0.3},
             "epochs": 7, "selection": {"epoch": 4}, "input_size": [192, 256], "train_time_s": 50.0}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(saved))
    ours = {"product": "cookies", "side": "ours", "wall_s": 123.4, **time_to_model.ours_result(tmp_path)}  # fmt: skip
    peer = {"product": "cookies", "side": "peer", "wall_s": 456.0, "epochs_run": 30, "epoch_tested": 30,
            "input_size": [256, 256], "metrics": {"image_AUROC": 0.5, "pixel_AUROC": 0.55}}  # fmt: skip
    failed = {"product": "metal_plate", "side": "peer", "wall_s": 3.0, "error": "exit status 1"}
    lines = time_to_model.table([peer, ours, failed])
    assert lines[0] == ("| product | side | wall s | epochs run | epoch tested | input (H, W) | "
                        "image AUROC | pixel AUROC | pixel AUPRO |")  # fmt: skip
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert rows[0] == ["cookies", "anomalib", "456", "30", "30", "256 x 256", "0.500", "0.550", "-"]
    assert rows[1] == ["cookies", "ours", "123", "7", "4", "192 x 256", "0.610", "0.700", "0.300"]
    assert rows[2][:4] == ["metal_plate", "anomalib", "3", "error"]
