"""Issue 18 item 4: MLflow runs are named after their run folder, the folder is a param, and the
experiment comes from --experiment, else $MLFLOW_EXPERIMENT_NAME, else mask-classification."""
from __future__ import annotations

import contextlib
import io

import pytest

import train

pytestmark = pytest.mark.usefixtures("single_thread")


def test_runs_named_after_their_folder_in_the_chosen_experiment(demo_root, tiny_train_args, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [a for a in tiny_train_args if a != "none"]
    args[args.index("--tracking_uri") + 1:args.index("--tracking_uri") + 1] = [uri]
    base = [*args, "--data_dir", str(demo_root / "train"), "--model_dir", str(tmp_path / "models"), "--epochs", "1"]
    outputs = []
    for experiment_env, extra in ((None, []), ("from-env", []), ("from-env", ["--experiment", "from-flag"])):
        if experiment_env:
            monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment_env)
        else:
            monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert train.main([*base, *extra]) == 0, out.getvalue()[-2000:]
        outputs.append(out.getvalue())
    client = MlflowClient(uri)
    found = {}
    for name in ("mask-classification", "from-env", "from-flag"):
        exp = client.get_experiment_by_name(name)
        assert exp is not None, name
        (run,) = client.search_runs([exp.experiment_id])
        found[name] = run
    # three runs asked for the same --name: folders exp, exp2, exp3, and so are the MLflow runs
    assert [found[n].info.run_name for n in ("mask-classification", "from-env", "from-flag")] == ["exp", "exp2", "exp3"]
    for n, folder in (("mask-classification", "exp"), ("from-env", "exp2"), ("from-flag", "exp3")):
        assert found[n].data.params["run_dir"] == str(tmp_path / "models" / folder)
    # the done line says where the run is and how to predict with it
    done = [line for line in outputs[0].splitlines() if line.startswith("done:")][0]
    assert str(tmp_path / "models" / "exp") in done and found["mask-classification"].info.run_id in done
    assert f"python inference.py --model_dir {tmp_path / 'models' / 'exp'} --state best_f1" in outputs[0]
