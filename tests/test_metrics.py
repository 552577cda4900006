"""metrics.py: scores equal sklearn's, per-class counts, files written atomically."""
from __future__ import annotations

import csv
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maskcls import fileio, metrics
from maskcls.task import TASK_CLASSES, class_names, decode18


def random_pair(n: int, classes: int, seed: int = 0, hit: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, classes, n)
    p = np.where(rng.random(n) < hit, t, rng.integers(0, classes, n))
    return t, p


def test_class_names_and_decode():
    assert class_names("all")[0] == "0 wear/male/<30"
    assert class_names("all")[17] == "17 not wear/female/>=60"
    assert class_names("all", age_bins=(30, 58))[4] == "4 wear/female/30-57"
    assert class_names("mask") == ["0 wear", "1 incorrect", "2 not wear"]
    assert class_names("genderage")[5] == "5 female/>=60"
    assert [len(class_names(t)) for t in TASK_CLASSES] == [18, 3, 6, 18]
    with pytest.raises(ValueError, match="known tasks: all, mask, genderage, multi"):
        class_names("nope")
    m, g, a = decode18(np.arange(18))
    assert np.array_equal(m * 6 + g * 3 + a, np.arange(18))
    assert (m[13], g[13], a[13]) == (2, 0, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_predictions_all_equals_sklearn(seed):
    t, p = random_pair(300, 18, seed)
    s = metrics.evaluate_predictions(t, p, "all")
    assert s["accuracy"] == pytest.approx(np.mean(t == p))
    assert s["f1"] == pytest.approx(f1_score(t, p, average="macro"))
    (tm, tg, ta), (pm, pg, pa) = decode18(t), decode18(p)
    assert s["f1_mask"] == pytest.approx(f1_score(tm, pm, average="macro"))
    assert s["f1_gender"] == pytest.approx(f1_score(tg, pg, average="macro"))
    assert s["f1_age"] == pytest.approx(f1_score(ta, pa, average="macro"))
    assert s["f1_genderage"] == pytest.approx(f1_score(t % 6, p % 6, average="macro"))
    assert all(isinstance(v, float) for v in s.values())
    # the sub-task scores are not all just the 18-class score
    assert len({round(v, 6) for v in s.values()}) == len(s)


def test_multi_and_subtasks():
    t, p = random_pair(200, 18, 5)
    assert metrics.evaluate_predictions(t, p, "multi") == metrics.evaluate_predictions(t, p, "all")
    # multi also accepts (mask, gender, age) triples
    tri = np.stack(decode18(t), axis=1)
    assert metrics.evaluate_predictions(tri, p, "multi") == metrics.evaluate_predictions(t, p, "all")

    t6, p6 = random_pair(200, 6, 6)
    s = metrics.evaluate_predictions(t6, p6, "genderage")
    assert set(s) == {"accuracy", "f1", "f1_gender", "f1_age"}
    assert s["f1_gender"] == pytest.approx(f1_score(t6 // 3, p6 // 3, average="macro"))
    assert s["f1_age"] == pytest.approx(f1_score(t6 % 3, p6 % 3, average="macro"))

    t3, p3 = random_pair(100, 3, 7)
    s = metrics.evaluate_predictions(t3, p3, "mask")
    assert set(s) == {"accuracy", "f1"}
    assert s["f1"] == pytest.approx(f1_score(t3, p3, average="macro"))


def test_f1_counts_only_labels_present_like_the_competition():
    # classes 0..2 only: absent classes 3..17 are left out of the mean, not counted as 0
    t = np.array([0, 0, 1, 1, 2, 2])
    s = metrics.evaluate_predictions(t, t, "all")
    assert s["f1"] == 1.0
    # class 17 predicted but never true: it counts as F1 0 in the mean
    p = np.array([0, 0, 1, 1, 2, 17])
    s = metrics.evaluate_predictions(t, p, "all")
    assert s["f1"] == pytest.approx(f1_score(t, p, average="macro"))
    assert s["f1"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    rows = metrics.per_class_rows(t, p, "all")
    assert rows[17] == {"class": 17, "name": "not wear/female/>=60", "correct": 0, "total": 0, "accuracy": None,
                        "predicted": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    table = metrics.per_class_table(t, p, "all").splitlines()
    row17 = next(line for line in table if line.split()[0] == "17")
    assert row17.split()[-5] == "-"  # accuracy of a class with no samples


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="outside 0..2"):
        metrics.evaluate_predictions([0, 3], [0, 1], "mask")
    with pytest.raises(ValueError, match="outside 0..17"):
        metrics.evaluate_predictions([0, -1], [0, 1], "all")
    with pytest.raises(ValueError, match="length"):
        metrics.evaluate_predictions([0, 1], [0], "all")
    with pytest.raises(ValueError, match="integer"):
        metrics.evaluate_predictions([0.5, 1], [0, 1], "all")
    with pytest.raises(ValueError, match="no samples"):
        metrics.evaluate_predictions([], [], "all")
    assert metrics.evaluate_predictions(np.array([1.0, 2.0]), [1, 2], "all")["accuracy"] == 1.0


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    t, p = random_pair(50, 18, 9)
    s = metrics.evaluate_predictions(torch.from_numpy(t), torch.from_numpy(p), "all")
    assert s == metrics.evaluate_predictions(t, p, "all")
    assert metrics.confusion_matrix_text(torch.from_numpy(t), torch.from_numpy(p), 18) == \
        metrics.confusion_matrix_text(t, p, 18)


def test_per_class_counts():
    t = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 2, 2])
    rows = metrics.per_class_rows(t, p, "mask")
    assert [(r["correct"], r["total"], r["predicted"]) for r in rows] == [(2, 3, 2), (1, 2, 2), (1, 1, 2)]
    assert rows[0]["accuracy"] == pytest.approx(2 / 3)
    assert rows[0]["precision"] == 1.0 and rows[1]["precision"] == 0.5
    ref = f1_score(t, p, average=None)
    assert [r["f1"] for r in rows] == pytest.approx(list(ref))

    table = metrics.per_class_table(t, p, "mask").splitlines()
    assert len(table) == 2 + 3 + 2
    cells = [line.split() for line in table[2:5]]
    assert [(c[0], c[-7], c[-6], c[-5]) for c in cells] == [
        ("0", "2", "3", "66.67%"), ("1", "1", "2", "50.00%"), ("2", "1", "1", "100.00%")]
    assert "accuracy 66.67% (4/6)" in table[-1]
    assert f"macro F1 {f1_score(t, p, average='macro'):.4f}" in table[-1]

    # 18-class table has one row per class even when most are absent
    assert len(metrics.per_class_table(t, p, "all").splitlines()) == 2 + 18 + 2


def test_per_class_csv(tmp_path):
    t, p = random_pair(120, 6, 3)
    out = tmp_path / "sub" / "per_class.csv"
    metrics.write_per_class_csv(out, t, p, "genderage", age_bins=(30, 58))
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert rows[1]["name"] == "male/30-57"
    assert sum(int(r["total"]) for r in rows) == 120
    assert sum(int(r["correct"]) for r in rows) == int(np.sum(t == p))
    assert os.listdir(out.parent) == ["per_class.csv"]  # no temp file left


def test_confusion_matrix_text():
    t = np.array([0, 0, 1, 2, 2, 2])
    p = np.array([0, 1, 1, 2, 2, 0])
    lines = metrics.confusion_matrix_text(t, p, 3).splitlines()
    assert len(lines) == 4
    assert [list(map(int, line.split()[1:])) for line in lines[1:]] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert [int(line.split()[0]) for line in lines[1:]] == [0, 1, 2]


def test_confusion_matrix_png(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    t, p = random_pair(150, 18, 4)
    p[:3] = 17  # class 17 predicted
    out = tmp_path / "cm.png"
    metrics.save_confusion_matrix_png(out, t, p, "all")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert os.listdir(tmp_path) == ["cm.png"]
    assert matplotlib.get_backend() == backend  # no global backend switch

    from PIL import Image
    with Image.open(out) as im:
        im.verify()
    metrics.save_confusion_matrix_png(tmp_path / "cm3.png", [0, 1, 2], [0, 1, 1], "mask")
    assert (tmp_path / "cm3.png").read_bytes()[:4] == b"\x89PNG"


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    out = tmp_path / "per_class.csv"
    out.write_text("old")
    with pytest.raises(ValueError):
        metrics.write_per_class_csv(out, [0, 1], [0, 5], "mask")
    assert out.read_text() == "old"

    def boom(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        fileio.atomic_write(out, boom)  # the one atomic write metrics.py uses
    assert out.read_text() == "old"
    assert os.listdir(tmp_path) == ["per_class.csv"]


def test_report_files_honour_umask(tmp_path):
    """Issue 18 item 7: per_class.csv and confusion_matrix.png are readable by the group and
    others under the usual umask 022 (temp-file helpers make 0600), and follow a stricter one."""
    t, p = random_pair(60, 18, 5)
    for umask, want in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            csv_path, png_path = tmp_path / f"{umask:o}" / "per_class.csv", tmp_path / f"{umask:o}" / "cm.png"
            metrics.write_per_class_csv(csv_path, t, p, "all")
            metrics.save_confusion_matrix_png(png_path, t, p, "all")
        finally:
            os.umask(old)
        assert stat.S_IMODE(csv_path.stat().st_mode) == want
        assert stat.S_IMODE(png_path.stat().st_mode) == want
