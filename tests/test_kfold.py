"""`train.py --kfold K --fold all`: every fold in one command, the mean and spread, and the
cross-validation folder standing for its folds in inference.py and calibrate.py."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

import calibrate
import dataset as data
import train
from maskcls.checkpoint import expand_runs, load_checkpoint
from maskcls.cli import UsageError
from maskcls import predictor

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def cv_run(demo_root, tiny_train_args, tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    args = [a for a in tiny_train_args if a != "none"]
    args[args.index("--tracking_uri") + 1:args.index("--tracking_uri") + 1] = [f"sqlite:///{root / 'mlflow.db'}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = train.main([*args, "--data_dir", str(demo_root / "train"), "--model_dir", str(root / "models"),
                         "--kfold", "3", "--fold", "all", "--epochs", "1", "--name", "cv"])
    assert rc == 0, out.getvalue()[-3000:]
    return root, root / "models" / "cv", out.getvalue()


def test_every_fold_trains_on_disjoint_people(cv_run, demo_root):
    _, parent, out = cv_run
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == ["fold0", "fold1", "fold2"]
    assert out.count("=== fold ") == 3
    samples = data.discover(demo_root / "train", verbose=False)
    seen = []
    for fold in range(3):
        ckpt = load_checkpoint(parent / f"fold{fold}" / "best_f1.pth")
        assert ckpt["args"]["fold"] == fold and ckpt["args"]["kfold"] == 3
        people = set(pd.read_csv(parent / f"fold{fold}" / "val_samples.csv")["person"])
        _, val_idx = data.kfold_split(samples, 3, fold, seed=1)
        assert people == {samples[i].person for i in val_idx}
        seen += sorted(people)
    assert len(seen) == len(set(seen)) == len({s.person for s in samples})  # every person validated once


def test_cv_summary_is_the_mean_spread_and_pooled_score(cv_run):
    _, parent, out = cv_run
    summary = json.loads((parent / "cv.json").read_text())
    f1s = np.array([load_checkpoint(parent / f"fold{i}" / "best_f1.pth")["metrics"]["val_f1"] for i in range(3)])
    assert summary["cv_val_f1_mean"] == pytest.approx(f1s.mean())
    assert summary["cv_val_f1_std"] == pytest.approx(f1s.std(ddof=1))
    labels = np.concatenate([np.load(parent / f"fold{i}" / "val_labels.npy") for i in range(3)])
    pred = np.concatenate([np.load(parent / f"fold{i}" / "val_probs.npy") for i in range(3)]).argmax(1)
    assert summary["cv_oof_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert f"macro F1 {f1s.mean():.4f} +- {f1s.std(ddof=1):.4f}" in out
    assert json.loads((parent / "config.json").read_text())["fold"] == "all"


def test_mlflow_parent_run_with_a_child_per_fold(cv_run):
    from mlflow import MlflowClient

    root, _, _ = cv_run
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.info.run_name == "cv"]
    assert len(parents) == 1 and "cv_val_f1_mean" in parents[0].data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["cv/fold0", "cv/fold1", "cv/fold2"]
    assert all(r.info.status == "FINISHED" for r in [*parents, *children])


def test_the_cv_folder_stands_for_its_folds(cv_run, demo_root, capsys):
    _, parent, _ = cv_run
    assert expand_runs([parent]) == [[parent / "fold0", parent / "fold1", parent / "fold2"]]
    assert expand_runs([parent / "fold1"]) == [[parent / "fold1"]]
    info, paths = data.read_eval_info(demo_root / "eval")
    probs, pred, _, ckpts = predictor.soft_vote([str(parent)], "best_f1", paths, verbose=False, progress=False)
    assert len(ckpts) == 3
    each = [predictor.predict_probs(load_checkpoint(parent / f"fold{i}" / "best_f1.pth"), paths, progress=False)
            for i in range(3)]
    np.testing.assert_allclose(probs, np.mean(each, axis=0), atol=1e-6)
    assert calibrate.main(["--runs", str(parent)]) == 0
    assert "cross-validated (fit on the other runs, score on each)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--fold", "all"], "--fold all trains every fold of a --kfold K split"),
    (["--kfold", "3", "--fold", "all", "--mode", "all"], "--fold all trains every fold"),
    (["--kfold", "3", "--fold", "all", "--resume", "model/exp/last.pth"], "resumes from a fold's last.pth"),
])
def test_fold_all_misuse_is_one_line(extra, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model" / "exp").mkdir(parents=True)
    (tmp_path / "model" / "exp" / "last.pth").write_bytes(b"")  # --resume must name a file
    with pytest.raises(UsageError, match=message):
        train.parse_args(["--tracking_uri", "none", *extra])


def test_fold_not_a_number_or_all(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--kfold", "3", "--fold", "two"])
    assert stop.value.code == 2 and "expected a fold number or all, got 'two'" in capsys.readouterr().err


def test_holdout_fold_holds_out_the_people_of_that_fold(cv_run, demo_root, tmp_path):
    """holdout.py --kfold K --fold i carves the same people train.py --kfold K --fold i validates on,
    so a whole pipeline can be scored on every fold."""
    import holdout

    _, parent, _ = cv_run
    out = holdout.make_holdout(demo_root / "train", tmp_path / "fold1", seed=1, kfold=3, fold=1)
    held = {p.resolve().parent.name for p in (out / "eval" / "images").iterdir()}
    assert held == set(pd.read_csv(parent / "fold1" / "val_samples.csv")["person"])
    trained = {p.name for p in (out / "train" / "images").iterdir()}
    assert not trained & held and len(trained) + len(held) == len(list((demo_root / "train" / "images").iterdir()))
    with pytest.raises(UsageError, match="--fold in 0..K-1"):
        holdout.make_holdout(demo_root / "train", tmp_path / "bad", kfold=3, fold=3)


def test_interrupted_cross_validation_resumes_at_its_fold(demo_root, tiny_train_args, tmp_path, monkeypatch, capsys):
    """SIGTERM in fold 1: exit 143 with its last.pth named; --resume <cv>/fold1/last.pth alone finishes fold 1
    and trains fold 2, in the same parent MLflow run."""
    import signal

    from mlflow import MlflowClient

    from maskcls import cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [a for a in tiny_train_args if a != "none"]
    args[args.index("--tracking_uri") + 1:args.index("--tracking_uri") + 1] = [uri]
    base = [*args, "--data_dir", str(demo_root / "train"), "--model_dir", str(tmp_path / "models"),
            "--kfold", "3", "--fold", "all", "--epochs", "2", "--name", "cv"]
    real, calls = train.train_one_epoch, []

    def stop_in_fold1_epoch2(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # fold0: epochs 1, 2; fold1: epoch 1, then stopped in epoch 2
            raise cli.Interrupted(signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train, "train_one_epoch", stop_in_fold1_epoch2)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main(base) == 143
    cv = tmp_path / "models" / "cv"
    last = cv / "fold1" / "last.pth"
    assert f"continue with --resume {last}" in out.getvalue() and not (cv / "cv.json").exists()
    capsys.readouterr()
    assert expand_runs([cv]) == [[cv / "fold0", cv / "fold1"]]  # what inference / calibrate would vote: said
    assert f"warning: {cv} has no cv.json (an unfinished --fold all?): using its 2 fold(s) fold0, fold1 of 3" \
        in capsys.readouterr().err
    monkeypatch.setattr(train, "train_one_epoch", real)
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.main(["--resume", str(last)]) == 0  # as the message says: the folds after it follow
    assert load_checkpoint(last)["epoch_number"] == 2 and (cv / "fold2" / "best_f1.pth").is_file()
    assert len(json.loads((cv / "cv.json").read_text())["folds"]) == 3
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.info.run_name == "cv"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["cv/fold0", "cv/fold1", "cv/fold2"]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
