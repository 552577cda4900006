"""Tests for demo_data.py: layout, determinism, class coverage, ensure_demo_data, CLI."""
from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import demo_data

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(people=18, size=(24, 32), seed=3, eval_people=6)
FILES = {"mask1.jpg", "mask2.jpg", "mask3.jpg", "mask4.jpg", "mask5.jpg", "incorrect_mask.jpg", "normal.jpg"}
FOLDER = re.compile(r"^(\d{6})_(male|female)_Asian_(\d+)$")


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _label(mask_file: str, folder: str) -> int:
    _, gender, _, age = folder.split("_")
    mask = 0 if mask_file.startswith("mask") else 1 if mask_file.startswith("incorrect") else 2
    age = int(age)
    return mask * 6 + (gender == "female") * 3 + (0 if age < 30 else 1 if age < 60 else 2)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return demo_data.generate(tmp_path_factory.mktemp("demo") / "data", **SMALL)


def test_train_layout(small):
    header, rows = _rows(small / "train" / "train.csv")
    assert header == ["id", "gender", "race", "age", "path"]
    folders = sorted(p.name for p in (small / "train" / "images").iterdir())
    assert len(rows) == SMALL["people"] and sorted(r["path"] for r in rows) == folders
    for r in rows:
        m = FOLDER.match(r["path"])
        assert m, r["path"]
        assert (m.group(1), m.group(2), m.group(3)) == (r["id"], r["gender"], r["age"])
        assert r["race"] == "Asian" and 18 <= int(r["age"]) <= 70
        files = {p.name for p in (small / "train" / "images" / r["path"]).iterdir()}
        assert files == FILES
    with Image.open(small / "train" / "images" / rows[0]["path"] / "normal.jpg") as im:
        assert im.size == SMALL["size"] and im.mode == "RGB" and im.format == "JPEG"
    assert not list(small.parent.glob(".*tmp*")), "temporary build directory left behind"


def test_eval_layout(small):
    info_header, info = _rows(small / "eval" / "info.csv")
    gt_header, gt = _rows(small / "gt" / "gt.csv")
    assert info_header == gt_header == ["ImageID", "ans"]
    assert len(info) == 7 * SMALL["eval_people"]
    assert [r["ImageID"] for r in info] == [r["ImageID"] for r in gt]
    assert all(r["ans"] == "0" for r in info)
    ids = [r["ImageID"] for r in info]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{40}\.jpg", i) for i in ids)
    assert sorted(p.name for p in (small / "eval" / "images").iterdir()) == sorted(ids)
    # rows are shuffled, not grouped person by person in file order
    assert [int(r["ans"]) for r in gt] != sorted(int(r["ans"]) for r in gt)


def test_all_classes_present(small):
    _, rows = _rows(small / "train" / "train.csv")
    train_classes = {_label(f, r["path"]) for r in rows for f in FILES}
    assert train_classes == set(range(18))
    _, gt = _rows(small / "gt" / "gt.csv")
    assert {int(r["ans"]) for r in gt} == set(range(18))
    ages = {int(r["age"]) for r in rows}
    assert {29, 30, 59, 60} <= ages  # band edges are exercised


def test_deterministic_and_seed_sensitive(small, tmp_path):
    again = demo_data.generate(tmp_path / "again", **SMALL)
    assert _tree_bytes(again) == _tree_bytes(small)
    other = demo_data.generate(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
    assert _tree_bytes(other) != _tree_bytes(small)


def test_generate_replaces_own_parts_keeps_others(tmp_path):
    out = tmp_path / "d"
    (out / "train").mkdir(parents=True)
    (out / "train" / "stale.txt").write_text("x")
    (out / "keep.txt").write_text("mine")
    demo_data.generate(out, **SMALL)
    assert not (out / "train" / "stale.txt").exists()
    assert (out / "keep.txt").read_text() == "mine"
    assert (out / "train" / "train.csv").is_file()


def test_ensure_demo_data(tmp_path, capsys):
    out = tmp_path / "d"
    assert demo_data.ensure_demo_data(out, **SMALL) == out
    first = capsys.readouterr().out
    assert "synthetic" in first and str(out) in first
    csv_path = out / "train" / "train.csv"
    csv_path.write_text(csv_path.read_text() + "# marker\n")
    demo_data.ensure_demo_data(out, **SMALL)
    assert csv_path.read_text().endswith("# marker\n"), "existing data was regenerated"
    assert capsys.readouterr().out == ""


def test_ensure_refuses_train_without_csv(tmp_path):
    (tmp_path / "d" / "train" / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        demo_data.ensure_demo_data(tmp_path / "d", **SMALL)
    assert list((tmp_path / "d" / "train").iterdir()) == [tmp_path / "d" / "train" / "images"]


@pytest.mark.parametrize("kwargs", [dict(people=5), dict(eval_people=2), dict(size=(8, 8))])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        demo_data.generate(tmp_path / "d", **{**SMALL, **kwargs})
    assert not (tmp_path / "d").exists()


def test_cli(tmp_path, small):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "demo_data.py"), "--out", str(out), "--people", "18",
           "--size", "24", "32", "--seed", "3", "--eval_people", "6"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert _tree_bytes(out) == _tree_bytes(small)


def test_generate_never_replaces_data_it_did_not_write(tmp_path):
    """Issue 18 item 1, same rule as holdout.py: a train/ with images (real data, no marker) is
    refused with one line and left as it was; the tool's own earlier output is replaced."""
    out = tmp_path / "d"
    real = out / "train" / "images" / "000001_female_Asian_45"
    real.mkdir(parents=True)
    (real / "mask1.jpg").write_bytes(b"precious")
    with pytest.raises(demo_data.cli.ToolkitError, match="did not write") as err:
        demo_data.generate(out, **SMALL)
    assert "\n" not in str(err.value) and str(out / "train") in str(err.value)
    assert (real / "mask1.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["train"] and not list(tmp_path.glob(".*"))

    res = subprocess.run([sys.executable, str(ROOT / "demo_data.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert (real / "mask1.jpg").read_bytes() == b"precious"

    own = tmp_path / "own"
    demo_data.generate(own, **SMALL)
    assert (own / demo_data.MARKER).is_file()
    first = _tree_bytes(own)
    demo_data.generate(own, **{**SMALL, "seed": 9})  # our own output: replaced
    assert _tree_bytes(own) != first
