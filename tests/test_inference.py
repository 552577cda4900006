"""inference.py (single model, --state, TTA, soft vote, mask + gender-age ensemble, bad input) and
evaluation.py on the tiny models conftest trains once per session."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

from maskcls import cli
import dataset as data
import evaluation
import inference
from maskcls.checkpoint import CheckpointError, atomic_save, build_model, load_checkpoint
from maskcls import imaging
from maskcls import augment
from maskcls import predictor

pytestmark = pytest.mark.usefixtures("single_thread")


def infer(out_dir: Path, *args: str) -> Path:
    """inference.main in-process; returns the output folder."""
    assert inference.main([*map(str, args), "--output_dir", str(out_dir), "--num_workers", "0"]) == 0
    return out_dir


def read_probs(path: Path) -> tuple[list[str], np.ndarray]:
    frame = pd.read_csv(path)
    cols = [c for c in frame.columns if c != "ImageID"]
    assert cols == [f"p{i}" for i in range(len(cols))]
    return frame["ImageID"].tolist(), frame[cols].to_numpy(np.float64)


def read_ans(path: Path) -> tuple[list[str], np.ndarray]:
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["ImageID", "ans"]
    return frame["ImageID"].tolist(), frame["ans"].to_numpy()


def info_ids(eval_dir: Path) -> list[str]:
    return pd.read_csv(eval_dir / "info.csv")["ImageID"].tolist()


@pytest.fixture(scope="module")
def single(trained_run, demo_root, tmp_path_factory) -> Path:
    """Output folder of the 18-class model on the demo eval set (default --state best_f1)."""
    return infer(tmp_path_factory.mktemp("single"), "--data_dir", demo_root / "eval", "--model_dir", trained_run)


# --------------------------------------------------------------------------- one model
def test_output_rows_follow_info_csv_and_probs_are_distributions(trained_run, single, demo_root, tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "images").symlink_to(demo_root / "eval" / "images")
    info = pd.read_csv(demo_root / "eval" / "info.csv").sample(frac=1.0, random_state=3)  # a new row order
    info.to_csv(eval_dir / "info.csv", index=False)
    out = infer(tmp_path / "out", "--data_dir", eval_dir, "--model_dir", trained_run)

    ids, ans = read_ans(out / "output.csv")
    prob_ids, probs = read_probs(out / "output_probs.csv")
    assert ids == prob_ids == info["ImageID"].tolist()
    assert probs.shape == (len(info), 18) and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (ans == probs.argmax(1)).all()
    # the same images in info.csv's own order: the same prediction for each ImageID
    base_ids, base_probs = read_probs(single / "output_probs.csv")
    assert base_ids == info_ids(demo_root / "eval") and base_ids != ids
    by_id = dict(zip(base_ids, base_probs))
    np.testing.assert_allclose(probs, np.stack([by_id[i] for i in ids]), atol=1e-6)


def test_evaluation_macro_f1_equals_sklearn(single, demo_root, capsys, monkeypatch):
    gt = pd.read_csv(demo_root / "gt" / "gt.csv")
    pred = pd.read_csv(single / "output.csv")
    joined = gt.merge(pred, on="ImageID", suffixes=("_gt", "_pred"), validate="one_to_one")
    assert len(joined) == len(gt) and set(joined["ans_gt"]) == set(range(18))
    expected_f1 = f1_score(joined["ans_gt"], joined["ans_pred"], average="macro")

    assert evaluation.main(["--gt", str(demo_root / "gt" / "gt.csv"), "--pred", str(single / "output.csv"),
                            "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["f1"] == pytest.approx(expected_f1, abs=1e-12)
    assert scores["accuracy"] == pytest.approx(float((joined["ans_gt"] == joined["ans_pred"]).mean()), abs=1e-12)

    monkeypatch.setenv("SM_GROUND_TRUTH_DIR", str(demo_root / "gt"))  # the competition's defaults
    monkeypatch.setenv("SM_OUTPUT_DATA_DIR", str(single))
    assert evaluation.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["f1"] == scores["f1"]


def test_state_selects_the_checkpoint_file(trained_run, demo_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # Mark best.pth and best_f1.pth so that each predicts one class everywhere.
    for name, cls in (("best.pth", 5), ("best_f1.pth", 11)):
        ckpt = load_checkpoint(run / name)
        bias = next(k for k, v in ckpt["state_dict"].items() if k.endswith("bias") and v.shape == (18,))
        ckpt["state_dict"][bias][cls] += 100.0
        atomic_save(ckpt, run / name)
    eval_dir = demo_root / "eval"
    for state, cls in (("best", 5), ("best.pth", 5), ("best_f1", 11), ("best_f1.pth", 11), (None, 11)):
        out = infer(tmp_path / f"out-{state}", "--data_dir", eval_dir, "--model_dir", run,
                    *(["--state", state] if state else []))
        assert (read_ans(out / "output.csv")[1] == cls).all(), state
    last = read_probs(infer(tmp_path / "out-last", "--data_dir", eval_dir, "--model_dir", run, "--state", "last")
                      / "output_probs.csv")[1]
    expected = predictor.predict_probs(load_checkpoint(run / "last.pth"), data.read_eval_info(eval_dir)[1],
                                       progress=False)
    np.testing.assert_allclose(last, expected, atol=1e-6)
    assert len(set(last.argmax(1))) > 1
    with pytest.raises(CheckpointError, match="unknown --state"):
        infer(tmp_path / "bad", "--data_dir", eval_dir, "--model_dir", run, "--state", "first")


def test_hflip_tta_changes_probabilities_not_format(trained_run, demo_root, single, tmp_path):
    tta = infer(tmp_path, "--data_dir", demo_root / "eval", "--model_dir", trained_run, "--tta", "hflip")
    ids, probs = read_probs(tta / "output_probs.csv")
    base_ids, base = read_probs(single / "output_probs.csv")
    assert ids == base_ids and probs.shape == base.shape
    assert pd.read_csv(tta / "output.csv").columns.tolist() == ["ImageID", "ans"]
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.abs(probs - base).max() > 1e-4


def test_hflip_tta_is_mirror_invariant(trained_run, tmp_path):
    """TTA averages an image with its mirror, so a mirrored input gives the same answer; flipping
    the wrong axis would not. Images at the model's input size skip resizing, so this is exact."""
    ckpt = load_checkpoint(trained_run / "best_f1.pth")
    h, w = ckpt["preprocess"]["resize"]
    rng = np.random.default_rng(0)
    paths, mirrored = [], []
    for i in range(6):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for arr, bucket in ((img, paths), (img[:, ::-1], mirrored)):
            path = tmp_path / f"{'m' if bucket is mirrored else 'p'}{i}.png"
            cv2.imwrite(str(path), np.ascontiguousarray(arr[:, :, ::-1]))
            bucket.append(str(path))
    plain = predictor.predict_probs(ckpt, paths, progress=False)
    a = predictor.predict_probs(ckpt, paths, tta="hflip", progress=False)
    b = predictor.predict_probs(ckpt, mirrored, tta="hflip", progress=False)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(plain - predictor.predict_probs(ckpt, mirrored, progress=False)).max() > 1e-4


# --------------------------------------------------------------------------- ensembles
def test_mask_genderage_ensemble_is_the_product_of_probabilities(mask_run, genderage_run, trained_run, demo_root,
                                                                 tmp_path, capsys):
    out = infer(tmp_path, "--data_dir", demo_root / "eval", "--isEnsemble", "True",
                "--mask_model_dir", mask_run[0], "--genderage_model_dir", genderage_run[0])
    for stem in ("output_mask", "output_genderAge", "output_ensemble", "output"):
        assert (out / f"{stem}.csv").is_file() and (out / f"{stem}_probs.csv").is_file(), stem
    ids = info_ids(demo_root / "eval")
    mask_ids, p_mask = read_probs(out / "output_mask_probs.csv")
    ga_ids, p_ga = read_probs(out / "output_genderAge_probs.csv")
    assert mask_ids == ga_ids == ids and p_mask.shape == (len(ids), 3) and p_ga.shape == (len(ids), 6)
    assert (read_ans(out / "output_mask.csv")[1] == p_mask.argmax(1)).all()
    assert (read_ans(out / "output_genderAge.csv")[1] == p_ga.argmax(1)).all()

    joint = p_mask[:, :, None] * p_ga[:, None, :]  # [N, mask, gender*3 + age]
    m, g = np.unravel_index(joint.reshape(len(ids), -1).argmax(1), (3, 6))
    expected = m * 6 + g  # class = mask * 6 + gender * 3 + age
    for stem in ("output", "output_ensemble"):
        got_ids, ans = read_ans(out / f"{stem}.csv")
        assert got_ids == ids and (ans == expected).all(), stem
    np.testing.assert_allclose(read_probs(out / "output_probs.csv")[1].sum(1), 1.0, atol=1e-5)
    capsys.readouterr()
    infer(out, "--data_dir", demo_root / "eval", "--model_dir", trained_run)  # a plain run into the same folder
    assert (f"note: {out} also holds output_mask.csv, output_genderAge.csv, output_ensemble.csv from an earlier "
            f"--isEnsemble run; this run's answers are output.csv") in capsys.readouterr().out


def test_soft_vote_is_the_mean_of_single_model_probabilities(trained_run, multi_run, single, demo_root, tmp_path):
    eval_dir = demo_root / "eval"
    p_a = read_probs(single / "output_probs.csv")[1]
    p_b = read_probs(infer(tmp_path / "b", "--data_dir", eval_dir, "--model_dir", multi_run[0])
                     / "output_probs.csv")[1]
    vote = infer(tmp_path / "vote", "--data_dir", eval_dir, "--model_dir", trained_run, multi_run[0])
    ids, p_vote = read_probs(vote / "output_probs.csv")
    assert ids == info_ids(eval_dir)
    np.testing.assert_allclose(p_vote, (p_a + p_b) / 2, atol=1e-7)
    assert (read_ans(vote / "output.csv")[1] == p_vote.argmax(1)).all()
    weighted = infer(tmp_path / "w", "--data_dir", eval_dir, "--model_dir", trained_run, multi_run[0],
                     "--weights", "3", "1")
    np.testing.assert_allclose(read_probs(weighted / "output_probs.csv")[1], (3 * p_a + p_b) / 4, atol=1e-7)


def test_geometric_vote_is_the_renormalised_weighted_mean_of_log_probabilities(trained_run, multi_run, single,
                                                                                 demo_root, tmp_path):
    eval_dir = demo_root / "eval"
    p_a = read_probs(single / "output_probs.csv")[1]
    p_b = read_probs(infer(tmp_path / "b", "--data_dir", eval_dir, "--model_dir", multi_run[0])
                     / "output_probs.csv")[1]
    vote = infer(tmp_path / "g", "--data_dir", eval_dir, "--model_dir", trained_run, multi_run[0],
                 "--weights", "3", "1", "--vote", "geometric")
    expected = np.exp((3 * np.log(p_a) + np.log(p_b)) / 4)
    expected /= expected.sum(1, keepdims=True)
    p_vote = read_probs(vote / "output_probs.csv")[1]
    np.testing.assert_allclose(p_vote, expected, atol=1e-5)
    np.testing.assert_allclose(p_vote.sum(1), 1, atol=1e-5)
    assert (read_ans(vote / "output.csv")[1] == p_vote.argmax(1)).all()


def test_geometric_vote_picks_what_no_member_rules_out():
    """The mean follows the member surest of its favourite, even where the other member rules that class
    out; the product of experts picks the class both find plausible."""
    a = np.array([[0.9, 0.1, 0.0]])
    b = np.array([[0.001, 0.6, 0.399]])
    np.testing.assert_allclose(predictor.combine_probs([a, b], np.ones(2), "mean"), [[0.4505, 0.35, 0.1995]])
    geometric = predictor.combine_probs([a, b], np.ones(2), "geometric")
    assert geometric.argmax() == 1 and geometric[0, 2] < 1e-4
    np.testing.assert_allclose(geometric[0, :2], np.sqrt([0.0009, 0.06]) / np.sqrt([0.0009, 0.06]).sum(), rtol=1e-4)
    np.testing.assert_allclose(predictor.combine_probs([a, np.zeros((1, 3))], np.array([1.0, 0.0]), "geometric"),
                               a, atol=1e-9)  # a weight of 0 leaves the member out, even with zero probabilities
    with pytest.raises(predictor.InferenceError, match="unknown vote 'median'; known: mean, geometric"):
        predictor.combine_probs([a, b], np.ones(2), "median")


def test_geometric_vote_decides_each_head_of_multi_head_models_on_its_own():
    """Multi-head models give product probabilities (mask x gender x age): the geometric vote's class is
    each head's arg-max of the members' summed log-probabilities, so a member with a vague mask head and a
    sure age head neither blurs the other's mask nor loses its age."""
    rng = np.random.default_rng(0)
    heads = [[rng.dirichlet(np.ones(k) * c, size=50) for k in (3, 2, 3)] for c in (0.3, 3.0)]
    joints = [(m[:, :, None, None] * g[:, None, :, None] * a[:, None, None, :]).reshape(50, 18) for m, g, a in heads]
    pred = predictor.combine_probs(joints, np.ones(2), "geometric").argmax(1)
    per_head = [sum(np.log(h[i]) for h in heads).argmax(1) for i in range(3)]
    assert (pred == per_head[0] * 6 + per_head[1] * 3 + per_head[2]).all()


def test_multi_head_probabilities_are_the_product_of_heads(multi_run, demo_root, tmp_path):
    ckpt = load_checkpoint(multi_run[0] / "best_f1.pth")
    paths = data.read_eval_info(demo_root / "eval")[1][:16]
    probs = predictor.predict_probs(ckpt, paths, progress=False)
    pre = ckpt["preprocess"]
    store = imaging.ImageStore(paths, pre["resize"], pre["crop"])
    x = augment.BatchTransform(pre["mean"], pre["std"])(torch.stack([torch.from_numpy(store[i]).permute(2, 0, 1)
                                                                   for i in range(len(paths))]))
    with torch.inference_mode():
        logits = build_model(ckpt)(x)
    mask, gender, age = (torch.softmax(t, 1) for t in logits.split([3, 2, 3], dim=1))
    expected = torch.einsum("nm,ng,na->nmga", mask, gender, age).reshape(len(paths), 18)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)


# --------------------------------------------------------------------------- bad input
def _eval_dir(root: Path, demo_root: Path, n: int = 2) -> Path:
    """An eval folder with the first n demo images."""
    (root / "images").mkdir(parents=True)
    info = pd.read_csv(demo_root / "eval" / "info.csv").head(n)
    for image_id in info["ImageID"]:
        shutil.copy(demo_root / "eval" / "images" / image_id, root / "images" / image_id)
    info.to_csv(root / "info.csv", index=False)
    return root


def _bad_inputs(tmp_path: Path, demo_root: Path, trained_run: Path, mask_run: Path) -> dict[str, tuple[list, Path]]:
    """name -> (inference argv, the file the error must name)."""
    cases = {}
    missing = _eval_dir(tmp_path / "missing", demo_root)
    with open(missing / "info.csv", "a") as f:
        f.write("nope.jpg,0\n")
    cases["missing image"] = (["--data_dir", missing, "--model_dir", trained_run], missing / "images" / "nope.jpg")
    unreadable = _eval_dir(tmp_path / "unreadable", demo_root)
    (unreadable / "images" / "garbage.jpg").write_bytes(b"this is not an image")
    with open(unreadable / "info.csv", "a") as f:
        f.write("garbage.jpg,0\n")
    cases["unreadable image"] = (["--data_dir", unreadable, "--model_dir", trained_run],
                                 unreadable / "images" / "garbage.jpg")
    truncated = _eval_dir(tmp_path / "truncated", demo_root)
    victim = next((truncated / "images").iterdir())
    victim.write_bytes(victim.read_bytes()[:300])
    cases["truncated image"] = (["--data_dir", truncated, "--model_dir", trained_run], victim)
    for name, text in (("empty info.csv", ""), ("info.csv without rows", "ImageID,ans\n")):
        empty = _eval_dir(tmp_path / name.replace(" ", "_"), demo_root)
        (empty / "info.csv").write_text(text)
        cases[name] = (["--data_dir", empty, "--model_dir", trained_run], empty / "info.csv")
    good = _eval_dir(tmp_path / "good", demo_root)
    cases["18-class model as the mask model"] = (
        ["--data_dir", good, "--isEnsemble", "True", "--mask_model_dir", trained_run,
         "--genderage_model_dir", mask_run], trained_run / "best_f1.pth")
    return cases


def test_bad_inputs_raise_one_line_errors_naming_the_file(trained_run, mask_run, demo_root, tmp_path):
    for name, (argv, culprit) in _bad_inputs(tmp_path, demo_root, trained_run, mask_run[0]).items():
        with pytest.raises((predictor.InferenceError, cli.DataError, CheckpointError)) as err:
            infer(tmp_path / "out", *argv)
        message = str(err.value)
        assert "\n" not in message and str(culprit) in message, (name, message)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_every_bad_listed_image_is_named_at_once(trained_run, demo_root, tmp_path):
    eval_dir = _eval_dir(tmp_path / "eval", demo_root, n=3)
    images = sorted((eval_dir / "images").iterdir())
    images[0].write_bytes(images[0].read_bytes()[:300])
    images[2].write_bytes(b"")
    with pytest.raises(predictor.InferenceError) as err:
        infer(tmp_path / "out", "--data_dir", eval_dir, "--model_dir", trained_run)
    message = str(err.value)
    assert message.startswith("2 of 3 images listed in info.csv cannot be used")
    assert f"): {images[0]}" in message and f"empty file: {images[2]}" in message and str(images[1]) not in message
    with open(eval_dir / "info.csv", "a") as f:
        f.writelines(f"gone{i}.jpg,0\n" for i in range(7))
    with pytest.raises(cli.DataError, match=r"^7 of 10 images listed in info.csv cannot be used: not found: .*gone0.jpg"
                                             r".*gone4.jpg; and 2 more$"):
        infer(tmp_path / "out", "--data_dir", eval_dir, "--model_dir", trained_run)
    assert not (tmp_path / "out").exists()


def test_bad_input_cli_exits_2_with_one_line(trained_run, mask_run, demo_root, tmp_path, cli):
    cases = _bad_inputs(tmp_path, demo_root, trained_run, mask_run[0])
    procs = {name: cli(["inference.py", *cases[name][0], "--output_dir", tmp_path / "out", "--num_workers", "0"])
             for name in ("missing image", "18-class model as the mask model")}  # one DataError, one InferenceError
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, stdout, stderr)
        assert str(cases[name][1]) in lines[0], (name, stderr)


# --------------------------------------------------------------------------- bad flags, refused before any work
def run_main(capsys, *args) -> tuple[int, str]:
    """inference.main through cli.call, as the script runs -> (exit code, stderr)."""
    capsys.readouterr()
    code = cli.call(lambda: inference.main([*map(str, args)]))
    return code, capsys.readouterr().err


def test_negative_or_all_zero_weights_are_one_error_line(trained_run, single, demo_root, tmp_path, capsys):
    base = ["--data_dir", demo_root / "eval", "--output_dir", tmp_path / "out", "--num_workers", "0",
            "--model_dir", trained_run, trained_run]
    for weights, message in ((["0", "0"], "--weights are all 0: give at least one model a weight > 0"),
                             (["-1", "2"], "--weights must be finite and >= 0, got -1.0"),
                             (["nan", "1"], "--weights must be finite and >= 0, got nan")):
        code, err = run_main(capsys, *base, "--weights", *weights)
        assert code == 2 and err == f"error: {message}\n", (weights, err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(predictor.InferenceError, match="all 0"):  # load_members serves predict.py and serving too
        predictor.load_members([str(trained_run)] * 2, "best_f1", [0.0, 0.0])
    # one zero beside a positive weight is a vote of the others
    zero = infer(tmp_path / "zero", "--data_dir", demo_root / "eval", "--model_dir", trained_run, trained_run,
                 "--weights", "1", "0")
    np.testing.assert_allclose(read_probs(zero / "output_probs.csv")[1], read_probs(single / "output_probs.csv")[1],
                               atol=1e-7)


@pytest.mark.parametrize("which, slot", [("mask_run", "--mask_model_dir"), ("genderage_run", "--genderage_model_dir")])
def test_plain_run_of_a_mask_or_genderage_model_writes_no_submission(request, which, slot, demo_root, tmp_path,
                                                                     capsys):
    """Its class ids (0-2, 0-5) in output.csv would be scored as 18-class labels: refused, pointing at the pair."""
    run = request.getfixturevalue(which)[0]
    code, err = run_main(capsys, "--data_dir", demo_root / "eval", "--model_dir", run, "--output_dir", tmp_path / "out",
                         "--num_workers", "0")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {run / 'best_f1.pth'} is a ") and "--isEnsemble True" in err, err
    assert err.endswith(f"this model goes in {slot}\n"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--batch_size", "0", "must be an integer >= 1, got 0"),
    ("--num_workers", "-1", "must be an integer >= 0, got -1"),
    ("--isEnsemble", "Ture", "expected True or False, got 'Ture'")])  # a typo once read as False
def test_bad_flag_values_are_refused_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        inference.main([flag, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {flag}: {message}")


def test_cuda_device_without_a_gpu_is_one_error_line(trained_run, demo_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    code, err = run_main(capsys, "--data_dir", demo_root / "eval", "--model_dir", trained_run, "--device", "cuda",
                         "--output_dir", tmp_path / "out", "--num_workers", "0")
    assert code == 2 and err == ("error: --device cuda: no CUDA device is available on this machine; "
                                 "use --device cpu or auto\n"), err
    assert not (tmp_path / "out").exists()
