"""train.py under torchrun: 2 processes on CPU (gloo), as a user launches it.

One 2-epoch run is shared by most tests (module fixture); resume, a killed worker and a
stuck worker each launch their own short job. Linux only for the two fault tests (/proc).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset as data
import train
from maskcls.checkpoint import load_checkpoint
from maskcls import distributed
from maskcls import samplers

ROOT = Path(__file__).resolve().parents[1]
VALID_BATCH = 4
EPOCHS = 2
BATCH, ACCUM, WORLD = 8, 2, 2
COMMON = ["--model", "SmallCNN", "--resize", "48", "36", "--num_workers", "0", "--batch_size", str(BATCH),
          "--valid_batch_size", str(VALID_BATCH), "--log_interval", "2"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "SM_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
            str(ROOT / "train.py"), *COMMON, *args]


def _torchrun(*args: str, timeout: float = 300) -> str:
    res = subprocess.run(_cmd(*args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    return out


class Job:
    """A torchrun job whose output is read in the background, so the test can act mid-run."""

    def __init__(self, *args: str):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(_cmd(*args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output, re.M):
            assert self.proc.poll() is None, f"job ended before {pattern!r}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} after {timeout}s:\n{self.output[-3000:]}"
            time.sleep(0.05)

    def worker(self, rank: int) -> int:
        """pid of the worker process torchrun started with RANK=rank."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and f"RANK={rank}".encode() in environ:
                return int(entry)
        raise AssertionError(f"no worker with RANK={rank} under torchrun pid {self.proc.pid}")

    def close(self) -> None:
        if self.proc.poll() is None:  # a failed assertion must not leave our job running
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.reader.join(10)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- shared 2-process run
@pytest.fixture(scope="module")
def work():
    # Our own temp dir: other pytest sessions sharing this machine prune old numbered tmp_path dirs.
    with tempfile.TemporaryDirectory(prefix="test-ddp-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def demo(work) -> Path:
    from demo_data import generate

    return generate(work / "demo", people=36, size=(48, 64), seed=0, eval_people=6) / "train"


@pytest.fixture(scope="module")
def ddp_run(demo, work):
    tmp = work / "run"
    tmp.mkdir()
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = _torchrun("--data_dir", str(demo), "--model_dir", str(tmp / "models"), "--epochs", str(EPOCHS),
                    "--accum_steps", str(ACCUM), "--sync_bn", "True", "--tracking_uri", uri, "--experiment", "ddp")
    print(out)  # shown with -s / on failure: the 2-process run's output
    return {"out": out, "models": tmp / "models", "uri": uri, "tmp": tmp}


def _val_split(ckpt: dict) -> tuple[list, list[int]]:
    a = ckpt["args"]
    samples = data.discover(a["data_dir"], age_bins=tuple(a["age_bins"]), verbose=False)
    _, val_idx = data.split_indices(samples, a["dataset"], a["val_ratio"], a["seed"], tuple(a["age_bins"]),
                                    a["kfold"], a["fold"])
    return samples, val_idx


def test_validation_set_is_not_a_multiple_of_the_global_val_batch(ddp_run):
    ckpt = load_checkpoint(ddp_run["models"] / "exp" / "best_f1.pth")
    _, val_idx = _val_split(ckpt)
    assert len(val_idx) % (WORLD * VALID_BATCH) != 0 and len(val_idx) % WORLD != 0  # padding would show


def test_one_run_folder_one_set_of_outputs(ddp_run):
    out = ddp_run["out"]
    assert [p.name for p in ddp_run["models"].iterdir()] == ["exp"]
    run_dir = ddp_run["models"] / "exp"
    for name in ("best.pth", "best_f1.pth", "last.pth", "config.json", "per_class.csv", "val_probs.npy"):
        assert (run_dir / name).is_file(), name
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer
    assert not list(run_dir.glob("*.tmp*"))
    # Only rank 0 prints: one table and one [val] line per epoch, one summary, one startup banner.
    assert len(re.findall(r"^class\s+name", out, re.M)) == EPOCHS
    assert len(re.findall(r"^\[val\] epoch", out, re.M)) == EPOCHS
    assert len(re.findall(r"^done:", out, re.M)) == 1
    assert len(re.findall(r"^outputs: ", out, re.M)) == 1
    assert len(re.findall(r"^MLflow run ", out, re.M)) == 1
    assert "2 process(es)" in out
    assert "--sync_bn needs CUDA" in out  # CPU: a clear warning, not a crash at the first batch
    last = load_checkpoint(run_dir / "last.pth")
    assert last["epoch"] == EPOCHS - 1
    # Training loss/accuracy cover every rank's share of the epoch, not rank 0's alone.
    samples, val_idx = _val_split(last)
    assert len(samples) - len(val_idx) <= last["metrics"]["train_images"] < len(samples) - len(val_idx) + WORLD


def test_exactly_one_mlflow_run(ddp_run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=ddp_run["uri"])
    exp = client.get_experiment_by_name("ddp")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["resolved.world_size"] == str(WORLD)
    assert run.data.params["resolved.global_batch"] == str(BATCH * WORLD * ACCUM)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_f1")] == list(range(EPOCHS))


def test_global_batch_printed_and_in_config(ddp_run):
    assert f"global batch {BATCH * WORLD * ACCUM}," in ddp_run["out"]
    config = json.loads((ddp_run["models"] / "exp" / "config.json").read_text())
    assert config["resolved"]["global_batch"] == BATCH * WORLD * ACCUM and config["resolved"]["world_size"] == WORLD
    assert config["batch_size"] == BATCH and config["accum_steps"] == ACCUM


def test_validation_equals_single_process_evaluation(ddp_run):
    from maskcls.predictor import predict_probs
    from maskcls.metrics import evaluate_predictions

    run_dir = ddp_run["models"] / "exp"
    ckpt = load_checkpoint(run_dir / "best_f1.pth")
    samples, val_idx = _val_split(ckpt)
    probs = predict_probs(ckpt, [samples[i].path for i in val_idx], batch_size=7, progress=False)
    truth = [samples[i].label18(tuple(ckpt["args"]["age_bins"])) for i in val_idx]
    scores = evaluate_predictions(truth, probs.argmax(1), "all")
    # Same weights, whole split once, in dataset order: identical scores, not just close ones.
    assert ckpt["metrics"]["val_f1"] == scores["f1"]
    assert ckpt["metrics"]["val_acc"] == scores["accuracy"]
    for key in ("f1_mask", "f1_gender", "f1_age", "f1_genderage"):
        assert ckpt["metrics"][f"val_{key}"] == scores[key]
    saved = np.load(run_dir / "val_probs.npy")
    assert saved.shape == probs.shape == (len(val_idx), 18)  # nothing dropped, no padded duplicates
    np.testing.assert_allclose(saved, probs, atol=1e-5)
    line = re.findall(rf"^\[val\] epoch {ckpt['epoch'] + 1}: acc .*$", ddp_run["out"], re.M)
    assert len(line) == 1 and f"macro F1 {scores['f1']:.4f} " in line[0]
    correct = int(round(scores["accuracy"] * len(val_idx)))
    assert f"({correct}/{len(val_idx)})" in ddp_run["out"]


def test_resume_under_torchrun_continues_in_the_same_folder(ddp_run, work):
    models = work / "resume" / "models"
    shutil.copytree(ddp_run["models"], models)
    run_dir = models / "exp"
    before = load_checkpoint(run_dir / "last.pth")
    uri = f"sqlite:///{ddp_run['tmp'] / 'mlflow.db'}"
    out = _torchrun("--data_dir", before["args"]["data_dir"], "--model_dir", str(models), "--epochs", str(EPOCHS + 1),
                    "--accum_steps", str(ACCUM), "--resume", str(run_dir / "last.pth"), "--tracking_uri", uri,
                    "--experiment", "ddp-resume")
    assert f"at epoch {EPOCHS + 1}" in out
    assert re.findall(r"^epoch (\d+)/\d+: train", out, re.M) == [str(EPOCHS + 1)]  # no epoch replayed
    assert [p.name for p in models.iterdir()] == ["exp"]  # no exp2: same folder
    after = load_checkpoint(run_dir / "last.pth")
    assert after["epoch"] == EPOCHS and after["args"]["resume"] == str(run_dir / "last.pth")
    assert len(re.findall(r"^class\s+name", out, re.M)) == 1
    assert any(not torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())  # trained on
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1  # the resumed launch continued the interrupted run, whatever --experiment says
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_f1")]
    assert steps == list(range(EPOCHS + 1)) and runs[0].info.status == "FINISHED"
    assert client.get_experiment_by_name("ddp-resume") is None


# --------------------------------------------------------------------------- faults
fault_test = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds worker pids in /proc")


@fault_test
def test_killed_worker_ends_the_job(demo, work):
    job = Job("--data_dir", str(demo), "--model_dir", str(work / "killed"), "--epochs", "100", "--tracking_uri", "none")
    try:
        job.wait_for(r"^epoch 1 \[\d+/\d+\] loss")  # both ranks are inside DDP training
        killed = time.monotonic()
        os.kill(job.worker(1), signal.SIGKILL)  # what the OOM killer does
        rc = job.proc.wait(60)
        elapsed = time.monotonic() - killed
    finally:
        job.close()
    assert rc != 0 and elapsed < 60
    out = job.output
    assert "FAILED" in out and "SIGKILL" in out  # torchrun's summary names the dead rank
    assert not re.search(r"^epoch 2/100", out, re.M)


@fault_test
def test_stuck_worker_times_out(demo, work):
    """A frozen rank (deadlock, dead NFS mount, GPU hang) must not block the others forever: they
    give up after --dist_timeout seconds and torchrun stops the job."""
    job = Job("--data_dir", str(demo), "--model_dir", str(work / "stuck"), "--epochs", "100", "--tracking_uri", "none",
              "--dist_timeout", "5")
    try:
        job.wait_for(r"^epoch 1 \[\d+/\d+\] loss")
        rank0, rank1 = job.worker(0), job.worker(1)
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.monotonic()
        while _alive(rank0) and time.monotonic() - stopped < 60:
            time.sleep(0.1)
        rank0_gone = time.monotonic() - stopped
        # Let the frozen rank take torchrun's SIGTERM now rather than after its 30 s grace period.
        os.kill(rank1, signal.SIGCONT)
        rc = job.proc.wait(60)
    finally:
        job.close()
    out = job.output
    assert 4 < rank0_gone < 45, out[-3000:]  # waited for the timeout, then gave up
    assert rc != 0
    errors = "\n".join(line for line in out.splitlines() if "Error" in line)
    assert re.search(r"timed out|timeout", errors, re.I), errors or out[-3000:]


# --------------------------------------------------------------------------- in-process units
def test_epoch_sampler_shards_are_disjoint_and_cover_the_epoch():
    n, world = 11, 3
    shards = [list(samplers.EpochSampler(n, seed=5, rank=r, world=world)) for r in range(world)]
    assert all(len(s) == len(samplers.EpochSampler(n, 5, rank=r, world=world)) == 4 for r, s in enumerate(shards))
    flat = sorted(i for s in shards for i in s)
    assert set(flat) == set(range(n)) and len(flat) == 12  # one repeat pads 11 to 3 x 4
    sampler = samplers.EpochSampler(n, seed=5)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(n))  # reshuffled each epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # replayable: --resume sees the same order


def test_weighted_epoch_sampler_shards_one_draw():
    weights = torch.tensor([1.0] * 8 + [50.0] * 2, dtype=torch.double)
    shards = []
    for rank in range(2):
        s = samplers.EpochSampler(10, seed=1, weights=weights, rank=rank, world=2)
        s.set_epoch(3)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 5
    drawn = shards[0] + shards[1]
    assert sum(i >= 8 for i in drawn) > 5  # class-weighted: the heavy items dominate
    again = samplers.EpochSampler(10, seed=1, weights=weights, rank=0, world=2)
    again.set_epoch(4)
    assert list(again) != shards[0]  # reseeded per epoch


def test_is_main_follows_torchrun_rank(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()  # also after destroy_process_group: no duplicate summary lines
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()
