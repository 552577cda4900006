"""Inputs that could reach outside the data (issue 41): paths read from files never leave their folder, and a
resume on changed data keeps the run's recorded split (or, for --fold all, stops) instead of redrawing it."""
from __future__ import annotations

import contextlib
import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import audit
import dataset as data
import evaluation
import export
import train
from maskcls.checkpoint import CheckpointError, load_checkpoint, validation_samples
from conftest import TINY_TRAIN_ARGS
from maskcls.fileio import path_escape, within
from maskcls import cli
from maskcls import pyfunc


@pytest.mark.parametrize("text, reason", [("../secret.jpg", "'..' segment"), ("a/../../b.jpg", "'..' segment"),
                                          ("..\\b.jpg", "'..' segment"), ("/etc/passwd", "absolute path"),
                                          ("C:\\photos\\a.jpg", "drive letter"), ("c:a.jpg", "drive letter"),
                                          ("\\\\server\\share\\a.jpg", "absolute path"), ("", "empty path")])
def test_path_escape_names_every_way_out(text, reason):
    assert reason in path_escape(text)


@pytest.mark.parametrize("text", ["a.jpg", "sub/a.jpg", "a..b.jpg", "...jpg", "사진.jpg"])
def test_paths_inside_the_folder_are_kept(text):
    assert path_escape(text) is None


def test_within_is_lexical():
    assert within("/data/train", "/data/train/images/p/a.jpg")
    assert not within("/data/train", "/data/train/../secret/a.jpg")
    assert not within("/data/train", "/data/trainX/a.jpg") and not within("/data/train", "/etc/passwd")


def _eval_folder(tmp_path: Path, demo_root: Path, image_ids: list[str]) -> Path:
    folder = tmp_path / "eval"
    shutil.copytree(demo_root / "eval" / "images", folder / "images")
    pd.DataFrame({"ImageID": image_ids, "ans": 0}).to_csv(folder / "info.csv", index=False)
    return folder


@pytest.mark.parametrize("bad", ["../../secret.jpg", "/etc/passwd", "C:\\x.jpg", "sub/../../x.jpg"])
def test_info_csv_cannot_steer_reads_outside_images(demo_root, tmp_path, bad, monkeypatch):
    (tmp_path / "secret.jpg").write_bytes((demo_root / "eval" / "images" / sorted(
        p.name for p in (demo_root / "eval" / "images").iterdir())[0]).read_bytes())
    first = sorted(p.name for p in (demo_root / "eval" / "images").iterdir())[0]
    folder = _eval_folder(tmp_path, demo_root, [first, bad])
    opened = []
    real = data.listed_path
    monkeypatch.setattr(data, "listed_path", lambda images, image_id: opened.append(image_id) or real(images, image_id))
    with pytest.raises(cli.DataError) as e:
        data.read_eval_info(folder)
    message = str(e.value)
    assert "info.csv line 3" in message and repr(bad) in message and "\n" not in message
    assert opened == []  # refused before any ImageID became a path


def test_a_link_inside_images_stays_the_owners(demo_root, tmp_path):
    first = sorted(p.name for p in (demo_root / "eval" / "images").iterdir())[0]
    folder = _eval_folder(tmp_path, demo_root, ["link.jpg"])
    (folder / "images" / "link.jpg").symlink_to(folder / "images" / first)
    _, paths = data.read_eval_info(folder)
    assert paths == [str(folder / "images" / "link.jpg")]


def test_evaluation_gallery_refuses_imageids_leaving_images(tmp_path):
    with pytest.raises(evaluation.EvaluationError, match="outside the images folder"):
        evaluation.error_gallery(str(tmp_path), tmp_path / "output.csv", None, None, ["../x.jpg"],
                                 np.zeros(1, int), np.zeros(1, int), (30, 60))


def _edit_val_samples(run: Path, to: Path, path: str) -> Path:
    shutil.copytree(run, to)
    rows = list(csv.DictReader(open(to / "val_samples.csv", newline="")))
    rows[1]["path"] = path
    with open(to / "val_samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return to


@pytest.mark.parametrize("outside", ["/etc/passwd", "{data}/../../secret.jpg"])
def test_val_samples_paths_must_name_the_runs_own_images(trained_run, tmp_path, outside):
    ckpt = load_checkpoint(trained_run / "best_f1.pth")
    assert all(within(ckpt["resolved"]["data_dir"], r["path"]) for r in validation_samples(trained_run, ckpt))
    run = _edit_val_samples(trained_run, tmp_path / "run", outside.format(data=ckpt["resolved"]["data_dir"]))
    with pytest.raises(CheckpointError, match="val_samples.csv line 3: .* lies outside the training data"):
        validation_samples(run, ckpt)
    # every reader of the file: audit's out-of-fold material, export's check images, the served example
    with pytest.raises(audit.AuditError, match="line 3"):
        audit.read_run(run)
    with pytest.raises(CheckpointError, match="line 3"):
        export.sample_paths(run, ckpt, 4)
    with pytest.raises(CheckpointError, match="line 3"):
        pyfunc.input_example(run, ckpt)


# --------------------------------------------------------------------------- resume on changed data
def _copy_data(demo_root: Path, to: Path) -> Path:
    shutil.copytree(demo_root / "train", to, symlinks=True)
    return to


def _train(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main(argv) == 0, out.getvalue()[-2000:]
    return out.getvalue()


def test_resume_on_changed_data_keeps_the_recorded_split(demo_root, tmp_path, single_thread):
    data_dir = _copy_data(demo_root, tmp_path / "train")
    base = [*TINY_TRAIN_ARGS, "--data_dir", str(data_dir), "--model_dir", str(tmp_path / "runs"), "--name", "r"]
    _train([*base, "--epochs", "1"])
    run = tmp_path / "runs" / "r"
    split = load_checkpoint(run / "last.pth")["split"]
    val_people = sorted({k.split("/")[0] for k in split["val"]})
    train_people = sorted({k.split("/")[0] for k in split["train"]})
    assert not set(val_people) & set(train_people)
    # a validation person's folder deleted, a new person added: the split would be redrawn
    shutil.rmtree(data_dir / "images" / val_people[0])
    shutil.copytree(data_dir / "images" / train_people[0], data_dir / "images" / "999999_female_Asian_33")
    log = _train(["--resume", str(run / "last.pth"), "--epochs", "2"])
    assert "warning: the data changed since this run started" in log
    assert f"people are gone" in log and val_people[0] in log and "999999_female_Asian_33" in log
    after = load_checkpoint(run / "last.pth")["split"]
    assert set(after["train"]) == set(split["train"])  # nobody new trains, nobody moved between the sides
    assert set(after["val"]) == {k for k in split["val"] if not k.startswith(val_people[0] + "/")}
    assert not {k.split("/")[0] for k in after["val"]} & set(train_people)


def test_resume_of_a_cross_validation_on_changed_data_stops(demo_root, tmp_path, single_thread, capsys):
    data_dir = _copy_data(demo_root, tmp_path / "train")
    base = [*TINY_TRAIN_ARGS, "--data_dir", str(data_dir), "--model_dir", str(tmp_path / "runs"), "--name", "cv",
            "--kfold", "2", "--fold", "all", "--epochs", "1"]
    _train(base)
    people = sorted(p.name for p in (data_dir / "images").iterdir())
    shutil.rmtree(data_dir / "images" / people[0])
    before = (tmp_path / "runs" / "cv" / "fold1" / "last.pth").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.cli.run(lambda: train.main(["--resume", str(tmp_path / "runs" / "cv" / "fold1" / "last.pth"),
                                          "--epochs", "2"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "the data changed since this cross-validation started" in err and "start it over" in err
    assert (tmp_path / "runs" / "cv" / "fold1" / "last.pth").read_bytes() == before


def test_resume_on_unchanged_data_says_nothing(demo_root, tmp_path, single_thread):
    base = [*TINY_TRAIN_ARGS, "--data_dir", str(demo_root / "train"), "--model_dir", str(tmp_path), "--name", "r"]
    _train([*base, "--epochs", "1"])
    log = _train(["--resume", str(tmp_path / "r"), "--epochs", "2"])
    assert "data changed" not in log and "resuming from" in log
