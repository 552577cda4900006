"""Label overrides (an audit.csv a reviewer kept): applied by dataset.discover, printed in its summary,
validated before any work, stored in config.json and every checkpoint of train.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskcls import cli
import dataset as data
import train
from maskcls.checkpoint import load_checkpoint
from maskcls import task
from maskcls import overrides

pytestmark = pytest.mark.usefixtures("single_thread")
HEADER = "person,image,kind,score,label,suggested\n"


@pytest.fixture(scope="module")
def people(demo_root) -> list[str]:
    return sorted({s.person for s in data.discover(demo_root / "train", verbose=False)})


def overrides_file(tmp_path: Path, *rows: str, name: str = "audit.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def test_discover_applies_each_kind(demo_root, people, tmp_path, capsys):
    a, b, c, d = people[:4]
    gender_a, age_b = a.split("_")[1], int(b.split("_")[3])
    other = "female" if gender_a == "male" else "male"
    path = overrides_file(tmp_path, f"{a},,gender,9.1,{gender_a},{other}", f"{b},,age,5.0,{age_b},{age_b + 30}",
                          f"{c},normal.jpg,mask_swap,3.2,normal,incorrect_mask", f"{d},mask3.jpg,outlier,2.0,mask3,drop",
                          f"{c},incorrect_mask.jpg,mask_swap,1.0,incorrect_mask,normal")  # the same swap: counted once
    before = {(s.person, Path(s.path).name): s for s in data.discover(demo_root / "train", verbose=False)}
    after = {(s.person, Path(s.path).name): s for s in data.discover(demo_root / "train", label_overrides=path)}
    assert "label overrides: 1 gender, 1 age, 1 mask swap, 1 dropped" in capsys.readouterr().out
    assert set(before) - set(after) == {(d, "mask3.jpg")}  # dropped; the photo itself is untouched
    for key, s in after.items():
        old = before[key]
        if key[0] == a:
            assert s.gender == task.GENDERS[other] and (s.mask, s.age) == (old.mask, old.age)
        elif key[0] == b:
            assert s.age == age_b + 30 and (s.mask, s.gender) == (old.mask, old.gender)
        elif key == (c, "normal.jpg"):
            assert (s.kind, s.mask) == ("incorrect_mask", 1) and s.path == old.path
        elif key == (c, "incorrect_mask.jpg"):
            assert (s.kind, s.mask) == ("normal", 2)
        else:
            assert s == old
    assert data.discover(demo_root / "train", verbose=False, label_overrides=overrides_file(tmp_path, name="e.csv")) \
        == list(before.values())  # a reviewed file with every row deleted changes nothing


@pytest.mark.parametrize("row, fragment", [
    ("{p},,color,1,x,y", "unknown kind 'color'"),
    ("{p},,gender,1,male,other", "gender must be male or female"),
    ("{p},,age,1,40,forty", "age must be a number"),
    ("{p},,age,1,40,400", "between 0 and 130"),
    ("{p},normal.jpg,gender,1,male,female", "about the whole person"),
    ("{p},,outlier,1,mask1,drop", "needs the image's file name"),
    ("{p},mask1.jpg,outlier,1,mask1,keep", "suggested value is drop"),
    ("{p},normal.jpg,mask_swap,1,normal,normal", "the other image's kind"),
    ("{p},photo.jpg,mask_swap,1,photo,normal", "not a mask image"),
    ("nobody_male_Asian_30,,age,1,30,40", "no such person folder"),
    ("{p},mask9.jpg,outlier,1,mask9,drop", "no image 'mask9.jpg'"),
    ("{p},,age,1,99,40", "the data says age"),
    ("{p},,gender,1,{wrong},{g}", "the data says"),
])
def test_bad_rows_are_one_error_line(demo_root, people, tmp_path, row, fragment):
    p = people[0]
    g = p.split("_")[1]
    path = overrides_file(tmp_path, row.format(p=p, g=g, wrong="female" if g == "male" else "male"))
    with pytest.raises(cli.DataError) as e:
        data.discover(demo_root / "train", verbose=False, label_overrides=path)
    assert fragment in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_files_are_one_error_line(demo_root, people, tmp_path):
    p, q = people[:2]
    cases = {"missing.csv": (None, "not found"),
             "columns.csv": ("person,kind\nx,gender\n", "lack the column(s) image, suggested"),
             "conflict.csv": (HEADER + f"{p},,age,1,,40\n{p},,age,1,,50\n", "a second, different age row"),
             "twice.csv": (HEADER + f"{q},normal.jpg,mask_swap,1,normal,incorrect_mask\n"
                                    f"{q},normal.jpg,mask_swap,1,normal,mask1\n", "in two different mask swaps")}
    for name, (text, fragment) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(cli.DataError, match=None) as e:
            overrides.read_label_overrides(tmp_path / name)
        assert fragment in str(e.value), (name, str(e.value))


def test_train_rejects_bad_overrides_before_any_work(demo_root, people, tiny_train_args, tmp_path, capsys):
    base = [*tiny_train_args, "--data_dir", str(demo_root / "train"), "--model_dir", str(tmp_path / "m")]
    bad_kind = overrides_file(tmp_path, f"{people[0]},,colour,1,,x", name="kind.csv")
    unknown = overrides_file(tmp_path, "nobody_male_Asian_30,,age,1,30,40", name="person.csv")
    for path, fragment in ((tmp_path / "absent.csv", "label overrides file not found"),
                           (bad_kind, "unknown kind 'colour'"), (unknown, "no such person folder")):
        assert cli.call(lambda: train.main([*base, "--label_overrides", str(path)])) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
        assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())  # no run folder


def test_overrides_recorded_in_config_and_checkpoints(demo_root, people, tiny_train, tmp_path_factory):
    a, b = people[:2]
    age_b = int(b.split("_")[3])
    path = overrides_file(tmp_path_factory.mktemp("ov"), f"{a},mask1.jpg,outlier,1,mask1,drop",
                          f"{b},,age,1,{age_b},{age_b + 1}")
    run, out = tiny_train("--label_overrides", str(path), "--epochs", "1")
    assert "label overrides: 0 gender, 1 age, 0 mask swap, 1 dropped" in out
    assert json.loads((run / "config.json").read_text())["label_overrides"] == str(path)
    expected = [{"person": a, "image": "mask1.jpg", "kind": "outlier", "label": "mask1", "suggested": "drop"},
                {"person": b, "image": "", "kind": "age", "label": str(age_b), "suggested": str(age_b + 1)}]
    for name in ("best_f1.pth", "last.pth"):
        assert load_checkpoint(run / name)["label_overrides"] == expected
    assert "data: 72 people, 503 images" in out


def test_checkpoints_without_overrides_record_none(trained_run):
    assert load_checkpoint(trained_run / "best_f1.pth")["label_overrides"] == []
