"""The CUDA paths: autocast (bf16, and fp16 with loss scaling), channels_last, pinned memory and loader
workers, torch.compile, resume, torchrun and inference on a GPU. Skipped without one (CI has none);
run them where a GPU is: `pytest -n 0 tests/test_cuda.py`.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from maskcls.checkpoint import load_checkpoint
from maskcls import runtime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
BASE = ("--model", "SmallCNN", "--resize", "48", "36", "--batch_size", "32", "--valid_batch_size", "64",
        "--tracking_uri", "none", "--log_interval", "4", "--seed", "1", "--task", "multi")


def _train(demo_root: Path, model_dir: Path, *extra: str) -> tuple[Path, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = train.main([*BASE, "--data_dir", str(demo_root / "train"), "--model_dir", str(model_dir), *extra])
    assert rc == 0, out.getvalue()[-3000:]
    runs = sorted(p for p in model_dir.iterdir() if p.is_dir())
    return runs[-1], out.getvalue()


def _val_f1(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"\[val\] epoch \d+: .*? macro F1 ([0-9.]+)", log)]


def _assert_cpu_tensors(state: dict) -> None:
    """A checkpoint written on a GPU loads on a CPU-only machine: every tensor was saved from the CPU."""
    devices = {t.device.type for t in state.values() if isinstance(t, torch.Tensor)}
    assert devices == {"cpu"}, devices


def test_bf16_autocast_channels_last_pinned_workers(demo_root, tmp_path):
    """train.py's CUDA defaults (autocast, channels_last) with two loader workers on pinned memory."""
    run, log = _train(demo_root, tmp_path, "--epochs", "2", "--num_workers", "2", "--cache", "false")
    assert "device cuda" in log and "amp True" in log and "channels_last True" in log, log[:2000]
    f1 = _val_f1(log)
    assert len(f1) == 2 and all(math.isfinite(v) for v in f1), f1
    ckpt = load_checkpoint(run / "last.pth")
    _assert_cpu_tensors(ckpt["state_dict_train"])
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict_train"].values() if t.is_floating_point())


def test_fp16_autocast_with_loss_scaling(demo_root, tmp_path, monkeypatch):
    """GPUs without bf16 (T4, V100) train in fp16 with a GradScaler; the loss and the weights stay finite."""
    import model

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.amp_dtype(torch.device("cuda")) == torch.float16
    run, log = _train(demo_root, tmp_path, "--epochs", "2", "--num_workers", "0")
    assert "amp True" in log
    losses = [float(x) for x in re.findall(r"train loss ([0-9.naif]+)", log)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    ckpt = load_checkpoint(run / "last.pth")
    weights = [t for t in ckpt["state_dict_train"].values() if t.is_floating_point()]
    assert all(torch.isfinite(t).all() for t in weights)


def test_resume_on_cuda_continues_the_run(demo_root, tmp_path):
    """Two epochs, then --resume to three: the CUDA RNG state and the optimizer move back onto the GPU."""
    run, _ = _train(demo_root, tmp_path, "--epochs", "2", "--num_workers", "0")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main(["--resume", str(run), "--epochs", "3"]) == 0, out.getvalue()[-3000:]
    assert "resuming from" in out.getvalue() and "epoch 3/3" in out.getvalue()
    assert load_checkpoint(run / "last.pth")["epoch"] == 2


def test_compile_trains_and_saves_plain_weights(demo_root, tmp_path):
    """--compile: the checkpoint holds the plain module's keys (no `_orig_mod.`), so it loads without
    compiling and inference reads it."""
    run, log = _train(demo_root, tmp_path, "--epochs", "1", "--num_workers", "0", "--compile", "true")
    ckpt = load_checkpoint(run / "last.pth")
    assert not [k for k in ckpt["state_dict_train"] if "_orig_mod" in k]
    assert len(_val_f1(log)) == 1


def _predict(run: Path, demo_root: Path, out: Path, device: str) -> pd.DataFrame:
    res = subprocess.run([sys.executable, "inference.py", "--data_dir", str(demo_root / "eval"), "--model_dir",
                          str(run), "--state", "last", "--output_dir", str(out), "--device", device, "--tta", "hflip"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return pd.read_csv(out / "output_probs.csv")


def test_inference_on_cuda_agrees_with_cpu(demo_root, tmp_path):
    """The same checkpoint predicted on the GPU (autocast) and on the CPU (fp32): nearly the same
    probabilities and classes."""
    run, _ = _train(demo_root, tmp_path / "m", "--epochs", "2", "--num_workers", "0")
    gpu, cpu = (_predict(run, demo_root, tmp_path / d, d) for d in ("cuda", "cpu"))
    assert list(gpu.columns) == list(cpu.columns) and len(gpu) == len(cpu) > 0
    cols = [c for c in gpu.columns if re.fullmatch(r"p\d+", c)]
    assert len(cols) == 18
    g, c = gpu[cols].to_numpy(float), cpu[cols].to_numpy(float)
    assert np.abs(g - c).max() < 0.05, np.abs(g - c).max()
    assert (g.argmax(1) == c.argmax(1)).mean() >= 0.95


def test_torchrun_one_gpu(demo_root, tmp_path):
    """torchrun with one process per GPU, as a user launches it."""
    gpus = min(torch.cuda.device_count(), 2)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(gpus), "train.py", *BASE, "--epochs", "2", "--num_workers", "1", "--data_dir",
                          str(demo_root / "train"), "--model_dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert f"{gpus} process(es)" in out and "device cuda" in out
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((run / "config.json").read_text())["resolved"]["world_size"] == gpus
    _assert_cpu_tensors(load_checkpoint(run / "last.pth")["state_dict_train"])


def test_bench_on_cuda(tmp_path):
    """bench.py --device cuda measures every variant and names the one train.py uses there."""
    res = subprocess.run([sys.executable, "bench.py", "--device", "cuda", "--model", "SmallCNN", "--resize", "64",
                          "64", "--n", "64", "--batch_size", "16", "--loop_steps", "2", "--num_workers", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    ips = {k: v for k, v in result.items() if k.startswith(("train_", "infer_")) and k.endswith("_ips")}
    assert len(ips) >= 6 and all(v > 0 for v in ips.values()), result
