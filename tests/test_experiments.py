"""Every script under experiments/ runs: each is called in this process with tiny sizes and the
small synthetic data set, so a script that follows a retired path fails here and not on the day
someone needs its figures. The two that quantise a model to INT8 (NNCF: seconds of CPU each) run
with `make test-slow`. aggregate.py, peer_speed.py and gpu_check.py have test files of their own
(tests/test_aggregate.py, tests/test_peer_speed.py, tests/test_gpu_check.py), and so has
time_to_model.py (tests/test_time_to_model.py)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TESTED_ELSEWHERE = {"aggregate", "peer_speed", "gpu_check", "time_to_model"}
TESTED_HERE = {"bank_build", "benchmark", "drift_study", "epoch0_probe", "int8_accuracy",
               "plot_curves", "runtime_benchmark", "runtime_profile", "search_margin",
               "tune_then_test"}  # fmt: skip
SMALL_RESNET = ["backbone=resnet18", "backbone.pretrained=false", "data.image_size=64"]


@pytest.fixture()
def script(monkeypatch):
    """experiments/<name>.py as a module, with its folder on sys.path as when it runs; torch's
    thread count and Hydra's run config are restored afterwards."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    threads = torch.get_num_threads()
    yield importlib.import_module
    torch.set_num_threads(threads)
    HydraConfig.instance().cfg = None  # epoch0_probe sets it for its data module


@pytest.fixture(scope="module")
def cookies_root(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic category under the name cookies, for the scripts that take only the names
    of ../shared/data's categories."""
    root = tmp_path_factory.mktemp("shared_like")
    (root / "cookies").symlink_to(synthetic_root / "synthetic", target_is_directory=True)
    return root


def test_every_script_has_a_test_and_every_make_target_a_script():
    scripts = {p.stem for p in EXPERIMENTS.glob("*.py")}
    assert scripts == TESTED_HERE | TESTED_ELSEWHERE, "a new script needs a test that runs it"
    named = set(re.findall(r"experiments/(\w+)\.py", (ROOT / "Makefile").read_text()))
    assert named and named <= scripts, sorted(named - scripts)


def test_benchmark_quick_compares_fast_and_naive(script, capsys):
    benchmark = script("benchmark")  # make bench: --quick, here on one small backbone
    code = benchmark.main(["--quick", "--backbones", "resnet18", "--size", "64", "--batch", "1"])
    assert code == 0
    out = capsys.readouterr().out
    # the default taps (strides 8 and 16): 8 x 8 positional centres at 64 px
    assert re.search(r"^\| resnet18 \| 64 \| 1 \| 32 \| positional \| 64 \|", out, re.M), out
    assert "0 row(s) outside tolerance" in out


def test_bank_build_measures_one_bank(script, synthetic_root, capsys):
    bank_build = script("bank_build")
    assert bank_build.backbone_config("resnet18", random_weights=True)["pretrained"] is False
    bank_build.main(["--one", "positional", "--backbone", "resnet18", "--random-weights",
                     "--root", str(synthetic_root), "--category", "synthetic", "--size", "64",
                     "--batch", "4"])  # fmt: skip
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the default taps (strides 8 and 16): 8 x 8 centres of 128 + 256 dims at 64 px
    assert (run["construction"], run["centres"], run["dims"]) == ("positional", 64, 384)
    assert run["build_s"] >= 0 and run["images"] > 0


def test_epoch0_probe_scores_the_untrained_model(script, synthetic_root, capsys):
    probe = script("epoch0_probe")
    probe.main(["--category", "synthetic", "--experiment", "resnet18", "--distances", "1",
                "--image-scores", *SMALL_RESNET, f"data.root={synthetic_root}",
                "data.val_anomalies=none", "data.num_workers=0"])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"synthetic epoch 0, bank positional .* AUPRO [\d.]+ / [\d.]+ / [\d.]+", out)
    assert "squared distance to the k-th nearest centre" in out
    assert "re-weighted raw max" in out


def test_drift_study_records_report_and_plot(script, cookies_root, tmp_path, capsys):
    drift = script("drift_study")
    drift.main(["--category", "cookies", "--epochs", "1", "--test-every", "2", "--out",
                str(tmp_path), "--val-by-family", *SMALL_RESNET, f"data.root={cookies_root}",
                "data.val_fraction=0.34"])  # fmt: skip
    record = json.loads((tmp_path / "cookies_base_seed0.json").read_text())
    assert [row["epoch"] for row in record["curve"]] == [0, 1]
    assert all("test/pixel_AUPRO" in row for row in record["curve"])
    assert all("val_family/synthetic_crack/pixel_AUPRO" in row for row in record["curve"])
    capsys.readouterr()
    drift.main(["--family-report", "--out", str(tmp_path)])
    rows = re.findall(r"^\| cookies \| .* \| 1 \| .* \| [01] \|$", capsys.readouterr().out, re.M)
    assert len(rows) == len(drift.FAMILY_RULES)
    capsys.readouterr()
    drift.main(["--report", "--out", str(tmp_path)])
    assert "| cookies | base | last epoch | 1 |" in capsys.readouterr().out
    pytest.importorskip("matplotlib")  # the plot extra: pip install -e '.[plot]'
    script("plot_curves").main(["--runs", str(tmp_path), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_search_margin_counts_wrong_neighbour_sets(script, synthetic_root, capsys):
    margin = script("search_margin")
    margin.main(["--real", str(synthetic_root / "synthetic"), "--size", "64", "--steps", "1",
                 "--test-images", "1", "--roundings", "float32", "bf16"])  # fmt: skip
    rows = re.findall(r"^\| (float32|bf16) \| (3|6) \|( \d+ \|){5}$", capsys.readouterr().out, re.M)
    assert len(rows) == 4


@pytest.mark.slow
def test_runtime_benchmark_runs_every_runtime(script, synthetic_root, capsys):
    bench = script("runtime_benchmark")
    bench.main(["--backbones", "resnet18", "--batches", "1", "--size", "64", "--rounds", "1",
                "--seconds", "0", "--threads", "1",
                "--calibration", str(synthetic_root / "synthetic" / "train" / "good")])  # fmt: skip
    row = r"^resnet18 +1 +[\d.]+( +[\d.]+ \([\d.]+x\)){3}$"  # PyTorch, then 3 runtimes x ratio
    assert re.search(row, capsys.readouterr().out, re.M)


def test_runtime_benchmark_follows_the_default_config(script, synthetic_root, capsys):
    bench = script("runtime_benchmark")  # onnxruntime alone: no OpenVINO export, seconds
    good = synthetic_root / "synthetic" / "train" / "good"
    for overrides, bank in (([], "bank=coreset"), (["model/bank=positional"], "bank=positional")):
        bench.main(["--backbones", "resnet18", "--batches", "1", "--size", "64", "--rounds", "1",
                    "--seconds", "0", "--threads", "1", "--runtimes", "onnxruntime",
                    "--calibration", str(good), "--overrides", *overrides])  # fmt: skip
        out = capsys.readouterr().out
        assert f"# resnet18: {bank}, " in out and "taps=[2, 3], K=1" in out
        assert re.search(r"^resnet18 +1 +[\d.]+ +[\d.]+ \([\d.]+x\)$", out, re.M)


def test_runtime_profile_times_every_stage(script, synthetic_root, capsys):
    profile = script("runtime_profile")
    profile.main(["--backbones", "resnet18", "--batch", "1", "--size", "64", "--repeats", "1",
                  "--threads", "1",
                  "--calibration", str(synthetic_root / "synthetic" / "train" / "good")])  # fmt: skip
    rows = re.findall(r"^resnet18 +(pytorch|onnxruntime|openvino fp32) ", capsys.readouterr().out,
                      re.M)  # fmt: skip
    assert rows == ["pytorch", "onnxruntime", "openvino fp32"]


@pytest.mark.slow
def test_int8_accuracy_scores_each_runtime(script, trained_checkpoint, tmp_path):
    script("int8_accuracy").main(["--ckpt", str(trained_checkpoint), "--scopes", "backbone",
                                  "--every", "2", "--threads", "1", "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "int8_accuracy.json").read_text())["rows"]
    assert list(rows) == ["pytorch", "onnxruntime fp32", "openvino fp32",
                          "openvino int8 (backbone)"]  # fmt: skip
    assert rows["onnxruntime fp32"]["pixel_AUPRO"] == pytest.approx(rows["pytorch"]["pixel_AUPRO"])


def test_tune_then_test_compares_retrained_runs(script, tmp_path):
    from cfa_lightning.utils import write_metrics

    tune_then_test = script("tune_then_test")
    tune = tmp_path / "tune"  # a finished sweep: its best parameters and trial table
    tune.mkdir()
    (tune / "best.json").write_text(
        json.dumps({"best_params": {"model.K": 1}, "objective": "val/pixel_AUPRO"})
    )
    (tune / "trials.csv").write_text(
        "status,objective,test/pixel_AUPRO\nok,0.1,0.5\nok,0.2,0.7\nok,0.3,0.6\n"
    )
    for name, aupro in (("default", 0.80), ("tuned", 0.85)):  # retrained already: not rerun
        write_metrics(tmp_path / name / "seed0" / "metrics.json",
                      {"test/pixel_AUPRO": aupro}, seed=0, status="ok")  # fmt: skip
    code = tune_then_test.main(["--out", str(tmp_path), "--skip-tune", "--proxy", "--seeds", "0"])
    assert code == 0
    table = (tmp_path / "comparison.md").read_text()
    assert re.search(r"^\| default \|", table, re.M) and re.search(r"^\| tuned \|", table, re.M)
    proxy = json.loads((tmp_path / "proxy.json").read_text())
    assert proxy["spearman"]["test/pixel_AUPRO"] == pytest.approx(0.5)
