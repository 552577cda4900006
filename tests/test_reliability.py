"""Reliability (issues 17, 18): unusable output paths give one line, a write that fails half-way
keeps the previous file, folders the tools did not make are never deleted, and a SIGTERM to the
process group of a training run with DataLoader workers ends quietly with a last.pth that resumes."""
from __future__ import annotations

import errno
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from maskcls import cli
from maskcls import fileio
import holdout
from maskcls import metrics

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    """As conftest.cli_env: no inherited SM_*/MLflow defaults, one thread per process."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "MLFLOW_"))}
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return out


def script(name: str, *args, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=cwd, env=env(), text=True,
                          capture_output=True, timeout=timeout)


def one_error_line(res: subprocess.CompletedProcess, *fragments: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    err = res.stderr
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (links followed) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_failing_half_way_keeps_the_previous_file(tmp_path):
    out = tmp_path / "per_class.csv"
    out.write_text("previous\n")

    def full_disk(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write("half a fi")
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError):
        fileio.atomic_write(out, full_disk)
    assert out.read_text() == "previous\n" and os.listdir(tmp_path) == ["per_class.csv"]
    # the same through a script's wrapper: one line, exit 2
    assert cli.call(lambda: fileio.atomic_write(out, full_disk)) == 2
    assert out.read_text() == "previous\n" and os.listdir(tmp_path) == ["per_class.csv"]


def test_report_writer_failing_half_way_keeps_the_previous_file(tmp_path, monkeypatch):
    """metrics.write_per_class_csv with its CSV writer dying after the header and a few rows."""
    import csv

    out = tmp_path / "per_class.csv"
    metrics.write_per_class_csv(out, [0, 1, 2, 2], [0, 1, 2, 1], "mask")
    before = out.read_bytes()
    real = csv.DictWriter.writerow
    calls = {"n": 0}

    def writerow(self, row):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", writerow)
    with pytest.raises(OSError, match="No space left"):
        metrics.write_per_class_csv(out, [0, 0, 0, 0], [1, 1, 1, 1], "mask")
    assert calls["n"] == 3 and out.read_bytes() == before and os.listdir(tmp_path) == ["per_class.csv"]


def test_atomic_write_permissions_like_open(tmp_path):
    old = os.umask(0o022)
    try:
        fileio.atomic_write_text(tmp_path / "new.txt", "x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o600)  # a file the user made private stays private when replaced
        fileio.atomic_write_bytes(kept, b"new")
        assert kept.read_bytes() == b"new" and stat.S_IMODE(kept.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_atomic_write_unusable_paths_name_the_path(tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    file = tmp_path / "a_file"
    file.write_text("x")
    for path, why in ((folder, "Is a directory"), (tmp_path / "missing" / "x.csv", "No such file or directory"),
                      (file / "x.csv", "Not a directory")):
        assert cli.call(lambda: fileio.atomic_write_text(path, "data")) == 2
        assert capsys.readouterr().err == f"error: {why}: {path}\n"  # the user's path, not a temp file
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_folder"] and os.listdir(folder) == []

    def disk_full(tmp):  # as a write() or torch.save raises it: an errno, no file name
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    target = tmp_path / "best_f1.pth"
    assert cli.call(lambda: fileio.atomic_write(target, disk_full)) == 2
    assert capsys.readouterr().err == f"error: No space left on device: {target}\n"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_folder"]  # no temp file left


# --------------------------------------------------------------------------- folders
def test_check_apart(tmp_path):
    data = tmp_path / "demo" / "train"
    data.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "demo")
    for out, relation in ((tmp_path / "demo", "contains"), (data, "is"), (data / "images" / "x", "lies inside"),
                          (tmp_path / "link", "contains"), (tmp_path / "link" / "train", "is")):
        with pytest.raises(cli.ToolkitError, match=f" {relation} the data it reads"):
            fileio.check_apart(out, [data])
    fileio.check_apart(tmp_path / "elsewhere", [data])
    fileio.check_apart(tmp_path / "demo" / "train2", [data])  # a sibling with a common prefix is fine


def test_replace_folder_only_replaces_its_own(tmp_path):
    out = tmp_path / "out"
    fileio.replace_folder(out, lambda d: (d / "a").write_text("1"), marker=".m", tool="t.py")
    assert (out / "a").read_text() == "1" and (out / ".m").is_file()
    fileio.replace_folder(out, lambda d: (d / "b").write_text("2"), marker=".m", tool="t.py")
    assert sorted(os.listdir(out)) == [".m", "b"]

    def crash(d: Path) -> None:
        (d / "c").write_text("half")
        raise RuntimeError("crash while building")

    with pytest.raises(RuntimeError):
        fileio.replace_folder(out, crash, marker=".m", tool="t.py")
    assert sorted(os.listdir(out)) == [".m", "b"] and sorted(os.listdir(tmp_path)) == ["out"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "precious").write_text("p")
    with pytest.raises(cli.ToolkitError, match="was not made by t.py"):
        fileio.replace_folder(theirs, lambda d: None, marker=".m", tool="t.py")
    assert (theirs / "precious").read_text() == "p"
    assert sorted(os.listdir(tmp_path)) == ["out", "theirs"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """S/demo with train/, eval/, gt/, like the README's demo layout."""
    from demo_data import generate

    return generate(tmp_path_factory.mktemp("S") / "demo", people=12, size=(24, 32), eval_people=6)


@pytest.mark.parametrize("where", ["parent", "equal", "inside", "images"])
def test_holdout_refuses_out_overlapping_the_data_and_the_source_survives(source, where):
    """Issue 18 item 1: `holdout.py --data_dir S/demo/train --out S/demo` used to rmtree the images."""
    before = tree(source)
    out = {"parent": source, "equal": source / "train", "inside": source / "train" / "images" / "local",
           "images": source / "train" / "images"}[where]
    res = script("holdout.py", "--data_dir", source / "train", "--out", out)
    one_error_line(res, "the data it reads", str(out))
    assert tree(source) == before
    assert not any(p.is_symlink() for p in source.rglob("*"))


def test_holdout_out_rules(source, tmp_path):
    file = tmp_path / "a_file"
    file.write_text("x")
    one_error_line(script("holdout.py", "--data_dir", source / "train", "--out", file), "not a folder", str(file))
    theirs = tmp_path / "theirs"
    (theirs / "results").mkdir(parents=True)
    one_error_line(script("holdout.py", "--data_dir", source / "train", "--out", theirs),
                   "was not made by holdout.py", holdout.MARKER)
    assert os.listdir(theirs) == ["results"]
    one_error_line(script("holdout.py", "--data_dir", source / "train" / "train.csv", "--out", tmp_path / "x"),
                   "is a file", f"e.g. {source / 'train'}")
    one_error_line(script("holdout.py", "--data_dir", source / "train", "--out", tmp_path / "x", "--val_ratio", "1"),
                   "--val_ratio must be in (0, 1), got 1")

    local = tmp_path / "local"
    holdout.make_holdout(source / "train", local, val_ratio=0.25, seed=0)
    first = tree(local)
    assert (local / holdout.MARKER).is_file() and (local / "gt" / "gt.csv").is_file()
    holdout.make_holdout(source / "train", local, val_ratio=0.5, seed=1)  # its own folder: replaced
    assert tree(local) != first and (local / holdout.MARKER).is_file()
    # a hold-out of the hold-out must not land where its links point either
    one_error_line(script("holdout.py", "--data_dir", local / "train", "--out", source / "train" / "x"),
                   "the data it reads")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "local", "theirs"]  # no temp folders left


def test_folders_made_by_the_tools_honour_the_umask(source, tmp_path):
    old = os.umask(0o022)
    try:
        out = holdout.make_holdout(source / "train", tmp_path / "local", val_ratio=0.25, seed=0)
    finally:
        os.umask(old)
    for path in (out, out / "gt", out / "gt" / "gt.csv", out / holdout.MARKER):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # readable by group and others


# --------------------------------------------------------------------------- SIGTERM to the process group
def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_sigterm_to_the_process_group_of_a_training_run(demo_root, tiny_train_args, tmp_path):
    """`kill -- -PGID` (SLURM's scancel, timeout, most schedulers) while DataLoader workers run:
    the one 'interrupted ... --resume' line, no traceback from the workers, exit 143, and the
    last.pth it names resumes."""
    model_dir = tmp_path / "runs"
    argv = [sys.executable, str(ROOT / "train.py"), *tiny_train_args, "--data_dir", str(demo_root / "train"),
            "--model_dir", str(model_dir), "--epochs", "300", "--num_workers", "1"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 240
    try:
        # epoch 2 under way: epoch 1 is complete and in last.pth, the workers are busy
        while not any(re.match(r"epoch 2 \[", line) for line in seen):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(seen)[-3000:]
            seen.append(line)
        pgid = os.getpgid(proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    while (line := lines.get(timeout=30)) is not None:
        seen.append(line)
    # the workers went with it: no process of the group is left behind
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"processes of group {pgid} still running after the run exited")
    output = "".join(seen)
    assert "Traceback" not in output and "DataLoader worker" not in output, output[-3000:]
    assert "Exception ignored" not in output, output[-3000:]
    interrupted = [line for line in seen if "interrupted" in line]
    assert len(interrupted) == 1 and "--resume" in interrupted[0], output[-3000:]
    assert code == 143, (code, output[-2000:])  # 128 + SIGTERM

    match = re.search(r"--resume (\S+)", interrupted[0])
    last = Path(match.group(1))
    held = int(re.search(r"holds epoch (\d+)", interrupted[0]).group(1))
    assert last.name == "last.pth" and last.is_file() and held >= 1
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_train_args,
                          "--data_dir", str(demo_root / "train"), "--model_dir", str(model_dir),
                          "--resume", str(last), "--epochs", str(held + 1)],
                         cwd=tmp_path, env=env(), text=True, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"epoch {held + 1}/{held + 1}:" in res.stdout and f"epoch {held}/" not in res.stdout
    assert "Traceback" not in res.stderr


def test_demo_data_out_that_is_a_file(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("x")
    one_error_line(script("demo_data.py", "--out", file, "--people", "6", "--eval_people", "6"),
                   "not a folder", str(file))
    assert file.read_text() == "x"


def test_script_warnings_are_one_short_line_each(source, tmp_path):
    """Issue 18 item 5: Python's two-line warning format (with the source line) and one warning
    per incomplete person hid the real error; now one `warning:` line sums them up."""
    import shutil

    train = tmp_path / "train"
    shutil.copytree(source / "train", train)
    for person in sorted((train / "images").iterdir())[:5]:
        (person / "normal.jpg").unlink()
    res = script("holdout.py", "--data_dir", train, "--out", tmp_path / "local")
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("warning: 5 incomplete person(s)") and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.rstrip().endswith("and 2 more") and "warnings.warn" not in res.stderr


# --------------------------------------------------------------------------- unusable output paths, every script
def test_unusable_output_paths_of_train_inference_calibrate_evaluation(trained_run, demo_root, tiny_train_args,
                                                                        tmp_path):
    """A file where a folder is expected, and a folder without write permission: one line, exit 2."""
    import shutil

    file = tmp_path / "a_file"
    file.write_text("x")
    one_error_line(script("train.py", *tiny_train_args, "--epochs", "1", "--data_dir", demo_root / "train",
                          "--model_dir", file), str(file))
    one_error_line(script("inference.py", "--data_dir", demo_root / "eval", "--model_dir", trained_run,
                          "--output_dir", file, "--num_workers", "0"), str(file))
    one_error_line(script("inference.py", "--data_dir", demo_root / "eval", "--model_dir", trained_run,
                          "--output_dir", file / "sub", "--num_workers", "0"), str(file))
    assert file.read_text() == "x"
    one_error_line(script("evaluation.py", "--gt", file, "--pred", file))
    if os.geteuid() != 0:  # root writes anywhere: the permission case only means something for users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        one_error_line(script("inference.py", "--data_dir", demo_root / "eval", "--model_dir", trained_run,
                              "--output_dir", locked / "out", "--num_workers", "0"), str(locked))
    # calibrate --write into a checkpoint whose folder cannot take the new file
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "best_f1.pth").unlink()
    (run / "best_f1.pth").mkdir()  # a folder where the checkpoint should be
    one_error_line(script("calibrate.py", "--runs", run, "--write"), "best_f1.pth")
