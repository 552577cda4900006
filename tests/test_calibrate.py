"""Decision offsets (calibrate.py), their use by inference.py, and holdout.py."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

import calibrate
from maskcls import cli
import dataset as data
import holdout
import inference
from maskcls.checkpoint import load_checkpoint
from maskcls.task import decide
from maskcls import metrics


def imbalanced_probs(n: int = 3000, classes: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A classifier biased towards frequent classes: arg-max under-predicts the rare ones."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.5, 0.25, 0.12, 0.07, 0.04, 0.02])[:classes]
    prior = prior / prior.sum()
    labels = rng.choice(classes, size=n, p=prior)
    logits = rng.normal(size=(n, classes)) + np.log(prior) * 1.5
    logits[np.arange(n), labels] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def test_fast_macro_f1_equals_sklearn():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 18, 500), rng.integers(0, 16, 500)  # 16, 17 never predicted
    assert metrics.fast_macro_f1(y, p, 18) == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)


@pytest.mark.parametrize("method", ["coordinate", "prior"])
def test_offsets_raise_macro_f1_on_unseen_data(method):
    probs, labels = imbalanced_probs(seed=0)
    offsets = calibrate.FITTERS[method](probs, labels)
    test_probs, test_labels = imbalanced_probs(seed=1)  # fitted on one sample, scored on another
    before = f1_score(test_labels, test_probs.argmax(1), average="macro")
    after = f1_score(test_labels, decide(test_probs, offsets), average="macro")
    assert after > before + 0.01
    assert offsets.shape == (probs.shape[1],)


def test_prior_offsets_favour_rare_classes():
    probs, labels = imbalanced_probs()
    offsets = calibrate.fit_prior_offsets(probs, labels)
    assert offsets[-1] > offsets[0]  # rarest class boosted relative to the most frequent


def test_calibrate_writes_offsets_that_inference_applies(trained_run, demo_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert (run / "val_probs.npy").is_file() and (run / "val_labels.npy").is_file()
    assert calibrate.main(["--runs", str(run), "--write"]) == 0
    ckpt = load_checkpoint(run / "best_f1.pth")  # still loadable with weights_only=True
    offsets = np.array(ckpt["class_offsets"])
    assert offsets.shape == (18,)
    # Make the effect unmistakable: a huge offset on one class must win everywhere.
    ckpt["class_offsets"] = [0.0] * 17 + [50.0]
    torch.save(ckpt, run / "best_f1.pth")
    out = tmp_path / "out"
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(run),
                           "--output_dir", str(out), "--num_workers", "0"]) == 0
    assert set(pd.read_csv(out / "output.csv")["ans"]) == {17}
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(run), "--offsets", "none",
                           "--output_dir", str(out / "plain"), "--num_workers", "0"]) == 0
    probs = pd.read_csv(out / "plain" / "output_probs.csv").drop(columns="ImageID").to_numpy()
    assert (pd.read_csv(out / "plain" / "output.csv")["ans"].to_numpy() == probs.argmax(1)).all()


def test_calibrate_without_validation_outputs_fails_clearly(tmp_path):
    with pytest.raises(calibrate.CheckpointError, match="val_probs.npy"):
        calibrate.main(["--runs", str(tmp_path)])


def _oof_run(run: Path) -> Path:
    """A run folder with validation outputs only (offsets need no checkpoint without --write)."""
    probs, labels = imbalanced_probs(n=200)
    run.mkdir()
    np.save(run / "val_probs.npy", probs)
    np.save(run / "val_labels.npy", labels)
    return run


@pytest.mark.parametrize("name, damage, fragment", [
    ("val_probs.npy", lambda b: b"", "val_probs.npy is empty (0 bytes"),
    ("val_probs.npy", lambda b: b[:len(b) // 2], "val_probs.npy is not a complete .npy array"),
    ("val_labels.npy", lambda b: b[:30], "val_labels.npy is not a complete .npy array"),
], ids=["empty", "truncated", "labels-cut"])
def test_empty_or_truncated_validation_arrays_are_one_error_line(tmp_path, capsys, name, damage, fragment):
    run = _oof_run(tmp_path / "run")
    (run / name).write_bytes(damage((run / name).read_bytes()))
    assert cli.call(lambda: calibrate.main(["--runs", str(run)])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {fragment}") and err.count("\n") == 1 and str(run / name) in err, err


def test_a_missing_run_or_a_checkpoint_file_is_not_a_run_folder(tmp_path, capsys):
    run = _oof_run(tmp_path / "run")
    (run / "best_f1.pth").write_bytes(b"x")
    for path, fragment in ((tmp_path / "nonexistent", "run folder not found"),
                           (run / "best_f1.pth", "not a run folder (a file")):
        for extra in ([], ["--write"]):
            assert cli.call(lambda: calibrate.main(["--runs", str(path), *extra])) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {fragment}") and err.count("\n") == 1 and str(path) in err, err
    with contextlib.redirect_stdout(io.StringIO()):
        assert calibrate.main(["--runs", str(run)]) == 0  # the folder itself is fine


def test_holdout_layout_and_no_person_overlap(demo_root, tmp_path):
    out = holdout.make_holdout(demo_root / "train", tmp_path / "local", val_ratio=0.25, seed=3)
    train = data.discover(out / "train", verbose=False)
    info, paths = data.read_eval_info(out / "eval")
    gt = pd.read_csv(out / "gt" / "gt.csv")
    assert list(info["ImageID"]) == list(gt["ImageID"]) and (info["ans"] == "0").all()  # cells read as text
    source = {s.path: s for s in data.discover(demo_root / "train", verbose=False)}
    by_resolved = {Path(p).resolve(): s for p, s in source.items()}
    eval_samples = [by_resolved[Path(p).resolve()] for p in paths]
    assert [s.label18() for s in eval_samples] == list(gt["ans"])  # gt labels are right
    eval_people = {s.person for s in eval_samples}
    assert not eval_people & {s.person for s in train}  # nobody on both sides
    n_people = len({s.person for s in source.values()})
    assert len(eval_people) == round(n_people * 0.25)
    assert len(train) + len(paths) == len(source)


def test_soft_vote_applies_the_mean_of_the_models_offsets(trained_run, demo_root, tmp_path):
    runs = []
    for name, offsets in (("a", [0.0] * 17 + [40.0]), ("b", [0.0] * 16 + [40.0, 0.0])):
        run = tmp_path / name
        shutil.copytree(trained_run, run)
        ckpt = load_checkpoint(run / "best_f1.pth")
        ckpt["class_offsets"] = offsets
        torch.save(ckpt, run / "best_f1.pth")
        runs.append(run)
    # Mean offsets: +20 on classes 16 and 17, so every prediction is one of the two.
    out = tmp_path / "out"
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", *map(str, runs),
                           "--output_dir", str(out), "--num_workers", "0"]) == 0
    assert set(pd.read_csv(out / "output.csv")["ans"]) <= {16, 17}
    # One model without offsets: plain arg-max of the soft vote, with a warning.
    plain = tmp_path / "plain"
    shutil.copytree(trained_run, plain)
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(runs[0]), str(plain),
                           "--output_dir", str(out / "mixed"), "--num_workers", "0"]) == 0
    probs = pd.read_csv(out / "mixed" / "output_probs.csv").drop(columns="ImageID").to_numpy()
    assert (pd.read_csv(out / "mixed" / "output.csv")["ans"].to_numpy() == probs.argmax(1)).all()
