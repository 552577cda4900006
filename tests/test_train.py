"""train.py end to end on the synthetic demo data (CPU, 48x36 inputs, a few epochs).

Runs are in-process (`train.main`) except where the CLI's exit code and one-line error are
the point. Shared runs come from conftest (`trained_run`, `mask_run`, ...).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

import dataset as data
import train
from maskcls.checkpoint import CheckpointError, build_model, load_checkpoint
from maskcls import augment
from maskcls import loaders
from maskcls import runtime

pytestmark = pytest.mark.usefixtures("single_thread")

TABLE_ROW = re.compile(r"^\s*(\d+)  (.+?)\s+(\d+)\s+(\d+)\s+(?:[\d.]+%|-)\s+\d+\s", re.M)


def run_train(tmp_path: Path, base: tuple[str, ...], data_dir: Path, *extra: str) -> tuple[int, Path]:
    """train.main(base + data/model dirs + extra) in-process; (exit code, run folder)."""
    model_dir = tmp_path / "models"
    rc = train.main([*base, "--data_dir", str(data_dir), "--model_dir", str(model_dir), *extra])
    runs = sorted(p for p in model_dir.iterdir() if p.is_dir())
    return rc, runs[-1]


def last_table(out: str) -> list[tuple[int, str, int, int]]:
    """(class, name, correct, total) rows of the last per-class table printed."""
    tables = out.split("class  name")
    assert len(tables) > 1, f"no per-class table in:\n{out[-2000:]}"
    return [(int(c), n, int(k), int(t)) for c, n, k, t in TABLE_ROW.findall(tables[-1])]


def epochs_trained(out: str) -> list[int]:
    return [int(e) for e in re.findall(r"^epoch (\d+)/\d+: train loss", out, re.M)]


def val_split(ckpt: dict) -> tuple[list[data.Sample], list[int]]:
    """The validation split a checkpoint's run used, rebuilt from its recorded arguments."""
    a = ckpt["args"]
    samples = data.discover(a["data_dir"], age_bins=tuple(a["age_bins"]), verbose=False)
    _, val_idx = data.split_indices(samples, a["dataset"], a["val_ratio"], a["seed"], tuple(a["age_bins"]),
                                    a["kfold"], a["fold"])
    return samples, val_idx


def assert_same(a, b, where: str = "") -> None:
    """Exact equality of nested dicts/lists of tensors and numbers (optimizer state dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "n/a"
            pytest.fail(f"{where} differs (max abs difference {diff})")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --------------------------------------------------------------------------- outputs of a short run
def test_short_run_writes_every_output(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"best.pth", "best_f1.pth", "last.pth", "config.json", "confusion_matrix.png", "per_class.csv"} <= names
    assert any(n.startswith("events.out.tfevents.") for n in names)
    assert (trained_run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(n.endswith(".tmp") for n in names)  # atomic writes leave no temp files

    config = json.loads((trained_run / "config.json").read_text())
    every_flag = vars(train.build_parser().parse_args([]))
    assert set(every_flag) <= set(config)
    assert config["epochs"] == 2 and config["resize"] == [48, 36] and config["model"] == "SmallCNN"
    assert config["resolved"]["task"] == "all" and config["resolved"]["run_dir"] == str(trained_run)

    rows = (trained_run / "per_class.csv").read_text().splitlines()
    assert rows[0].startswith("class,name,correct,total,accuracy") and len(rows) == 1 + 18

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run)).Reload()
    for tag in ("train_loss", "val_f1", "val_acc", "lr"):
        assert [e.step for e in events.Scalars(tag)] == [0, 1], tag


@pytest.mark.parametrize("name", ["best.pth", "best_f1.pth", "last.pth"])
def test_checkpoints_are_self_describing(trained_run, name):
    ckpt = torch.load(trained_run / name, map_location="cpu", weights_only=True)
    assert ckpt["model"]["name"] == "SmallCNN" and ckpt["model"]["num_classes"] == 18
    assert ckpt["task"] == "all" and len(ckpt["classes"]) == 18 and ckpt["age_bins"] == [30, 60]
    pre = ckpt["preprocess"]
    assert pre["resize"] == [48, 36] and pre["crop"] is None and len(pre["mean"]) == len(pre["std"]) == 3
    assert ckpt["epoch"] in (0, 1) and {"val_f1", "val_acc", "train_loss"} <= set(ckpt["metrics"])
    if name == "last.pth":
        assert ckpt["epoch"] == 1
        assert {"optimizer", "scheduler", "rng", "best", "state_dict_train"} <= set(ckpt)
    x = torch.zeros(2, 3, 48, 36)
    assert build_model(ckpt)(x).shape == (2, 18)


def test_logged_f1_equals_sklearn_on_recomputed_predictions(trained_run):
    from maskcls.predictor import predict_probs

    ckpt = load_checkpoint(trained_run / "best_f1.pth")
    samples, val_idx = val_split(ckpt)
    truth = np.array([samples[i].label18((30, 60)) for i in val_idx])
    assert set(truth) == set(range(18))  # every class in validation: sklearn's label set is all 18
    probs = predict_probs(ckpt, [samples[i].path for i in val_idx], batch_size=50, progress=False)
    pred = probs.argmax(1)
    assert ckpt["metrics"]["val_f1"] == pytest.approx(f1_score(truth, pred, average="macro"), abs=1e-12)
    assert ckpt["metrics"]["val_acc"] == pytest.approx(float(np.mean(truth == pred)), abs=1e-12)
    best = load_checkpoint(trained_run / "last.pth")["best"]
    assert best["f1"] == ckpt["metrics"]["val_f1"] and best["epoch"] == ckpt["epoch"]


# --------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def learn_root(tmp_path_factory) -> Path:
    """More people than demo_root: generalising to new faces needs many faces, not many epochs."""
    from demo_data import generate

    return generate(tmp_path_factory.mktemp("learn") / "data", people=360, size=(36, 48), eval_people=6)


def test_small_model_learns_demo_data(learn_root, tmp_path, capsys):
    rc, run = run_train(tmp_path, (), learn_root / "train", "--model", "SmallCNN", "--task", "multi",
                        "--resize", "48", "36", "--epochs", "4", "--batch_size", "32", "--num_workers", "0",
                        "--tracking_uri", "none", "--seed", "3")
    out = capsys.readouterr().out
    assert rc == 0
    f1 = load_checkpoint(run / "best_f1.pth")["metrics"]["val_f1"]
    print(f"learning: best val macro F1 {f1:.4f}")  # shown with -s; reported in the closing note
    assert f1 >= 0.9, out[-3000:]


# --------------------------------------------------------------------------- resume
def test_resume_continues_exactly(tiny_train, tiny_train_args, demo_root, tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 2 of 2, then --resume: same epochs, same optimizer state, same final weights
    as the uninterrupted run (num_workers 0, one thread: bitwise)."""
    reference = load_checkpoint(tiny_train()[0] / "last.pth")
    real_transform = augment.BatchTransform.__call__
    seen = {"validated": False, "batches_after": 0}

    def ctrl_c_in_epoch_2(self, images, train=False):
        if not train:
            seen["validated"] = True  # epoch 1 is over
        elif seen["validated"]:
            seen["batches_after"] += 1
            if seen["batches_after"] == 5:  # 4 optimizer steps into epoch 2
                raise KeyboardInterrupt
        return real_transform(self, images, train=train)

    monkeypatch.setattr(augment.BatchTransform, "__call__", ctrl_c_in_epoch_2)
    rc, run = run_train(tmp_path, tiny_train_args, demo_root / "train")
    out = capsys.readouterr().out
    assert rc == 130 and "interrupted in epoch 2" in out and epochs_trained(out) == [1]
    saved = load_checkpoint(run / "last.pth")
    assert saved["epoch"] == 0  # the last complete epoch, not the half-done one
    monkeypatch.setattr(augment.BatchTransform, "__call__", real_transform)

    loaded = {}
    original = torch.optim.Optimizer.load_state_dict

    def spy(self, state_dict):
        original(self, state_dict)
        loaded["optimizer"] = copy.deepcopy(self.state_dict())

    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", spy)
    rc, run2 = run_train(tmp_path, tiny_train_args, demo_root / "train", "--resume", str(run / "last.pth"))
    out = capsys.readouterr().out
    assert rc == 0 and run2 == run  # same folder, no exp2
    assert_same(loaded["optimizer"], saved["optimizer"], "optimizer")
    assert f"resuming from {run / 'last.pth'} at epoch 2" in out
    assert epochs_trained(out) == [2]

    rows = last_table(out)  # the per-class table of epoch 2's validation
    samples, val_idx = val_split(saved)
    assert [r[0] for r in rows] == list(range(18)) and sum(r[3] for r in rows) == len(val_idx)
    assert re.search(rf"accuracy [\d.]+% \(\d+/{len(val_idx)}\)  macro F1 [\d.]+", out)

    final = load_checkpoint(run / "last.pth")
    assert final["epoch"] == reference["epoch"] == 1
    assert_same(final["state_dict_train"], reference["state_dict_train"], "weights")
    assert_same(final["optimizer"], reference["optimizer"], "optimizer")
    assert final["metrics"]["val_f1"] == reference["metrics"]["val_f1"]


def test_resume_with_a_loader_worker_continues_exactly(tiny_train_args, demo_root, tmp_path, capsys):
    """With persistent DataLoader workers too: 2 epochs then --resume to 3 gives the weights of 3 epochs
    in one go (the loaders' worker seeds do not come from the global RNG, which the resume restores)."""
    base = [*tiny_train_args, "--scheduler", "none", "--num_workers", "1", "--data_dir", str(demo_root / "train"),
            "--model_dir", str(tmp_path)]
    assert train.main([*base, "--epochs", "3", "--name", "whole"]) == 0
    assert train.main([*base, "--epochs", "2", "--name", "part"]) == 0
    assert train.main(["--resume", str(tmp_path / "part"), "--epochs", "3"]) == 0  # a run folder: its last.pth
    assert f"resuming from {tmp_path / 'part' / 'last.pth'} at epoch 3" in capsys.readouterr().out
    whole, part = (load_checkpoint(tmp_path / name / "last.pth") for name in ("whole", "part"))
    assert part["epoch"] == whole["epoch"] == 2
    assert_same(part["state_dict_train"], whole["state_dict_train"], "weights")


def test_resume_mistakes_are_one_line_before_any_work(trained_run, tmp_path, monkeypatch, capsys):
    """A wrong --resume path makes no demo data (it used to, with no --data_dir); a finished run, another
    --resize or a folder without last.pth leave the run as it is."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = (run / "config.json").read_text()
    cases = [(["--resume", str(tmp_path / "typo" / "last.pth")], f"--resume: file not found: {tmp_path / 'typo'}"),
             (["--resume", str(tmp_path)], f"--resume: no last.pth in {tmp_path} (present: none)"),
             (["--resume", str(run / "last.pth")], "nothing to resume: " + str(run / "last.pth") + " holds epoch 2 "
              "of 2 (--epochs); give a larger --epochs"),
             (["--resume", str(run), "--epochs", "1"], "holds epoch 2 of 1"),
             (["--resume", str(run), "--epochs", "3", "--resize", "32", "24"],
              "holds another network or input (--resize [48, 36] there, [32, 24] here)")]
    for argv, message in cases:
        with pytest.raises((train.UsageError, CheckpointError), match=re.escape(message)):
            train.main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no data/demo, nothing else
    assert (run / "config.json").read_text() == config and load_checkpoint(run / "last.pth")["epoch"] == 1


def test_interrupted_before_the_first_last_pth_says_so(tmp_path):
    run = tmp_path / "my run"
    run.mkdir()
    assert "nothing to resume" in train.interrupted_message(run, 0, -1) and "best_f1" not in \
        train.interrupted_message(run, 0, -1)
    (run / "best_f1.pth").write_bytes(b"")
    assert f"{run / 'best_f1.pth'} holds the best epoch so far" in train.interrupted_message(run, 0, -1)
    (run / "last.pth").write_bytes(b"")
    message = train.interrupted_message(run, 3, 2)
    assert message.endswith(f"holds epoch 3; continue with --resume '{run / 'last.pth'}'")  # pasteable: quoted


def test_a_config_file_with_resume_says_it_is_ignored(trained_run, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"resume: {trained_run / 'last.pth'}\nepochs: 1\n")
    args = train.parse_args(["--config", str(config)])
    assert args.resume is None and args.epochs == 1
    assert "its resume key is ignored" in capsys.readouterr().err


# --------------------------------------------------------------------------- tasks and modes
@pytest.mark.parametrize("which, task, n_classes, n_outputs", [
    ("trained_run", "all", 18, 18), ("mask_run", "mask", 3, 3), ("genderage_run", "genderage", 6, 6),
    ("multi_run", "multi", 18, 8)])
def test_every_task_trains_and_records_itself(request, which, task, n_classes, n_outputs):
    run = request.getfixturevalue(which)
    run = run[0] if isinstance(run, tuple) else run
    ckpt = load_checkpoint(run / "best_f1.pth")
    assert ckpt["task"] == task and len(ckpt["classes"]) == n_classes
    assert ckpt["model"]["multihead"] == (task == "multi")
    assert build_model(ckpt)(torch.zeros(1, 3, 48, 36)).shape == (1, n_outputs)
    rows = (run / "per_class.csv").read_text().splitlines()[1:]
    assert len(rows) == n_classes
    assert 0.0 <= ckpt["metrics"]["val_f1"] <= 1.0


def test_per_class_table_matches_task(mask_run, genderage_run):
    assert [r[:2] for r in last_table(mask_run[1])] == [(0, "wear"), (1, "incorrect"), (2, "not wear")]
    assert [r[0] for r in last_table(genderage_run[1])] == list(range(6))
    assert "f1_gender" in genderage_run[1] and "f1_age" in genderage_run[1]


def test_mode_all_writes_only_last(tiny_train, demo_root):
    run, out = tiny_train("--mode", "all", "--epochs", "1")
    names = {p.name for p in run.iterdir()}
    assert "last.pth" in names and not names & {"best.pth", "best_f1.pth", "per_class.csv"}
    assert "[val]" not in out and "split: 504 train / 0 validation" in out
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["epoch"] == 0 and "val_f1" not in ckpt["metrics"]
    assert ckpt["epoch_number"] == 1 and "epoch 1/1: train loss" in out  # the number the console printed


def test_kfold_uses_the_requested_fold(tiny_train, demo_root):
    run, out = tiny_train("--kfold", "3", "--fold", "1", "--epochs", "1")
    samples = data.discover(demo_root / "train", verbose=False)
    train_idx, val_idx = data.kfold_split(samples, 3, 1, seed=1)
    assert f"split: {len(train_idx)} train / {len(val_idx)} validation images" in out
    assert not {samples[i].person for i in train_idx} & {samples[i].person for i in val_idx}
    assert sum(r[3] for r in last_table(out)) == len(val_idx)
    assert load_checkpoint(run / "last.pth")["args"]["fold"] == 1


def test_early_stopping_really_stops(tiny_train_args, tiny_root, tmp_path, capsys):
    # lr 0 and a model without BatchNorm: validation never improves after epoch 1.
    rc, run = run_train(tmp_path, tiny_train_args, tiny_root / "train", "--model", "BaseModel", "--lr", "0",
                        "--scheduler", "none", "--early_stopping", "1", "--epochs", "6")
    out = capsys.readouterr().out
    assert rc == 0 and epochs_trained(out) == [1, 2]
    assert "early stopping: no better val F1 for 1 epochs" in out
    assert load_checkpoint(run / "last.pth")["epoch"] == 1


def test_regularisation_and_sampling_options_run(tiny_train_args, demo_root, tmp_path, monkeypatch, capsys):
    calls = []
    real_mix = train.mix_batch

    def counting_mix(images, *rest):
        calls.append(images.shape[0])
        return real_mix(images, *rest)

    monkeypatch.setattr(train, "mix_batch", counting_mix)
    rc, run = run_train(tmp_path, tiny_train_args, demo_root / "train", "--epochs", "1", "--mixup", "0.4",
                        "--cutmix", "1.0", "--ema", "0.9", "--accum_steps", "2", "--clip_grad", "1.0",
                        "--sampler", "weighted", "--class_weights", "auto", "--criterion", "focal")
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    batches = math.ceil(int(re.search(r"split: (\d+) train", out)[1]) / 32)
    assert len(calls) == batches  # every training batch was mixed
    last = load_checkpoint(run / "last.pth")
    assert last["ema"] is not None
    assert last["scheduler"]["last_epoch"] == math.ceil(batches / 2)  # one optimizer step per 2 batches
    # checkpoints hold the EMA weights for inference, the raw ones for resuming
    assert any(not torch.equal(last["state_dict"][k], v) for k, v in last["state_dict_train"].items()
               if v.is_floating_point())


# --------------------------------------------------------------------------- small separate set
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    from demo_data import generate

    return generate(tmp_path_factory.mktemp("tiny") / "data", people=12, size=(48, 64), eval_people=6)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_amp_channels_last_build_and_run_on_cpu(tiny_train_args, tiny_root, tmp_path, monkeypatch, capsys,
                                                native_bf16):
    """bf16 autocast trains on a CPU; one without native bf16 (emulated, ~10x slower) says so."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native_bf16)
    used = []
    real_autocast = torch.autocast

    def recording_autocast(device_type, dtype=None, enabled=True, **kw):
        used.append((device_type, dtype, enabled))
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    rc, run = run_train(tmp_path, tiny_train_args, tiny_root / "train", "--epochs", "1", "--amp", "True",
                        "--channels_last", "True", "--compile", "False")
    out = capsys.readouterr().out
    assert rc == 0 and "amp True, channels_last True" in out
    assert ("warning: --amp True: this CPU has no native bf16" in out) is not native_bf16
    assert ("cpu", torch.bfloat16, True) in used
    ckpt = load_checkpoint(run / "last.pth")
    conv = next(v for v in ckpt["state_dict"].values() if v.dim() == 4)  # the first convolution
    assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_cpu_defaults_reuse_memory_and_no_decoding_worker_on_two_cores(tiny_train_args, tiny_root, tmp_path,
                                                                       monkeypatch, capsys):
    """On a 2-core CPU train.py decodes in the main process (no worker) and asks malloc to keep freed
    memory, and config.json records both; --reuse_memory False leaves malloc alone."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    calls = []
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: calls.append(1) or True)
    i = tiny_train_args.index("--num_workers")
    defaults = tiny_train_args[:i] + tiny_train_args[i + 2:]  # the worker count left to train.py
    rc, run = run_train(tmp_path, defaults, tiny_root / "train", "--epochs", "1", "--cache", "False")
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert rc == 0 and calls == [1] and resolved["reuse_memory"] is True and resolved["num_workers"] == 0
    assert "workers 0, reuse_memory True" in capsys.readouterr().out
    rc, run = run_train(tmp_path, tiny_train_args, tiny_root / "train", "--epochs", "1", "--reuse_memory", "False",
                        "--name", "plain")
    assert rc == 0 and calls == [1] and json.loads((run / "config.json").read_text())["resolved"]["reuse_memory"] is False


def test_default_num_workers_by_cores_and_device(monkeypatch):
    for cores, cpu, gpu in ((1, 0, 0), (2, 0, 1), (4, 3, 3), (16, 8, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert loaders.default_num_workers(cpu_training=True) == cpu, cores
        assert loaders.default_num_workers() == gpu, cores
        assert loaders.default_num_workers(cached=True) == 0, cores  # --cache: nothing left to decode after epoch 1


def test_reuse_freed_memory_sets_glibc_malloc_or_says_no(monkeypatch):
    import platform


    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert runtime.reuse_freed_memory() is True
        x = torch.ones(64, 3, 224, 224)  # a block glibc would otherwise mmap: still works, still freed
        assert float(x.sum()) == 64 * 3 * 224 * 224
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", ""))
    assert runtime.reuse_freed_memory() is False  # another C library: nothing is changed


def test_compile_flag_wraps_the_model(tiny_train_args, tiny_root, tmp_path, monkeypatch):
    """--compile True goes through torch.compile; the "eager" backend keeps the test free of
    C++ code generation while still tracing the model with TorchDynamo."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kw):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    rc, run = run_train(tmp_path, tiny_train_args, tiny_root / "train", "--epochs", "1", "--compile", "True")
    assert rc == 0 and len(compiled) == 1
    assert load_checkpoint(run / "last.pth")["args"]["compile"] is True
    assert not any(k.startswith("_orig_mod") for k in load_checkpoint(run / "last.pth")["state_dict"])


def test_corrupt_image_fails_cleanly_or_is_skipped(tiny_train_args, tiny_root, tmp_path, cli, capsys):
    data_dir = tmp_path / "train"
    shutil.copytree(tiny_root / "train", data_dir)
    bad = sorted((data_dir / "images").glob("*/mask3.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated JPEG

    proc = cli(["train.py", *tiny_train_args, "--data_dir", data_dir, "--model_dir", tmp_path / "m"])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: truncated JPEG") and str(bad) in lines[0], stderr
    assert not (tmp_path / "m").exists()  # failed before creating a run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, run = run_train(tmp_path, tiny_train_args, data_dir, "--epochs", "1", "--skip_bad_images")
    out = capsys.readouterr().out
    assert rc == 0 and (run / "last.pth").exists()
    assert any(str(bad) in str(w.message) for w in caught)
    assert f"{12 * 7 - 1} images" in out  # the bad one dropped, the rest trained on


@pytest.mark.parametrize("flag, bad, known", [("--model", "NoSuchNet", "SmallCNN"),
                                              ("--dataset", "NoSuchSet", "MaskSplitByProfileDataset"),
                                              ("--augmentation", "NoSuchAug", "BaseAugmentation")])
def test_unknown_name_is_a_usage_error_listing_known(flag, bad, known, tmp_path):
    with pytest.raises(train.UsageError) as err:
        train.main([flag, bad, "--data_dir", str(tmp_path), "--model_dir", str(tmp_path / "m"), "--tracking_uri", "none"])
    message = str(err.value)
    assert "\n" not in message and bad in message and known in message
    assert not (tmp_path / "m").exists()


def test_unknown_name_cli_prints_one_line_and_exits_2(cli, tmp_path):
    proc = cli(["train.py", "--model", "NoSuchNet", "--data_dir", tmp_path, "--model_dir", tmp_path / "m",
                "--tracking_uri", "none"])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stdout + stderr
    assert stderr.startswith("error: unknown model 'NoSuchNet'; known: ") and stderr.count("\n") == 1, stderr
    assert "SmallCNN" in stderr and not (tmp_path / "m").exists()


def test_dropout_and_drop_path_are_recorded_and_rebuilt(tiny_train_args, demo_root, tmp_path):
    """--dropout / --drop_path are build options: in config.json, in the checkpoint, and inference rebuilds them."""
    import inference

    rc, run = run_train(tmp_path, tiny_train_args, demo_root / "train", "--model", "timm:resnet18", "--pretrained",
                        "False", "--resize", "32", "32", "--epochs", "1", "--mode", "all", "--dropout", "0.1",
                        "--drop_path", "0.1")
    assert rc == 0
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["model"]["options"] == {"dropout": 0.1, "drop_path": 0.1}
    config = json.loads((run / "config.json").read_text())
    assert config["dropout"] == 0.1 and config["drop_path"] == 0.1
    assert build_model(ckpt).net.drop_rate == 0.1
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(run), "--state", "last",
                           "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]) == 0
    assert len(pd.read_csv(tmp_path / "out" / "output.csv")) == len(pd.read_csv(demo_root / "eval" / "info.csv"))
    with pytest.raises(train.UsageError, match="SmallCNN has no --drop_path"):
        train.main(["--model", "SmallCNN", "--drop_path", "0.2", "--data_dir", str(demo_root / "train"),
                    "--model_dir", str(tmp_path / "m"), "--tracking_uri", "none"])
    assert not (tmp_path / "m").exists()


def test_freeze_blocks_is_recorded_and_rebuilt_frozen(tiny_train_args, demo_root, tmp_path, monkeypatch):
    """--freeze_blocks is a build option: in config.json and the checkpoint; the stem and the first stages
    leave training exactly as they were built, the rest learns, and inference rebuilds the frozen network."""
    import inference
    import model as zoo

    built = {}
    real_create = zoo.create_model

    def spy(*a, **k):
        net = real_create(*a, **k)
        if next(net.parameters()).device.type != "meta":  # not the flag check's build on the meta device
            built.setdefault("initial", {n: v.clone() for n, v in net.state_dict().items()})
        return net

    monkeypatch.setattr(zoo, "create_model", spy)
    rc, run = run_train(tmp_path, tiny_train_args, demo_root / "train", "--model", "EfficientNetLite0",
                        "--pretrained", "False", "--resize", "32", "32", "--mode", "all", "--epochs", "1",
                        "--freeze_blocks", "2")
    assert rc == 0
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["model"]["options"] == {"freeze_blocks": 2}
    assert json.loads((run / "config.json").read_text())["freeze_blocks"] == 2
    initial, trained = built["initial"], ckpt["state_dict"]
    frozen = [k for k in trained if k.startswith(("net.conv_stem.", "net.bn1.", "net.blocks.0.", "net.blocks.1."))]
    assert frozen and all(torch.equal(initial[k], trained[k]) for k in frozen)  # weights and BN statistics
    later = [k for k in trained if k.startswith(("net.blocks.2.", "net.classifier."))]
    assert later and sum(not torch.equal(initial[k], trained[k]) for k in later) > len(later) // 2
    rebuilt = build_model(ckpt)
    assert not any(p.requires_grad for p in rebuilt.net.blocks[1].parameters())
    assert all(p.requires_grad for p in rebuilt.net.blocks[2].parameters())
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(run), "--state", "last",
                           "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]) == 0
    assert len(pd.read_csv(tmp_path / "out" / "output.csv")) == len(pd.read_csv(demo_root / "eval" / "info.csv"))
    with pytest.raises(train.UsageError, match=r"--freeze_blocks must be in \[0, 7\]"):
        train.main(["--model", "EfficientNetLite0", "--pretrained", "False", "--freeze_blocks", "8",
                    "--data_dir", str(demo_root / "train"), "--model_dir", str(tmp_path / "m"), "--tracking_uri", "none"])
    assert not (tmp_path / "m").exists()


def test_resume_alone_continues_the_run_as_it_was_trained(tiny_train_args, demo_root, tmp_path, capsys):
    """`train.py --resume <run>/last.pth` without the training flags rebuilds the run's own network (its
    config.json); flags that build another network are one line naming the difference."""
    rc, run = run_train(tmp_path, tiny_train_args, demo_root / "train", "--model", "EfficientNetLite0",
                        "--pretrained", "False", "--resize", "32", "32", "--mode", "all", "--epochs", "1",
                        "--freeze_blocks", "2")
    assert rc == 0
    capsys.readouterr()
    assert train.main(["--resume", str(run / "last.pth"), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'last.pth'} at epoch 2" in out and "model EfficientNetLite0" in out
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["epoch"] == 1 and ckpt["model"]["options"] == {"freeze_blocks": 2}
    assert ckpt["preprocess"]["resize"] == [32, 32]
    with pytest.raises(CheckpointError, match=r"holds another network or input \(model options \{'freeze_blocks': 2\} "
                                              r"there, \{'freeze_blocks': 1\} here\)"):
        train.main(["--resume", str(run / "last.pth"), "--epochs", "3", "--freeze_blocks", "1"])
    assert load_checkpoint(run / "last.pth")["epoch"] == 1


def test_vit_trains_and_predicts_at_a_non_default_size(tiny_train_args, demo_root, tmp_path):
    """ViT positional embeddings are sized for the input: the size is a build option, recorded
    in the checkpoint, so inference rebuilds the same network."""
    import inference

    rc, run = run_train(tmp_path, tiny_train_args, demo_root / "train", "--model", "ViTPretrainedFreeze",
                        "--pretrained", "False", "--resize", "32", "32", "--epochs", "1", "--mode", "all")
    assert rc == 0
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["model"]["options"] == {"image_size": 32}
    assert build_model(ckpt)(torch.zeros(1, 3, 32, 32)).shape == (1, 18)
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(run), "--state", "last",
                           "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]) == 0
    assert len(pd.read_csv(tmp_path / "out" / "output.csv")) == len(pd.read_csv(demo_root / "eval" / "info.csv"))
    with pytest.raises(train.UsageError, match="square"):
        train.main(["--model", "ViTPretrainedFreeze", "--pretrained", "False", "--resize", "32", "48",
                    "--data_dir", str(demo_root / "train"), "--model_dir", str(tmp_path / "m"), "--tracking_uri", "none"])


def test_an_augmentation_that_crops_the_frame_trains_and_records_its_crop(tiny_train):
    # its crop is (mode, height, width): the empty-crop check once compared the mode with a number
    run, _ = tiny_train("--augmentation", "MyAugmentationCenter", "--epochs", "1")
    assert load_checkpoint(run / "best_f1.pth")["preprocess"]["crop"] == ["center", 256, 256]
