"""evaluate / predict / visualize / export on a checkpoint trained on the bundled data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cssfe.engine.inference import load_trained

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    out, result = trained_run
    eval_dir = tmp_path_factory.mktemp("eval")
    proc = _run("evaluate.py", "--checkpoint", out / "checkpoints" / "best.pt", "--output-dir", eval_dir)
    assert proc.returncode == 0, proc.stderr
    return eval_dir, proc.stdout, result


def test_evaluate_reproduces_training_metrics_and_writes_reports(evaluated):
    eval_dir, stdout, result = evaluated
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(result["best"]["mAP"])
    assert "total" in stdout and "tail" in stdout and "F1" in stdout
    rows = (eval_dir / "per_class_ap.csv").read_text().splitlines()
    assert rows[0] == "class,group,train_positives,ap" and len(rows) == 21
    with Image.open(eval_dir / "per_class_ap.png") as img:
        assert img.size[0] > 600 and img.size[1] >= 400


def test_evaluate_runs_on_the_kernels_it_is_given_and_refuses_an_absent_one(trained_run, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU, where the cuda backend is absent")
    out, _ = trained_run
    absent = "cuda"
    proc = _run("evaluate.py", "--checkpoint", out / "checkpoints" / "best.pt", "--output-dir", tmp_path / "eval",
                f"kernels={absent}")
    assert proc.returncode == 2 and f"config key 'kernels': backend '{absent}' is not available here" in proc.stderr
    assert not (tmp_path / "eval").exists()  # refused before loading data or writing anything


def test_pointing_game_beats_random_maps(evaluated):
    pg = json.loads((evaluated[0] / "metrics.json").read_text())["pointing_game"]
    assert set(pg) == {"maps", "refined_mask", "refined_nomask", "random"}
    assert pg["random"]["total"] < 15
    assert pg["maps"]["total"] > 2 * pg["random"]["total"] + 10


def test_predict_reports_and_skips_unreadable_files(trained_run, bundled_root, tmp_path):
    out, _ = trained_run
    images = tmp_path / "images"
    images.mkdir()
    for name in ("test_00000.png", "test_00001.png"):
        (images / name).write_bytes(open(os.path.join(bundled_root, "images", name), "rb").read())
    (images / "broken.png").write_bytes(b"not an image")
    proc = _run("predict.py", "--checkpoint", out / "checkpoints" / "last.pt", images)
    assert proc.returncode == 1
    assert "broken.png" in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [os.path.basename(r["file"]) for r in lines] == ["test_00000.png", "test_00001.png"]
    assert len(lines[0]["scores"]) == 20 and all(0 <= p <= 1 for p in lines[0]["scores"].values())
    assert lines[0]["labels"] == [c for c, p in lines[0]["scores"].items() if p >= 0.5]
    ok = _run("predict.py", "--checkpoint", out / "checkpoints" / "last.pt", images / "test_00000.png")
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 1


def test_visualize_writes_head_medium_tail_grids(trained_run, tmp_path):
    out, _ = trained_run
    proc = _run("visualize.py", "--checkpoint", out / "checkpoints" / "best.pt", "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for group in ("head", "medium", "tail"):
        with Image.open(tmp_path / f"{group}_example_maps.png") as img:
            assert img.size[0] >= 800  # five panels wide
            assert np.asarray(img.convert("L")).std() > 10  # not blank


def test_export_matches_the_model(trained_run, tmp_path):
    out, _ = trained_run
    path = tmp_path / "model.pt2"
    proc = _run("export.py", "--checkpoint", out / "checkpoints" / "best.pt", "--output", path)
    assert proc.returncode == 0, proc.stderr
    trained = load_trained(str(out / "checkpoints" / "best.pt"))
    exported = torch.export.load(str(path)).module()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = torch.sigmoid(trained.model(x)["logits"])
        assert torch.allclose(exported(x), want, atol=1e-5)


def test_visualize_a_sample_of_two_files_shows_them_side_by_side(trained_run, bundled_root, tmp_path):
    """ODIR-5K samples are two fundus images of one patient; the grid shows what the model saw."""
    from cssfe.explain.visualize import render_grid

    out, _ = trained_run
    trained = load_trained(str(out / "checkpoints" / "best.pt"))
    images = os.path.join(bundled_root, "images")
    pair = tuple(os.path.join(images, name) for name in sorted(os.listdir(images))[:2])
    single = render_grid(trained, str(tmp_path / "one.png"), pair[0], classes=[0])
    double = render_grid(trained, str(tmp_path / "two.png"), pair, classes=[0])
    with Image.open(single) as a, Image.open(double) as b:
        one, two = np.asarray(a.convert("L"), dtype=float), np.asarray(b.convert("L"), dtype=float)
    assert one.shape == two.shape and two.std() > 10
    assert np.abs(one - two).mean() > 1  # the panels show the pair, not the first file alone


def test_predict_threshold_and_output_file(trained_run, bundled_root, tmp_path):
    """--threshold decides the labels (0: every class, above 1: none; a predictor that keeps 0.5
    fails) and --output writes the JSON lines to the file, not to stdout."""
    out, _ = trained_run
    image = os.path.join(bundled_root, "images", "test_00000.png")
    for threshold, want in (("0", 20), ("1.01", 0)):
        path = tmp_path / f"pred_{threshold}.jsonl"
        proc = _run("predict.py", "--checkpoint", out / "checkpoints" / "last.pt", "--threshold", threshold,
                    "--output", path, image)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == ""
        (line,) = [json.loads(x) for x in path.read_text().splitlines()]
        assert os.path.basename(line["file"]) == "test_00000.png" and len(line["labels"]) == want


def test_visualize_named_images(trained_run, bundled_root, tmp_path):
    """--images: one grid per file given, named after it (instead of the head / medium / tail sample)."""
    out, _ = trained_run
    images = [os.path.join(bundled_root, "images", name) for name in ("test_00001.png", "test_00002.png")]
    proc = _run("visualize.py", "--checkpoint", out / "checkpoints" / "best.pt", "--output-dir", tmp_path,
                "--images", *images)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["test_00001_maps.png", "test_00002_maps.png"]
    with Image.open(tmp_path / "test_00001_maps.png") as img:
        assert np.asarray(img.convert("L")).std() > 10
