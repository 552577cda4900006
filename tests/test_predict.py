"""predict.py (issue 15 item 4): single files, folders, soft vote, the mask + gender-age pair,
--json, bad files among good ones; its class is inference.py's class for the same image."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from maskcls import cli
import dataset as data
from maskcls import imaging
import predict
from tests.test_export import few_eval, infer, offsets_run  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")
NAME = re.compile(r"^(wear|incorrect|not wear) / (male|female) / (<30|30-59|>=60)$")


def eval_paths(eval_dir: Path) -> list[str]:
    return [str(eval_dir / "images" / i) for i in pd.read_csv(eval_dir / "info.csv")["ImageID"]]


def run_predict(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what came before
    code = cli.call(lambda: predict.main([*map(str, args)]))
    out, err = capsys.readouterr()
    return code, out, err


def predict_json(capsys, *args) -> dict:
    code, out, err = run_predict(capsys, "--json", *args)
    assert code == 0, err
    return json.loads(out)  # stdout is the document alone


def text_blocks(out: str) -> dict[str, list[str]]:
    """predict.py's text output -> {image path: its indented lines} (model lines have none)."""
    blocks: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("  "):
            blocks[last].append(line.strip())
        else:
            last = line
            blocks[last] = []
    return {k: v for k, v in blocks.items() if v}


def test_single_files_print_inference_class_topk_and_readings(offsets_run, few_eval, tmp_path, capsys):
    ans, _ = infer(few_eval, tmp_path / "inf", "--model_dir", offsets_run)
    paths = eval_paths(few_eval)[:4]
    code, out, err = run_predict(capsys, "--model_dir", offsets_run, *paths)  # images after nargs="+"
    assert code == 0, err
    assert "applying the checkpoints' per-class decision offsets" in out
    blocks = text_blocks(out)
    assert list(blocks) == paths
    for i, path in enumerate(paths):
        lines = blocks[path]
        top = [re.fullmatch(r"(\d+)  (.+?) +(\d\.\d{3})", line) for line in lines[:3]]
        assert all(top) and len(lines) == 6, lines
        assert int(top[0][1]) == ans[i]  # the first class is inference.py's
        assert all(NAME.match(m[2]) for m in top)
        assert [float(m[3]) for m in top] == sorted((float(m[3]) for m in top), reverse=True)
        for field, line in zip(("mask", "gender", "age"), lines[3:]):
            values = [float(v) for v in re.findall(r"\d\.\d{3}", line)]
            assert line.startswith(field + ":") and abs(sum(values) - 1) < 2e-3, line


def test_folder_soft_vote_json_equals_inference(trained_run, multi_run, few_eval, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    paths = eval_paths(few_eval)[:5]
    for i, p in enumerate(paths):
        shutil.copy(p, folder / ("sub" if i % 2 else ".") / Path(p).name)
    shutil.copy(paths[0], folder / ".hidden" / "x.jpg")
    shutil.copy(paths[0], folder / "._apple.jpg")
    (folder / "notes.txt").write_text("not an image")
    runs = [trained_run, multi_run[0]]
    doc = predict_json(capsys, "--model_dir", *runs, folder, "--topk", "2")
    found = {Path(r["path"]).name: r for r in doc["predictions"]}
    assert sorted(found) == sorted(Path(p).name for p in paths) and doc["skipped"] == []

    ans, _ = infer(few_eval, tmp_path / "inf", "--model_dir", *runs)
    for i, p in enumerate(paths):
        row = found[Path(p).name]
        probs = np.array(row["probs"])
        assert row["class"] == ans[i] == probs.argmax() and row["name"] == doc["classes"][row["class"]]
        assert len(row["top"]) == 2 and row["top"][0]["class"] == row["class"]
        assert abs(probs.sum() - 1) < 1e-5
        assert row["mask"]["wear"] == pytest.approx(probs[:6].sum(), abs=1e-6)
        assert row["gender"]["female"] == pytest.approx(probs.reshape(3, 2, 3)[:, 1].sum(), abs=1e-6)
        assert list(row["age"]) == ["<30", "30-59", ">=60"]


def test_mask_genderage_pair(mask_run, genderage_run, few_eval, tmp_path, capsys):
    pair = ["--mask_model_dir", mask_run[0], "--genderage_model_dir", genderage_run[0]]
    paths = eval_paths(few_eval)[:3]
    doc = predict_json(capsys, *pair, *paths)
    ans, _ = infer(few_eval, tmp_path / "inf", "--isEnsemble", "True", *pair)
    assert ans[:3].tolist() == [r["class"] for r in doc["predictions"]]
    assert doc["classes"][4] == "wear/female/30-59" and doc["offsets_applied"] is False


def test_bad_files_one_line_each_and_the_rest_predicted(trained_run, few_eval, tmp_path, capsys):
    good = eval_paths(few_eval)[:2]
    garbage, empty, missing = tmp_path / "garbage.jpg", tmp_path / "empty.png", tmp_path / "missing.jpg"
    garbage.write_bytes(b"not a jpeg at all")
    empty.write_bytes(b"")
    code, out, err = run_predict(capsys, good[0], garbage, "--model_dir", trained_run, empty, missing, good[1])
    assert code == 0
    assert list(text_blocks(out)) == good
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("warning: ") for line in lines), err
    for line, path in zip(lines, (garbage, empty, missing)):
        assert str(path) in line

    code, out, err = run_predict(capsys, "--model_dir", trained_run, garbage, missing)
    assert code == 2 and err.splitlines()[-1].startswith("error: no image to predict") and len(err.splitlines()) == 3
    code, _, err = run_predict(capsys, "--model_dir", trained_run)
    assert code == 2 and err.startswith("error: no images") and err.count("\n") == 1


def undecodable_jpeg(src: str, dst: Path) -> Path:
    """`src` saved as a progressive JPEG with reserved markers (FF 02) written over its first scan's
    entropy-coded data: header and end marker intact, so it passes check_image, yet neither OpenCV
    (libjpeg reads every scan of a progressive file before any output) nor PIL decodes it."""
    buf = io.BytesIO()
    Image.open(src).save(buf, "JPEG", quality=90, progressive=True)
    raw = bytearray(buf.getvalue())
    sos = raw.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(raw[sos + 2:sos + 4], "big")  # the scan's first data byte
    raw[start + 10:start + 26] = b"\xff\x02" * 8
    dst.write_bytes(raw)
    return dst


def test_undecodable_jpeg_is_skipped_and_the_rest_predicted(trained_run, few_eval, tmp_path, capsys):
    good = eval_paths(few_eval)[:2]
    bad = undecodable_jpeg(good[0], tmp_path / "corrupt.jpg")
    assert imaging.check_image(bad) is None and cv2.imread(str(bad)) is None  # the quick check cannot tell
    with pytest.raises(cli.DataError, match="cannot decode image"):
        imaging.load_image(bad)
    code, out, err = run_predict(capsys, "--model_dir", trained_run, good[0], bad, good[1])
    assert code == 0, err
    assert list(text_blocks(out)) == good
    assert err == f"warning: cannot decode image: {bad} (skipped)\n"
    doc = predict_json(capsys, "--model_dir", trained_run, bad, *good)
    assert [r["path"] for r in doc["predictions"]] == good
    assert doc["skipped"] == [{"path": str(bad), "reason": "cannot decode image"}]
    code, _, err = run_predict(capsys, "--model_dir", trained_run, bad)
    assert code == 2 and err.splitlines()[-1] == "error: no image to predict (1 input(s) skipped)"


def test_bad_weights_workers_and_device_are_one_error_line(trained_run, few_eval, capsys, monkeypatch):
    image = eval_paths(few_eval)[0]
    for weights, message in ((["0", "0"], "--weights are all 0: give at least one model a weight > 0"),
                             (["-1", "2"], "--weights must be finite and >= 0, got -1.0")):
        code, out, err = run_predict(capsys, "--model_dir", trained_run, trained_run, image, "--weights", *weights)
        assert code == 2 and err == f"error: {message}\n" and "nan" not in out, (weights, out, err)
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--model_dir", str(trained_run), image, "--num_workers", "-1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("argument --num_workers: must be an integer >= 0, got -1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    code, out, err = run_predict(capsys, "--model_dir", trained_run, image, "--device", "cuda")
    assert code == 2 and err == ("error: --device cuda: no CUDA device is available on this machine; "
                                 "use --device cpu or auto\n"), err
