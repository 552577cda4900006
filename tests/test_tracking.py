"""tracking.Tracker against a live `mlflow server` (and the default local sqlite store)."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from unittest import mock

import pytest
from mlflow import MlflowClient

from maskcls import tracking
from tests.mlflow_server import _free_port, mlflow_server, start_server, stop_server  # noqa: F401


@pytest.fixture(autouse=True)
def _restore_environ():
    # Tracker.start() sets MLFLOW_HTTP_* defaults process-wide; keep tests independent.
    with mock.patch.dict(os.environ):
        for key in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID",
                    *tracking.HTTP_ENV_DEFAULTS):
            os.environ.pop(key, None)
        yield


def _params(n_extra: int = 0) -> dict:
    params = {"model": "BaseModel", "lr": 0.001, "epochs": 3, "resize": [64, 48],
              "age_bins": (30, 60), "data_dir": None, "amp": False}
    params.update({f"extra_{i:03d}": i for i in range(n_extra)})
    return params


def test_resolve_tracking_uri(monkeypatch):
    assert tracking.resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri(None) == "http://env:5000"
    assert tracking.resolve_tracking_uri("") == "http://env:5000"
    assert tracking.resolve_tracking_uri("http://cli:1") == "http://cli:1"


def test_run_recorded_on_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # a user's own setting must win
    tracker = tracking.Tracker(mlflow_server, "exp-recorded", "run-a", "alice")
    tracker.start(_params(n_extra=150))  # > 100 params: needs chunked log_batch
    assert tracker.active and tracker.run_id
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    for epoch in range(3):
        tracker.log_metrics({"val_f1": 0.5 + epoch / 10, "train_loss": 1.0 / (epoch + 1)}, step=epoch)
    artifact = tmp_path / "config.json"
    artifact.write_text('{"lr": 0.001}')
    tracker.log_artifact(artifact)
    tracker.finish()
    tracker.finish("FAILED")  # idempotent: the first status stays
    assert not tracker.active

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "exp-recorded"
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.tags["user"] == "alice"
    params = run.data.params
    assert params["model"] == "BaseModel" and params["lr"] == "0.001" and params["epochs"] == "3"
    assert params["resize"] == "64 48" and params["age_bins"] == "30 60"
    assert params["data_dir"] == "None" and params["amp"] == "False"
    assert len(params) == 7 + 150
    history = client.get_metric_history(tracker.run_id, "val_f1")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([0.5, 0.6, 0.7])
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["config.json"]
    local = client.download_artifacts(tracker.run_id, "config.json", str(tmp_path / "dl"))
    assert Path(local).read_text() == '{"lr": 0.001}'


def test_joins_run_from_mlflow_run(mlflow_server, monkeypatch, capsys):
    client = MlflowClient(mlflow_server)
    exp_id = client.create_experiment("exp-project")
    run = client.create_run(exp_id)
    # `mlflow run` logs the shell-quoted values the user typed before train.py starts.
    client.log_param(run.info.run_id, "resize", "'64 48'")
    client.log_param(run.info.run_id, "lr", "1e-3")
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)

    tracker = tracking.Tracker(mlflow_server, "exp-ignored", "ignored-name", "bob")
    tracker.start(_params())
    assert tracker.run_id == run.info.run_id and tracker.experiment_id == exp_id
    tracker.log_metrics({"val_f1": 0.9}, step=0)
    tracker.finish("FAILED")

    got = client.get_run(run.info.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["user"] == "bob"
    assert got.data.params["resize"] == "'64 48'" and "resize.resolved" not in got.data.params
    assert got.data.params["lr"] == "1e-3" and got.data.params["lr.resolved"] == "0.001"
    assert got.data.params["model"] == "BaseModel"
    assert got.data.metrics["val_f1"] == pytest.approx(0.9)
    assert client.get_experiment_by_name("exp-ignored") is None
    assert "warning" not in capsys.readouterr().err


def test_unknown_mlflow_run_id_is_clear_error(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    tracker = tracking.Tracker(mlflow_server, "exp-x", "r", None)
    with pytest.raises(tracking.TrackingError, match="MLFLOW_RUN_ID"):
        tracker.start(_params())
    assert tracker.run_id is None and not tracker.active


def test_unreachable_server_at_start_fails_fast():
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    tracker = tracking.Tracker(uri, "exp", "run", "alice")
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError) as info:
        tracker.start(_params())
    assert time.monotonic() - t0 < 10
    message = str(info.value)
    assert "\n" not in message and uri in message and "unreachable" in message
    assert "--tracking_uri none" in message
    assert tracker.run_id is None and not tracker.active


def test_server_hung_or_killed_mid_run_warns_once_and_continues(tmp_path, capsys, monkeypatch):
    uri, proc = start_server(tmp_path / "server")
    try:
        hung = tracking.Tracker(uri, "exp-killed", "hung", "carol")
        dead = tracking.Tracker(uri, "exp-killed", "dead", "carol")
        for tracker in (hung, dead):
            tracker.start(_params())
            tracker.log_metrics({"val_f1": 0.1}, step=0)
            assert tracker.active
        capsys.readouterr()

        # A frozen server accepts connections but never answers: bounded by timeout x attempts.
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            hung.log_metrics({"val_f1": 0.2}, step=1)
            hung.log_metrics({"val_f1": 0.3}, step=2)  # no-op now: no second wait
            elapsed = time.monotonic() - t0
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        assert elapsed < 9, f"a hung server cost {elapsed:.1f} s"
        assert not hung.active
        assert capsys.readouterr().err.count("warning: MLflow tracking lost (") == 1
    finally:
        stop_server(proc)

    artifact = tmp_path / "cm.png"
    artifact.write_bytes(b"png")
    t0 = time.monotonic()
    for epoch in range(1, 4):
        dead.log_metrics({"val_f1": 0.2}, step=epoch)
        dead.log_artifact(artifact)
    dead.finish()  # must not raise
    hung.finish()
    elapsed = time.monotonic() - t0
    assert elapsed < 15, f"a dead server cost {elapsed:.1f} s"
    assert not dead.active
    err = capsys.readouterr().err
    assert err.count("warning: MLflow tracking lost (") == 1
    assert "training continues, later metrics are not logged" in err


@pytest.mark.parametrize("uri,enabled", [("none", True), ("None", True), (None, False)])
def test_disabled_tracker_is_noop(uri, enabled, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = mlflow_server if uri is None else uri  # enabled=False must not touch a live server
    tracker = tracking.Tracker(uri, "exp-disabled", "run", "dave", enabled=enabled)
    tracker.start(_params())
    tracker.log_metrics({"val_f1": 1.0}, step=0)
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.finish()
    assert tracker.run_id is None and not tracker.active
    assert list(tmp_path.iterdir()) == []  # no local store created
    assert MlflowClient(mlflow_server).get_experiment_by_name("exp-disabled") is None


def test_default_local_sqlite_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = tracking.resolve_tracking_uri(None)
    tracker = tracking.Tracker(uri, "local-exp", "local-run", "erin")
    tracker.start(_params())
    for epoch in range(2):
        tracker.log_metrics({"val_f1": 0.3 * epoch, "lr": 0.01}, step=epoch)
    (tmp_path / "per_class.csv").write_text("class,acc\n0,1.0\n")
    tracker.log_artifact(tmp_path / "per_class.csv")
    tracker.finish()
    assert (tmp_path / "mlflow.db").is_file()
    assert tracker.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"  # absolute: MLflow caches stores by URI

    client = MlflowClient(tracker.uri)
    run = client.get_run(tracker.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "local-exp"
    assert run.info.status == "FINISHED" and run.data.tags["user"] == "erin"
    assert len(client.get_metric_history(tracker.run_id, "val_f1")) == 2
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["per_class.csv"]
    # artifacts live next to the store in the cwd, not in some global location
    assert Path(run.info.artifact_uri.removeprefix("file://")).resolve().is_relative_to(tmp_path.resolve())
    out = capsys.readouterr()
    assert "warning" not in out.err and "🏃" not in out.out


def test_sqlite_store_elsewhere_keeps_artifacts_next_to_it(tmp_path, monkeypatch):
    store, cwd = tmp_path / "store", tmp_path / "cwd"
    store.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # MLflow's own default would put artifacts in ./mlruns here
    uri = f"sqlite:///{store / 'runs.db'}"
    tracker = tracking.Tracker(uri, "team/exp 1", "run", "frank")
    tracker.start(_params())
    (tmp_path / "config.json").write_text("{}")
    tracker.log_artifact(tmp_path / "config.json")
    tracker.finish()
    assert list(cwd.iterdir()) == []
    assert list(store.glob("mlruns/team_exp_1/*/artifacts/config.json"))


def test_finish_rejects_unknown_status():
    with pytest.raises(ValueError, match="FINISHED"):
        tracking.Tracker("none", "e", "r", None).finish("DONE")


def _samplers(ignore: frozenset = frozenset()) -> list:
    """Live MLflow sampler threads, less `ignore`: runs of earlier tests whose server was killed leave
    theirs retrying in the background (daemon threads, not waited for by design)."""
    import threading

    return [t for t in threading.enumerate()
            if t.name == "SystemMetricsMonitor" and t.is_alive() and t not in ignore]


@pytest.mark.parametrize("ending,status", [(None, "FINISHED"), (RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_system_metrics_sampled_and_stopped_on_every_exit(ending, status, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    earlier = frozenset(_samplers())
    tracker = tracking.Tracker(mlflow_server, "exp-system", f"run-{status}", "gina")
    with contextlib.suppress(RuntimeError, KeyboardInterrupt):
        with tracker:
            tracker.start(_params())
            assert len(_samplers(earlier)) == 1
            time.sleep(1.2)
            if ending is not None:
                raise ending("stopped")
    assert _samplers(earlier) == []  # stopped with the run, whatever ended it
    run = MlflowClient(mlflow_server).get_run(tracker.run_id)
    assert run.info.status == status
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_user_tag_without_USER_and_no_sampler_when_not_asked(mlflow_server, monkeypatch):
    import getpass

    monkeypatch.delenv("USER", raising=False)  # containers, CI, notebooks on shared servers
    earlier = frozenset(_samplers())
    tracker = tracking.Tracker(mlflow_server, "exp-no-user", "run", tracking.resolve_user(None), system_metrics=False)
    tracker.start(_params())
    assert _samplers(earlier) == []
    tracker.finish()
    run = MlflowClient(mlflow_server).get_run(tracker.run_id)
    assert run.data.tags["user"] == getpass.getuser() and run.data.tags["user"]
    assert not any(key.startswith("system/") for key in run.data.metrics)


def test_attached_step_leaves_the_run_as_it_was(mlflow_server, tmp_path):
    trainer = tracking.Tracker(mlflow_server, "exp-attach", "train", "hana")
    trainer.start(_params())
    trainer.finish()
    client = MlflowClient(mlflow_server)
    before = client.get_run(trainer.run_id).info
    step = tracking.Tracker(mlflow_server, "ignored", "ignored", "ivan", system_metrics=False)
    step.start({"evaluation.gt": "gt.csv"}, attach_run_id=trainer.run_id)
    step.log_metrics({"holdout_f1": 0.5}, step=0)
    step.log_dict({"offsets": [0.1]}, "calibration.json")
    step.finish("FAILED")  # not its run to end
    run = client.get_run(trainer.run_id)
    assert (run.info.status, run.info.end_time) == (before.status, before.end_time)
    assert run.data.metrics["holdout_f1"] == 0.5 and run.data.tags["evaluation.gt"] == "gt.csv"
    assert run.data.tags["user"] == "hana" and "evaluation.gt" not in run.data.params
    assert "calibration.json" in [a.path for a in client.list_artifacts(trainer.run_id)]
    with pytest.raises(tracking.TrackingError, match="is not a run on"):
        tracking.Tracker(mlflow_server, "e", "r", None).start({}, attach_run_id="0" * 32)
