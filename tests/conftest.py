"""Shared, session-scoped fixtures: one small synthetic dataset and tiny trained runs, built once.

Training here uses one intra-op thread (`single_thread`): on a shared 2-core machine torch's
default of two threads spin-waits whenever another process holds a core, which makes small
CPU training several times slower, not faster. The suite runs on two pytest-xdist workers (pytest.ini),
so each worker keeps to one thread throughout (`pytest_configure`); `-n 0` runs it in one process.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = {"people": 72, "size": (48, 64), "eval_people": 18}  # 504 train / 126 eval images, 64x48 (h x w)
# Every tiny run: SmallCNN at 48x36 on CPU, no tracking server, no worker processes.
TINY_TRAIN_ARGS = ("--model", "SmallCNN", "--resize", "48", "36", "--epochs", "2", "--batch_size", "32",
                   "--valid_batch_size", "64", "--num_workers", "0", "--tracking_uri", "none", "--log_interval", "4",
                   "--seed", "1")
# One-epoch runs of the other tasks, shared by the task tests and the ensemble / soft-vote tests.
MASK_ARGS = ("--dataset", "MaskSplitByProfileDatasetForAlbumOnlyMask", "--epochs", "1")
GENDERAGE_ARGS = ("--dataset", "MaskSplitByProfileDatasetForAlbumOnlyGenderAge", "--epochs", "1")
MULTI_ARGS = ("--task", "multi", "--epochs", "1")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: two threads each would spin-wait
        torch.set_num_threads(1)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run the test with one torch intra-op thread (see the module docstring)."""
    with _one_thread():
        yield


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: no inherited SM_*/MLflow defaults, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "MLFLOW_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="session")
def cli() -> Callable[..., list]:
    """cli([script, *args], ...) -> Popen argv/kwargs helper: run several CLIs at once, then wait on each."""
    import subprocess

    def start(argv: list[str], cwd: str | os.PathLike = ROOT) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=cli_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    return start


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo dataset (train/, eval/, gt/), generated once per session (~1 s)."""
    from demo_data import generate

    return generate(tmp_path_factory.mktemp("demo") / "data", **DEMO)


@pytest.fixture(scope="session")
def tiny_train(demo_root, tmp_path_factory) -> Callable[..., tuple[Path, str]]:
    """tiny_train(*extra_args) -> (run folder, stdout) of `train.py TINY_TRAIN_ARGS extra_args` on demo_root.

    Each distinct argument list trains once per session, so test modules share runs (e.g. the mask
    and gender-age models serve both the task tests and the ensemble tests).
    """
    import train

    runs: dict[tuple[str, ...], tuple[Path, str]] = {}

    def run(*extra: str) -> tuple[Path, str]:
        if extra not in runs:
            model_dir = tmp_path_factory.mktemp("runs")
            out = io.StringIO()
            with _one_thread(), contextlib.redirect_stdout(out):
                rc = train.main([*TINY_TRAIN_ARGS, "--data_dir", str(demo_root / "train"),
                                 "--model_dir", str(model_dir), *extra])
            assert rc == 0, out.getvalue()[-3000:]
            (run_dir,) = [p for p in model_dir.iterdir() if p.is_dir()]
            runs[extra] = (run_dir, out.getvalue())
        return runs[extra]

    return run


@pytest.fixture(scope="session")
def tiny_train_args() -> tuple[str, ...]:
    """The arguments every tiny_train run starts with (to repeat a run by hand)."""
    return TINY_TRAIN_ARGS


@pytest.fixture(scope="session")
def trained_run(tiny_train) -> Path:
    """Run folder of one tiny 18-class model (SmallCNN 48x36, 2 epochs) on demo_root."""
    return tiny_train()[0]


@pytest.fixture(scope="session")
def mask_run(tiny_train) -> tuple[Path, str]:
    """(run folder, stdout) of a tiny 3-class mask model (MaskSplitByProfileDatasetForAlbumOnlyMask, 1 epoch)."""
    return tiny_train(*MASK_ARGS)


@pytest.fixture(scope="session")
def genderage_run(tiny_train) -> tuple[Path, str]:
    """(run folder, stdout) of a tiny 6-class gender-age model (...OnlyGenderAge, 1 epoch)."""
    return tiny_train(*GENDERAGE_ARGS)


@pytest.fixture(scope="session")
def multi_run(tiny_train) -> tuple[Path, str]:
    """(run folder, stdout) of a tiny multi-head model (--task multi, 1 epoch)."""
    return tiny_train(*MULTI_ARGS)
