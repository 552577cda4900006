"""cli.py: one-line errors and exit codes, signals, one-line warnings, name and number validators."""
from __future__ import annotations

import argparse
import errno
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch

from maskcls import cli

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- names
def test_choose_accepts_known_names_and_suggests_near_misses():
    criteria = ["cross_entropy", "focal", "label_smoothing", "f1"]
    assert cli.choose("focal", criteria, "--criterion") == "focal"
    with pytest.raises(cli.UsageError) as err:
        cli.choose("focal_loss", criteria, "--criterion")
    assert str(err.value) == ("unknown --criterion 'focal_loss'; known: cross_entropy, focal, label_smoothing, f1 "
                              "(did you mean 'focal'?)")
    models = ["BaseModel", "ResNet18", "ResNet18Freeze", "Vgg11"]
    with pytest.raises(cli.UsageError, match=r"\(did you mean 'ResNet18'\?\)$"):
        cli.choose("resnet18", models, "--model")  # case differs: suggested, not silently taken
    with pytest.raises(cli.UsageError, match=r"\(did you mean 'AdamW'\?\)$"):
        cli.choose("adamw", ["SGD", "Adam", "AdamW"], "--optimizer")
    with pytest.raises(cli.UsageError) as err:
        cli.choose("zzz", models, "--model")
    assert "did you mean" not in str(err.value) and str(err.value).endswith("known: BaseModel, ResNet18, "
                                                                            "ResNet18Freeze, Vgg11")
    assert isinstance(err.value, cli.ToolkitError) and isinstance(err.value, ValueError)


def test_examples_summarise_long_lists():
    assert cli.examples(["a", "b"]) == "a, b"
    assert cli.examples([f"p{i}" for i in range(288)], sep="; ") == "p0; p1; p2; and 285 more"


# --------------------------------------------------------------------------- numbers
def test_number_validators_after_parsing():
    assert cli.positive(0.5, "--lr") == 0.5 and cli.positive("3", "--lr") == 3
    assert cli.non_negative(0, "--warmup") == 0
    assert cli.positive_int(2, "--epochs") == 2
    assert cli.in_range(0.0, 0, 1, "--val_ratio", high_open=True) == 0.0
    for call, message in (
            (lambda: cli.positive(-1, "--lr"), "--lr must be > 0, got -1"),
            (lambda: cli.positive("nan", "--lr"), "--lr must be a finite number, got 'nan'"),
            (lambda: cli.positive("abc", "--lr"), "--lr must be a number, got 'abc'"),
            (lambda: cli.non_negative(-2, "--warmup"), "--warmup must be >= 0, got -2"),
            (lambda: cli.positive_int(0, "--epochs"), "--epochs must be an integer >= 1, got 0"),
            (lambda: cli.positive_int(1.5, "--epochs"), "--epochs must be an integer >= 1, got 1.5"),
            (lambda: cli.in_range(1, 0, 1, "--val_ratio", high_open=True), "--val_ratio must be in [0, 1), got 1"),
            (lambda: cli.in_range(0, 0, 1, "--ema", low_open=True), "--ema must be in (0, 1], got 0")):
        with pytest.raises(cli.UsageError) as err:
            call()
        assert str(err.value) == message


def test_number_validators_as_argparse_types(capsys):
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--lr", type=cli.positive)
    p.add_argument("--val_ratio", type=cli.ranged(0, 1, high_open=True))
    p.add_argument("--epochs", type=cli.ranged(1, 10_000, kind=int))
    args = p.parse_args(["--lr", "1e-3", "--val_ratio", "0.2", "--epochs", "3"])
    assert (args.lr, args.val_ratio, args.epochs) == (1e-3, 0.2, 3)
    for argv, message in ((["--lr", "-1"], "argument --lr: must be > 0, got -1"),
                          (["--val_ratio", "1"], "argument --val_ratio: must be in [0, 1), got 1"),
                          (["--epochs", "2.5"], "argument --epochs: must be an integer, got 2.5")):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        assert capsys.readouterr().err.strip().endswith(f"t: error: {message}")


def test_non_negative_int_refuses_negatives_and_fractions(capsys):
    assert cli.non_negative_int(0, "--num_workers") == 0 and cli.non_negative_int("3", "--num_workers") == 3
    for value in (-1, 1.5, "abc"):
        with pytest.raises(cli.UsageError, match=r"^--num_workers must be"):
            cli.non_negative_int(value, "--num_workers")
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--num_workers", type=cli.non_negative_int)
    with pytest.raises(SystemExit):
        p.parse_args(["--num_workers", "-1"])
    assert capsys.readouterr().err.strip().endswith("t: error: argument --num_workers: must be an integer >= 0, got -1")


def test_str2bool_refuses_typos_instead_of_reading_them_as_false(capsys):
    for text, value in (("True", True), ("true", True), ("1", True), ("yes", True), ("False", False), ("0", False),
                        ("no", False), ("OFF", False)):
        assert cli.str2bool(text) is value, text
    assert cli.str2bool(True) is True
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--isEnsemble", type=cli.str2bool, default=False)
    for typo in ("Ture", "flase", ""):
        with pytest.raises(SystemExit):
            p.parse_args(["--isEnsemble", typo])
        assert capsys.readouterr().err.strip().endswith(f"t: error: argument --isEnsemble: expected True or False, "
                                                        f"got {typo!r}")


# --------------------------------------------------------------------------- cli.call / cli.run
def _raiser(exc: BaseException):
    def main() -> int:
        raise exc
    return main


def test_call_turns_user_errors_into_one_line_and_exit_2(capsys, tmp_path):
    assert cli.call(lambda: 0) == 0 and cli.call(lambda: None) == 0 and cli.call(lambda: 3) == 3
    assert cli.call(_raiser(cli.ToolkitError("bad data: x.csv"))) == 2
    assert capsys.readouterr().err == "error: bad data: x.csv\n"
    file = tmp_path / "f"
    file.write_text("")

    def mkdir_under_a_file() -> int:
        (file / "sub").mkdir()
        return 0

    assert cli.call(mkdir_under_a_file) == 2
    assert capsys.readouterr().err == f"error: Not a directory: {file / 'sub'}\n"

    def makedirs_through_a_file() -> int:
        file.mkdir(parents=True, exist_ok=True)  # the file itself where a folder should be
        return 0

    assert cli.call(makedirs_through_a_file) == 2
    assert capsys.readouterr().err == f"error: a file is in the way of a folder: {file}\n"
    assert cli.call(_raiser(PermissionError(errno.EACCES, "Permission denied", "/root/x"))) == 2
    assert capsys.readouterr().err == "error: Permission denied: /root/x\n"
    assert cli.call(_raiser(OSError(errno.ENOSPC, "No space left on device"))) == 2
    assert capsys.readouterr().err == "error: No space left on device\n"
    # an OSError about no path of the user's is a bug: the traceback stays
    with pytest.raises(ConnectionResetError):
        cli.call(_raiser(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")))
    with pytest.raises(RuntimeError):
        cli.call(_raiser(RuntimeError("a bug")))


def test_call_interrupts_are_quiet_with_128_plus_signal(capsys):
    assert cli.call(_raiser(KeyboardInterrupt())) == 130
    assert cli.call(_raiser(cli.Interrupted(signal.SIGTERM))) == 143
    assert capsys.readouterr().err == ""
    assert cli.exit_code(cli.Interrupted(signal.SIGTERM)) == 143 and cli.exit_code(KeyboardInterrupt()) == 130
    assert isinstance(cli.Interrupted(signal.SIGTERM), KeyboardInterrupt)


def test_call_installs_sigterm_handler_and_restores_it():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def main() -> int:
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # raises Interrupted right here, in the main thread
        seen["after"] = True
        return 0

    assert cli.call(main) == 143
    assert seen["handler"] not in (before, signal.SIG_DFL) and "after" not in seen
    assert signal.getsignal(signal.SIGTERM) == before


def test_warnings_print_as_one_line(capsys):
    def main() -> int:
        warnings.warn("incomplete person: 000001 lacks normal", stacklevel=1)
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.call(main) == 0
    assert capsys.readouterr().err == "warning: incomplete person: 000001 lacks normal\n"
    assert warnings.showwarning is not cli._one_line_warning  # put back afterwards


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_run_in_a_process_sigterm_exits_143_quietly(tmp_path):
    argv = _script(tmp_path, f"""
        import os, signal, sys, time, warnings
        sys.path.insert(0, {str(ROOT)!r})
        from maskcls import cli

        def main():
            warnings.warn("careful")
            try:  # "started" inside the try: a signal right after it must still reach the handler
                print("started", flush=True)
                time.sleep(60)
            except KeyboardInterrupt:
                print("interrupted: continue with --resume x", flush=True)
                raise
            return 0

        cli.run(main)
        """)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "started\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert out == "interrupted: continue with --resume x\n"
    assert err == "warning: careful\n"  # one line, no source line, no traceback


def test_run_closed_stdout_is_quiet(tmp_path):
    argv = _script(tmp_path, f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from maskcls import cli

        def main():
            for i in range(200_000):  # far more than a pipe buffer holds
                print("line", i)
            return 0

        cli.run(main)
        """)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == cli.EXIT_BROKEN_PIPE
    assert err == "", err


class _FailingImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        raise cli.ToolkitError(f"cannot decode image (OSError): /data/img{i}.jpg")


def test_an_error_raised_in_a_dataloader_worker_is_one_line(capsys):
    """A worker's error comes back with the worker's traceback as its message: only its own line shows."""
    def main() -> int:
        for _ in torch.utils.data.DataLoader(_FailingImages(), num_workers=1):
            pass
        return 0

    assert cli.call(main) == 2
    err = capsys.readouterr().err
    assert err == "error: cannot decode image (OSError): /data/img0.jpg\n"


class _VanishedImages(torch.utils.data.Dataset):
    """Each item opens `error`'s file, or raises `error` itself when it is an exception."""

    def __init__(self, error: str | OSError):
        self.error = error

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        if isinstance(self.error, OSError):
            raise self.error
        return open(self.error, "rb")


def _iterate_with_a_worker(dataset: torch.utils.data.Dataset) -> Callable[[], int]:
    def main() -> int:
        for _ in torch.utils.data.DataLoader(dataset, num_workers=1):
            pass
        return 0
    return main


def test_a_file_error_in_a_dataloader_worker_is_one_line_naming_the_file(capsys, tmp_path):
    """The DataLoader re-raises a worker's FileNotFoundError with the traceback as its only argument (no errno,
    no file name): the error's own errno and path are read back, so it reads as one in the main process does."""
    gone = tmp_path / "images" / "001_female_Asian_45" / "mask1.jpg"
    assert cli.call(_iterate_with_a_worker(_VanishedImages(str(gone)))) == 2
    assert capsys.readouterr().err == f"error: No such file or directory: {gone}\n"
    quoted = tmp_path / "it's \"here\"" / "mask1.jpg"  # a ' in the path: repr writes it in double quotes
    assert cli.call(_iterate_with_a_worker(_VanishedImages(str(quoted)))) == 2
    assert capsys.readouterr().err == f"error: No such file or directory: {quoted}\n"
    assert cli.call(_iterate_with_a_worker(_VanishedImages(OSError(errno.EIO, "Input/output error")))) == 2
    assert capsys.readouterr().err == "error: Input/output error\n"


def test_an_os_error_of_a_bug_in_a_dataloader_worker_keeps_its_traceback():
    """An OSError with no errno (or one that is not about the machine) is a bug: it is raised, not hidden."""
    with pytest.raises(OSError, match="Original Traceback"):
        cli.call(_iterate_with_a_worker(_VanishedImages(OSError("codec state is inconsistent"))))
    with pytest.raises(OSError, match="Original Traceback"):
        cli.call(_iterate_with_a_worker(_VanishedImages(OSError(errno.EINVAL, "Invalid argument"))))
