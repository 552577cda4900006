"""gallery.py's contact sheets and the error gallery of train.py (errors.png, MLflow, TensorBoard)
and of `evaluation.py --images`."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskcls import cli
import dataset as data
import evaluation
from maskcls import gallery

PNG = b"\x89PNG\r\n\x1a\n"


def photos(root: Path, n: int) -> list[str]:
    return [s.path for s in data.discover(root / "train", verbose=False)[:n]]


def test_sheet_rows_cells_and_highlight(demo_root, tmp_path):
    paths = photos(demo_root, 3)
    rows = [gallery.SheetRow("first", [gallery.Cell(p, f"cell {i}\nsecond line") for i, p in enumerate(paths)]),
            gallery.SheetRow("second", [gallery.Cell(paths[0], "framed", highlight=True),
                                        gallery.Cell(tmp_path / "absent.jpg", "missing file")])]
    pixels = gallery.save_sheet(tmp_path / "sheet.png", rows, "a title")
    assert (tmp_path / "sheet.png").read_bytes()[:8] == PNG
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB")), pixels)
    row_h = gallery.TITLE_H + gallery.THUMB[0] + gallery.CAPTION_H
    assert pixels.shape[0] == gallery.TITLE_H + 8 + 2 * row_h + 4 and pixels.shape[1] == max(3 * gallery.CELL_W, 480)
    red = (pixels == gallery.HIGHLIGHT).all(axis=2)
    assert red[:, :gallery.CELL_W].any() and not red[:, gallery.CELL_W:].any()  # only the framed photo
    assert list(tmp_path.glob(".*tmp")) == []  # written atomically, nothing left over


def test_empty_sheet_still_writes_a_picture(tmp_path):
    pixels = gallery.save_sheet(tmp_path / "empty.png", [], "nothing wrong")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG and pixels.size


def test_error_rows_pick_the_most_confident_mistakes_per_class():
    truth = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    pred = np.array([1, 2, 1, 2, 1, 0, 1, 0, 2])
    probs = np.full((9, 3), 0.1)
    probs[np.arange(9), pred] = [0.5, 0.9, 0.6, 0.7, 0.8, 0.9, 0.9, 0.55, 0.9]
    rows = gallery.error_rows([f"img{i}" for i in range(9)], truth, pred, probs, ["a", "b", "c"], per_class=4)
    assert [r.title for r in rows] == ["true a: 5 of 6 wrong", "true b: 1 of 2 wrong"]  # c has no mistake
    assert [c.path for c in rows[0].cells] == ["img1", "img4", "img3", "img2"]  # 0.9, 0.8, 0.7, 0.6; 0.5 cut
    assert rows[0].cells[0].caption.startswith("-> c\np 0.90")
    people = ["ann", "bob", "ann", "ann", "bob", "cy", "cy", "cy", "cy"]  # one photo per person in a row
    rows = gallery.error_rows([f"img{i}" for i in range(9)], truth, pred, probs, ["a", "b", "c"], people=people)
    assert [c.path for c in rows[0].cells] == ["img1", "img3"] and rows[0].cells[1].caption.endswith("\nann")


def test_train_writes_and_logs_the_error_gallery(tmp_path, demo_root):
    """write_validation_outputs: errors.png beside confusion_matrix.png, logged to MLflow and TensorBoard."""
    import train
    from maskcls.task import get_task

    samples = data.discover(demo_root / "train", verbose=False)
    val_set = data.MaskDataset(samples, None, range(0, 70), "all")
    truth = np.array(val_set.labels())
    logits = np.random.default_rng(0).normal(size=(70, 18)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    logged, images = [], []

    class Tracker:
        def log_artifact(self, path):
            logged.append(Path(path).name)

    class Writer:
        def add_image(self, tag, pixels, step, dataformats):
            images.append((tag, pixels.shape, step, dataformats))

    train.write_validation_outputs(tmp_path, train.Validation(logits, probs, 1.0), truth, val_set, get_task("all"),
                                   (30, 60), Tracker(), Writer(), epoch=3)
    assert (tmp_path / "errors.png").read_bytes()[:8] == PNG
    assert "errors.png" in logged and "confusion_matrix.png" in logged
    ((tag, shape, step, form),) = images
    assert tag == "errors" and step == 3 and form == "HWC" and shape[2] == 3


def test_trained_run_has_errors_png_in_tensorboard(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (trained_run / "errors.png").read_bytes()[:8] == PNG
    events = EventAccumulator(str(trained_run), size_guidance={"images": 0}).Reload()
    assert "errors" in events.Tags()["images"]


# --------------------------------------------------------------------------- evaluation.py --images
@pytest.fixture
def predictions(demo_root, tmp_path) -> Path:
    """output.csv + output_probs.csv for demo_root's eval set, as inference.py writes them (random model)."""
    with open(demo_root / "gt" / "gt.csv", newline="") as f:
        ids = [r["ImageID"] for r in csv.DictReader(f)]
    probs = np.random.default_rng(1).dirichlet(np.ones(18), len(ids))
    out = tmp_path / "output"
    out.mkdir()
    (out / "output.csv").write_text("ImageID,ans\n" + "".join(f"{i},{p.argmax()}\n" for i, p in zip(ids, probs)))
    (out / "output_probs.csv").write_text("ImageID," + ",".join(f"p{c}" for c in range(18)) + "\n" + "".join(
        f"{i}," + ",".join(f"{v:.6f}" for v in p) + "\n" for i, p in zip(ids, probs)))
    return out


def test_evaluation_writes_the_gallery_beside_the_predictions(demo_root, predictions, capsys, tmp_path):
    rc = evaluation.main(["--gt", str(demo_root / "gt"), "--pred", str(predictions), "--images", str(demo_root / "eval")])
    assert rc == 0 and (predictions / "errors.png").read_bytes()[:8] == PNG
    assert f"error gallery (most confident mistakes per true class): {predictions / 'errors.png'}" in capsys.readouterr().out
    rc = evaluation.main(["--gt", str(demo_root / "gt"), "--pred", str(predictions / "output.csv"), "--json",
                          "--images", str(demo_root / "eval" / "images"), "--gallery", str(tmp_path / "g" / "e.png")])
    assert rc == 0 and (tmp_path / "g" / "e.png").is_file()


@pytest.mark.parametrize("case, fragment", [("gallery_without_images", "needs --images"),
                                            ("no_probs", "no probabilities"), ("bad_probs", "missing column p0"),
                                            ("images_not_a_folder", "not a folder"), ("wrong_images", "not found")])
def test_evaluation_gallery_bad_input_is_one_line(demo_root, predictions, tmp_path, capsys, case, fragment):
    args = ["--gt", str(demo_root / "gt"), "--pred", str(predictions)]
    (tmp_path / "bad.csv").write_text("ImageID,ans\nx,1\n")
    extra = {"gallery_without_images": ["--gallery", str(tmp_path / "e.png")],
             "no_probs": ["--images", str(demo_root / "eval"), "--probs", str(tmp_path / "none.csv")],
             "bad_probs": ["--images", str(demo_root / "eval"), "--probs", str(tmp_path / "bad.csv")],
             "images_not_a_folder": ["--images", str(demo_root / "gt" / "gt.csv")],
             "wrong_images": ["--images", str(tmp_path)]}[case]
    assert cli.call(lambda: evaluation.main(args + extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (predictions / "errors.png").exists()
