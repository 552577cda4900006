"""End to end: train.py and `mlflow run` against a live `mlflow server` (sqlite + proxied artifacts).

Every training here is a real subprocess on a tiny demo set (36 people, 48x64 images, SmallCNN at 48x36).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

import demo_data
from maskcls.checkpoint import load_checkpoint
from tests.mlflow_server import _free_port, mlflow_server, start_server, stop_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "SmallCNN", "--resize", "48", "36", "--batch_size", "32", "--num_workers", "0"]
TIMEOUT_S = 300  # a hung subprocess fails the test instead of the whole CI job


@pytest.fixture(scope="module", autouse=True)
def spare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future]:
    """A private server for the outage test, which kills it. Started in the background when the
    module starts so its startup overlaps the other tests (they keep only one core busy)."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(start_server, tmp_path_factory.mktemp("spare_server"))
    try:
        yield future
    finally:
        try:
            _, proc = future.result()
        except Exception:
            pass  # it never started; the test that needed it reported why
        else:
            stop_server(proc)  # a no-op when the test already stopped it
        pool.shutdown()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.generate(tmp_path_factory.mktemp("demo") / "data", people=36, size=(48, 64), eval_people=6)


def _env(uri: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    env["MLFLOW_TRACKING_URI"] = uri
    # `mlflow run` calls plain `python`: make it this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # One intra-op thread: on a busy shared 2-core box, torch's spinning threads made epochs ~10x slower.
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _train_cmd(demo: Path, model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--data_dir", str(demo / "train"),
            "--model_dir", str(model_dir), *TINY, *extra]


def _only_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} not on the server"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run in {experiment!r}, got {len(runs)}"
    return runs[0]


def _check_recorded(uri: str, run, epochs: int, run_dir: Path) -> None:
    """What every tracked training must leave on the server."""
    client = MlflowClient(uri)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == "SmallCNN" and params["epochs"] == str(epochs)
    assert float(params["lr"]) == pytest.approx(3e-3)
    assert params["age_bins"].strip("'") == "30 60"
    history = client.get_metric_history(run.info.run_id, "val_f1")
    assert sorted(m.step for m in history) == list(range(epochs))
    assert all(0.0 <= m.value <= 1.0 for m in history)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "confusion_matrix.png"} <= names, names
    # the artifact really went through the server's proxy and is this training's config
    local = download_artifacts(run_id=run.info.run_id, artifact_path="config.json",
                               tracking_uri=uri,
                               dst_path=str(run_dir.parent / "downloaded"))
    config = json.loads(Path(local).read_text())
    assert config["epochs"] == epochs and Path(config["resolved"]["run_dir"]) == run_dir
    for name in ("best.pth", "best_f1.pth", "last.pth"):
        assert (run_dir / name).is_file(), name


def test_train_records_run_on_server(mlflow_server, demo, tmp_path):
    epochs = 2
    proc = subprocess.run(_train_cmd(demo, tmp_path / "model", "--epochs", str(epochs),
                                     "--experiment", "it-train", "--user", "alice"),
                          cwd=tmp_path, env=_env(mlflow_server), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    run = _only_run(client, "it-train")
    assert run.data.tags["user"] == "alice"
    assert run.info.run_id in proc.stdout  # the run's link is printed for the user
    assert "tracking lost" not in proc.stderr
    _check_recorded(mlflow_server, run, epochs, tmp_path / "model" / "exp")


def test_mlflow_run_project_records_run(mlflow_server, demo, tmp_path):
    model_dir = tmp_path / "model"
    cmd = [sys.executable, "-m", "mlflow", "run", "-e", "main", ".", "--env-manager", "local",
           "--experiment-name", "it-project",
           "-P", "epochs=1", "-P", "model=SmallCNN", "-P", "resize=48 36", "-P", "batch_size=32",
           "-P", "num_workers=0", "-P", "user=bob",
           "-P", f"data_dir={demo / 'train'}", "-P", f"model_dir={model_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(mlflow_server), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    client = MlflowClient(mlflow_server)
    run = _only_run(client, "it-project")  # train.py joined mlflow run's run instead of making its own
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "PROJECT" and tags["mlflow.project.entryPoint"] == "main"
    assert tags["user"] == "bob"
    # train.py's own --experiment default was not used under `mlflow run`
    assert client.get_experiment_by_name("mask-classification") is None
    # the quoted "48 36" that mlflow run logged matches what train.py used: no second value
    assert "resize.resolved" not in run.data.params
    _check_recorded(mlflow_server, run, 1, model_dir / "exp")


def test_server_lost_mid_training_finishes_with_warning(spare_server, demo, tmp_path):
    uri, server = spare_server.result()
    model_dir = tmp_path / "model"
    epochs = 6
    stderr_path = tmp_path / "stderr.txt"
    lines = []
    with open(stderr_path, "w") as err:  # a file: an unread stderr pipe could block train.py
        proc = subprocess.Popen(_train_cmd(demo, model_dir, "--epochs", str(epochs),
                                           "--experiment", "it-lost", "--user", "carol"),
                                cwd=tmp_path, env=_env(uri), stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            for line in proc.stdout:  # incrementally: kill the server once epoch 1 has trained
                lines.append(line)
                if line.startswith(f"epoch 1/{epochs}:"):
                    stop_server(server)  # the fixture's final stop is then a no-op
                    break
            lines.extend(proc.stdout)
            proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stdout, stderr = "".join(lines), stderr_path.read_text()
    assert any(line.startswith(f"epoch 1/{epochs}:") for line in lines), stdout[-2000:]
    assert "MLflow run " in stdout and uri in stdout  # tracking was live before the outage
    assert proc.returncode == 0, stderr[-3000:]
    assert f"epoch {epochs}/{epochs}:" in stdout  # every epoch trained after the outage
    run_dir = model_dir / "exp"
    for name in ("best.pth", "best_f1.pth", "last.pth"):
        assert (run_dir / name).is_file(), name
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == epochs - 1
    assert stderr.count("warning: MLflow tracking lost (") == 1, stderr[-3000:]
    assert "Traceback" not in stderr


def test_unreachable_server_at_start_fails_fast(demo, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    model_dir = tmp_path / "model"
    started = time.monotonic()
    proc = subprocess.run(_train_cmd(demo, model_dir, "--epochs", "1", "--experiment", "it-down"),
                          cwd=tmp_path, env=_env(uri), capture_output=True, text=True, timeout=TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and uri in lines[0] and "unreachable" in lines[0]
    assert "epoch" not in proc.stdout
    assert not model_dir.exists()  # no run folder, no checkpoint
    assert not (tmp_path / "mlflow.db").exists()  # no silent fallback to a local store
    # interpreter + torch import dominate; the server check itself must not retry for minutes
    assert elapsed < 30, f"failing took {elapsed:.1f} s"
