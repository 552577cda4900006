"""evaluation.py: sklearn-equal scores, pairing by ImageID, JSON output, one-line errors with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluation  # noqa: E402


def write_csv(path: Path, ids, labels, header: str = "ImageID,ans") -> Path:
    path.write_text(header + "\n" + "".join(f"{i},{a}\n" for i, a in zip(ids, labels)))
    return path


@pytest.fixture
def pair(tmp_path):
    """gt.csv and output.csv (shuffled rows) in separate folders; returns (gt, pred, ids, y_true, y_pred)."""
    rng = np.random.default_rng(0)
    n = 240
    ids = [f"{rng.integers(1 << 40):x}.jpg" for _ in range(n)]
    t = rng.integers(0, 18, n)
    p = np.where(rng.random(n) < 0.6, t, rng.integers(0, 18, n))
    (tmp_path / "gt").mkdir()
    (tmp_path / "out").mkdir()
    gt = write_csv(tmp_path / "gt" / "gt.csv", ids, t)
    order = rng.permutation(n)
    pred = write_csv(tmp_path / "out" / "output.csv", [ids[i] for i in order], p[order])
    return gt, pred, ids, t, p


def run_cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("SM_GROUND_TRUTH_DIR", "SM_OUTPUT_DATA_DIR")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ROOT / "evaluation.py"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_scores_equal_sklearn_and_join_by_id(pair):
    gt, pred, ids, t, p = pair
    s = evaluation.evaluate_files(gt, pred)
    assert s["n"] == len(ids)
    assert s["accuracy"] == pytest.approx(np.mean(t == p))
    assert s["f1"] == pytest.approx(f1_score(t, p, average="macro"))
    assert s["f1_mask"] == pytest.approx(f1_score(t // 6, p // 6, average="macro"))
    assert s["f1_gender"] == pytest.approx(f1_score((t // 3) % 2, (p // 3) % 2, average="macro"))
    assert s["f1_age"] == pytest.approx(f1_score(t % 3, p % 3, average="macro"))
    # pairing by row position would score the shuffled file far lower
    assert s["accuracy"] > 0.5
    assert f1_score(t, np.loadtxt(pred, delimiter=",", skiprows=1, usecols=1, dtype=int), average="macro") < 0.2
    # the same rows in gt order give the same result
    same = write_csv(pred.parent / "ordered.csv", ids, p)
    assert evaluation.evaluate_files(gt, same) == s


def test_cli_env_defaults_and_json(pair):
    gt, pred, ids, t, p = pair
    r = run_cli("--json", env_extra={"SM_GROUND_TRUTH_DIR": str(gt.parent), "SM_OUTPUT_DATA_DIR": str(pred.parent)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # the whole stdout is one JSON object
    for key in ("accuracy", "f1", "f1_mask", "f1_gender", "f1_age"):
        assert 0.0 <= out[key] <= 1.0
    assert out["f1"] == pytest.approx(f1_score(t, p, average="macro"))
    assert out["n"] == len(ids)
    assert len(out["per_class"]) == 18 and len(out["confusion_matrix"]) == 18
    assert sum(map(sum, out["confusion_matrix"])) == len(ids)


def test_cli_report(pair, capsys):
    gt, pred, ids, t, p = pair
    assert evaluation.main(["--gt", str(gt), "--pred", str(pred)]) == 0
    text = capsys.readouterr().out
    f1 = f1_score(t, p, average="macro")
    assert f"macro F1:     {f1:.4f}" in text
    assert f"accuracy:     {np.mean(t == p):.4f}" in text
    assert "F1 mask " in text and "| gender " in text and "| age " in text
    assert "17  not wear/female/>=60" in text
    lines = text.splitlines()
    start = lines.index("confusion matrix:") + 2
    cm = np.array([list(map(int, line.split()[1:])) for line in lines[start:start + 18]])
    assert cm.shape == (18, 18) and cm.sum() == len(ids) and np.trace(cm) == int(np.sum(t == p))


def test_class_17_predicted_but_absent(tmp_path):
    ids = [f"{i}.jpg" for i in range(6)]
    gt = write_csv(tmp_path / "gt.csv", ids, [0, 0, 1, 1, 2, 2])
    pred = write_csv(tmp_path / "pred.csv", ids, [0, 0, 1, 1, 2, 17])
    s = evaluation.evaluate_files(gt, pred)
    assert s["f1"] == pytest.approx(f1_score([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 17], average="macro"))
    assert s["f1"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)


def test_lenient_but_exact_parsing(tmp_path):
    # BOM, spaces, extra columns, a trailing blank line and "3.0" written by a float column are fine
    gt = tmp_path / "gt.csv"
    gt.write_text("\ufeffImageID, ans ,extra\na.jpg, 3 ,x\nb.jpg,17,y\n\n", encoding="utf-8")
    pred = tmp_path / "pred.csv"
    pred.write_text("ans,ImageID\n3.0,a.jpg\n16,b.jpg\n")
    s = evaluation.evaluate_files(gt, pred)
    assert s["accuracy"] == 0.5 and s["n"] == 2


BAD_CASES = {
    # name: (gt text, pred text, expected message fragment, file that is named)
    "missing column": ("ImageID,label\na,1\n", "ImageID,ans\na,1\n", "missing column ans", "gt"),
    "empty file": ("", "ImageID,ans\na,1\n", "empty file", "gt"),
    "no rows": ("ImageID,ans\n", "ImageID,ans\n", "no rows", "gt"),
    "duplicate gt": ("ImageID,ans\na,1\nb,2\na,1\n", "ImageID,ans\na,1\nb,2\n",
                     "duplicate ImageID 'a' on lines 2 and 4", "gt"),
    "duplicate pred": ("ImageID,ans\na,1\nb,2\n", "ImageID,ans\na,1\nb,2\nb,3\n", "duplicate ImageID 'b'", "pred"),
    "missing id": ("ImageID,ans\na,1\nb,2\nc,3\n", "ImageID,ans\na,1\nc,3\n",
                   "1 ImageID(s) of the ground truth missing from the predictions: 'b'", "pred"),
    "extra id": ("ImageID,ans\na,1\n", "ImageID,ans\na,1\nz,2\n",
                 "1 ImageID(s) in the predictions not in the ground truth: 'z'", "pred"),
    "label 18": ("ImageID,ans\na,1\nb,2\n", "ImageID,ans\na,1\nb,18\n", "label(s) outside 0-17, first 18 on line 3",
                 "pred"),
    "label -1": ("ImageID,ans\na,-1\n", "ImageID,ans\na,1\n", "outside 0-17", "gt"),
    "label 3.5": ("ImageID,ans\na,1\n", "ImageID,ans\na,3.5\n", "non-integer label(s) in column ans, first '3.5'",
                  "pred"),
    "label abc": ("ImageID,ans\na,1\n", "ImageID,ans\na,abc\n", "first 'abc' on line 2", "pred"),
    "label empty": ("ImageID,ans\na,\n", "ImageID,ans\na,1\n", "non-integer label(s) in column ans, first ''", "gt"),
    "empty id": ("ImageID,ans\n,1\n", "ImageID,ans\na,1\n", "empty ImageID on line 2", "gt"),
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "ImageID,ans\na,1\n", "cannot read CSV", "gt"),
}


def _write_case(tmp_path, gt_text, pred_text):
    paths = {}
    for name, text in (("gt", gt_text), ("pred", pred_text)):
        path = tmp_path / f"{name}.csv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        paths[name] = path
    return paths


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_main(case, tmp_path, capsys):
    gt_text, pred_text, fragment, named = BAD_CASES[case]
    paths = _write_case(tmp_path, gt_text, pred_text)
    assert evaluation.main(["--gt", str(paths["gt"]), "--pred", str(paths["pred"]), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err
    assert err.startswith("error: ") and fragment in err, err
    assert err.endswith(f"({paths[named]})")
    with pytest.raises(evaluation.EvaluationError) as info:  # the library raises the same message
        evaluation.evaluate_files(paths["gt"], paths["pred"])
    assert isinstance(info.value, ValueError) and f"error: {info.value}" == err


def test_missing_file_and_unset_env(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SM_GROUND_TRUTH_DIR", raising=False)
    monkeypatch.delenv("SM_OUTPUT_DATA_DIR", raising=False)
    pred = write_csv(tmp_path / "output.csv", ["a"], [1])
    assert evaluation.main(["--pred", str(pred)]) == 2
    assert capsys.readouterr().err == "error: no ground truth: pass --gt or set SM_GROUND_TRUTH_DIR\n"
    monkeypatch.setenv("SM_GROUND_TRUTH_DIR", str(tmp_path))
    assert evaluation.main([]) == 2
    assert capsys.readouterr().err == "error: no predictions: pass --pred or set SM_OUTPUT_DATA_DIR\n"
    # env default: $SM_GROUND_TRUTH_DIR/gt.csv does not exist here
    assert evaluation.main(["--pred", str(pred)]) == 2
    assert capsys.readouterr().err == f"error: file not found ({tmp_path / 'gt.csv'})\n"
    assert evaluation.main(["--gt", str(tmp_path), "--pred", str(pred)]) == 2
    # a folder is accepted when it holds gt.csv (issue 18 item 5); this one does not
    assert capsys.readouterr().err == f"error: not a file and holds no gt.csv ({tmp_path})\n"
    with pytest.raises(evaluation.EvaluationError, match="file not found"):
        evaluation.evaluate_files(tmp_path / "nope.csv", pred)


def test_bad_input_subprocess(tmp_path):
    paths = _write_case(tmp_path, "ImageID,ans\na,1\nb,2\n", "ImageID,ans\na,1\nb,x\n")
    r = run_cli("--gt", str(paths["gt"]), "--pred", str(paths["pred"]))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == f"error: 1 non-integer label(s) in column ans, first 'x' on line 3 ({paths['pred']})\n"
    r = run_cli("--pred", str(paths["pred"]))  # no --gt and no SM_GROUND_TRUTH_DIR
    assert r.returncode == 2
    assert r.stderr.strip() == "error: no ground truth: pass --gt or set SM_GROUND_TRUTH_DIR"
    assert "Traceback" not in r.stderr


def test_gt_and_pred_may_be_folders(pair, capsys):
    """Issue 18 item 5: --gt DIR / --pred DIR take the folders SM_GROUND_TRUTH_DIR and
    SM_OUTPUT_DATA_DIR name, holding gt.csv and output.csv."""
    gt, pred, ids, t, p = pair
    assert evaluation.main(["--gt", str(gt.parent), "--pred", str(pred.parent), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == len(ids) and out["gt"] == str(gt) and out["pred"] == str(pred)
    assert evaluation.evaluate_files(gt.parent, pred.parent) == evaluation.evaluate_files(gt, pred)
    pred.unlink()
    assert evaluation.main(["--gt", str(gt.parent), "--pred", str(pred.parent)]) == 2
    assert capsys.readouterr().err == f"error: not a file and holds no output.csv ({pred.parent})\n"


def test_many_missing_ids_are_summarised(tmp_path):
    ids = [f"{i}.jpg" for i in range(50)]
    gt = write_csv(tmp_path / "gt.csv", ids, [1] * 50)
    pred = write_csv(tmp_path / "pred.csv", ids[:2], [1, 1])
    with pytest.raises(evaluation.EvaluationError) as info:
        evaluation.evaluate_files(gt, pred)
    assert "48 ImageID(s)" in str(info.value) and "'2.jpg', '3.jpg', '4.jpg', and 45 more" in str(info.value)
    assert "'10.jpg'" not in str(info.value)



def test_ground_truth_of_one_class_warns(tmp_path, capsys):
    """--gt eval/info.csv (ans 0 everywhere, a placeholder) scores without complaint otherwise."""
    ids = [f"{i}.jpg" for i in range(4)]
    gt = write_csv(tmp_path / "info.csv", ids, [0, 0, 0, 0])
    pred = write_csv(tmp_path / "output.csv", ids, [0, 4, 9, 0])
    assert evaluation.main(["--gt", str(gt), "--pred", str(pred), "--tracking_uri", "none"]) == 0
    assert f"warning: every ground-truth label in {gt} is class 0" in capsys.readouterr().err
    real = write_csv(tmp_path / "gt.csv", ids, [0, 4, 9, 1])
    assert evaluation.main(["--gt", str(real), "--pred", str(pred), "--tracking_uri", "none"]) == 0
    assert "warning" not in capsys.readouterr().err
