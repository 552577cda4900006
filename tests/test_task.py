"""The pieces of the issue-13 redesign: the task object, the checkpoint format, the loop functions
called without the CLI, the --config round trip, MLproject against train.py's flags, the
years age head end to end and the warmed-up EMA."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import calibrate
import dataset as data
import inference
import train
from maskcls.checkpoint import CheckpointError, build_model, load_checkpoint, set_decision
from maskcls.task import (AGE_THRESHOLDS, Task, age_group_probs_from_survival, apply_offsets, decide, get_task,
                          join_labels, split_labels, split_probs, task_of)
from maskcls import imaging
from maskcls import augment
from maskcls import loaders
from maskcls.ema import ModelEma

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- task
@pytest.mark.parametrize("name, parts", [("all", (3, 2, 3)), ("genderage", (None, 2, 3)), ("mask", (3, None, None))])
def test_label_parts_round_trip_and_marginals(name, parts):
    n = get_task(name).num_classes
    labels = np.arange(n)
    split = split_labels(name, labels)
    assert [None if p is None else int(p.max()) + 1 for p in split] == list(parts)
    assert (join_labels(name, *split) == labels).all()
    if name != "mask":  # the competition's encoding: class = m*6 + g*3 + a, genderage = g*3 + a
        assert (split[2] == labels % 3).all() and (split[1] == labels // 3 % 2).all()
    probs = np.random.default_rng(0).dirichlet(np.ones(n), size=5)
    for part, marginal in zip(split, split_probs(name, probs)):
        assert (part is None) == (marginal is None)
        if marginal is not None:  # the marginal sums the classes that carry each value of the part
            expected = np.stack([probs[:, part == v].sum(1) for v in range(int(part.max()) + 1)], axis=1)
            np.testing.assert_allclose(marginal, expected)
    with pytest.raises(ValueError, match="need the gender"):
        join_labels("genderage", age=np.zeros(2, dtype=int))


def test_task_shapes_and_targets():
    assert get_task("all").head_sizes is None and get_task("all").num_classes == 18
    assert get_task("multi").head_sizes == (3, 2, 3)
    years = get_task("multi", "years")
    assert years.head_sizes == (3, 2, len(AGE_THRESHOLDS)) and years.num_classes == 18
    assert years.target(2, 1, 61, (30, 60)) == (2, 1, 61)  # trained on the raw age
    assert get_task("multi").target(2, 1, 61, (30, 60)) == (2, 1, 2)
    assert get_task("genderage").label(0, 1, 45, (30, 60)) == 4
    assert years.label(2, 1, 59, (30, 58)) == 2 * 6 + 3 + 2
    with pytest.raises(ValueError, match="needs --task multi"):
        Task("all", "years")
    spread = get_task("multi", "bins", 3)
    assert spread.age_in_years and not get_task("multi").age_in_years
    assert spread.target(2, 1, 58, (30, 60)) == (2, 1, 58) and spread.head_sizes == (3, 2, 3)  # years in, 3 groups out
    assert spread.label(2, 1, 58, (30, 60)) == 2 * 6 + 3 + 1
    assert spread.batch_labels(torch.tensor([[2, 1, 58], [0, 0, 60]]), (30, 60)).tolist() == [2 * 6 + 3 + 1, 2]
    targets = np.array([[2, 1, 58], [0, 0, 20]])
    assert len(spread.head_labels(targets)) == len(spread.head_classes()) == 2  # no class weights for ages
    assert task_of({"task": "multi", "task_options": spread.to_dict()}) == spread
    assert task_of({"task": "multi", "task_options": {"age_head": "bins"}}).age_sigma == 0.0  # older files
    with pytest.raises(ValueError, match="--age_sigma needs --task multi"):
        Task("all", "bins", 2.0)
    with pytest.raises(ValueError, match="--age_sigma must be a number of years >= 0"):
        Task("multi", "bins", -1.0)
    with pytest.raises(ValueError, match="known tasks"):
        get_task("gender")


def test_years_head_probabilities_follow_the_cut_points():
    years = get_task("multi", "years")
    logits = torch.full((1, 5 + len(AGE_THRESHOLDS)), -20.0)
    logits[0, 2] = logits[0, 3] = 20.0  # not wear, male
    ages = torch.tensor(AGE_THRESHOLDS)
    logits[0, 5:] = torch.where(ages <= 59, 20.0, -20.0)  # P(age >= t) = 1 up to 59: a 59-year-old
    assert years.probs(logits, (30, 60)).argmax(1).item() == 2 * 6 + 0 + 1  # 30-59
    assert years.probs(logits, (30, 58)).argmax(1).item() == 2 * 6 + 0 + 2  # >=58
    p = years.probs(torch.randn(4, 5 + len(AGE_THRESHOLDS)), (30, 60))
    assert torch.allclose(p.sum(1), torch.ones(4), atol=1e-5)
    survival = np.array([[0.9, 0.5, 0.2]])
    with pytest.raises(ValueError, match="cut points"):
        age_group_probs_from_survival(survival, (10, 60))


def test_decision_rule_and_renormalised_probabilities_agree():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(18), size=50)
    offsets = rng.normal(size=18)
    adjusted = apply_offsets(probs, offsets)
    assert np.allclose(adjusted.sum(1), 1) and (adjusted.argmax(1) == decide(probs, offsets)).all()
    assert (decide(probs) == probs.argmax(1)).all() and apply_offsets(probs, None) is probs


# --------------------------------------------------------------------------- checkpoint format
def test_load_checkpoint_says_what_is_wrong(trained_run, tmp_path):
    ckpt = load_checkpoint(trained_run / "best_f1.pth")
    assert ckpt["format"] == "mask-toolkit/1" and task_of(ckpt).name == "all"
    old = dict(ckpt)
    del old["format"]
    torch.save(old, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="no format version"):
        load_checkpoint(tmp_path / "old.pth")
    torch.save(dict(ckpt, format="other-tool/3"), tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="other-tool/3"):
        load_checkpoint(tmp_path / "foreign.pth")
    torch.save(ckpt["state_dict"], tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="bare state_dict"):
        load_checkpoint(tmp_path / "bare.pth")


def test_set_decision_checks_sizes(trained_run, tmp_path):
    path = tmp_path / "best_f1.pth"
    shutil.copy(trained_run / "best_f1.pth", path)
    assert set_decision(path, [0.5] * 18)["class_offsets"] == [0.5] * 18
    assert load_checkpoint(path)["class_offsets"] == [0.5] * 18
    with pytest.raises(CheckpointError, match="18 classes, offsets have 3"):
        set_decision(path, [0.0] * 3)
    with pytest.raises(CheckpointError, match="years age head"):
        set_decision(path, age_cuts=(30, 58))


# --------------------------------------------------------------------------- loop functions without the CLI
def test_train_one_epoch_and_validate_called_directly(demo_root):
    from model import create_model

    torch.manual_seed(0)
    task = get_task("multi")
    samples = data.discover(demo_root / "train", verbose=False)
    store = imaging.ImageStore([s.path for s in samples], (32, 24), None)
    train_idx, val_idx = data.split_by_profile(samples, 0.25, 0, (30, 60))
    train_set = data.MaskDataset(samples, store, train_idx, task, (30, 60), train=True)
    val_set = data.MaskDataset(samples, store, val_idx, task, (30, 60))
    loader = loaders.make_loader(train_set, 64, shuffle=True)
    model = create_model("SmallCNN", 18, multihead=task.head_sizes)
    args = train.build_parser().parse_args(["--epochs", "1", "--lr", "0.003"])
    opt = train.build_optimisation(args, model, task, np.array(train_set.targets), len(loader), torch.device("cpu"), False)
    transform = augment.BatchTransform((0.5,) * 3, (0.5,) * 3)
    metrics = train.train_one_epoch(model, loader, opt, transform, task, (30, 60), torch.device("cpu"), log_interval=10**6)
    assert metrics["train_images"] == len(train_set) and 0 <= metrics["train_acc"] <= 1 and metrics["train_loss"] > 0
    val = train.validate(model, loaders.make_loader(val_set, 100), opt.criterion, transform, task, (30, 60),
                         torch.device("cpu"))
    assert val.probs.shape == (len(val_set), 18) and val.logits.shape == (len(val_set), 8)
    assert np.allclose(val.probs.sum(1), 1, atol=1e-5) and (val.pred == val.probs.argmax(1)).all()


def test_ema_warm_up_follows_the_model_early():
    model = torch.nn.Linear(4, 2)
    ema = ModelEma(model, 0.999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update mostly copies
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, model.weight - 0.1, atol=1e-6)
    for _ in range(10_000):
        ema.update(model)
    assert ema.current_decay() == 0.999


# --------------------------------------------------------------------------- config round trip
def test_config_round_trip_reproduces_a_run(trained_run, tmp_path, capsys):
    config = json.loads((trained_run / "config.json").read_text())
    assert "resolved" in config and config["resolved"]["resize"] == [48, 36]
    args = train.parse_args(["--config", str(trained_run / "config.json"), "--epochs", "1"])
    assert args.epochs == 1  # the command line wins
    assert args.seed == config["seed"] and args.resize == config["resize"] and args.model == config["model"]
    rc = train.main(["--config", str(trained_run / "config.json"), "--epochs", "1",
                     "--model_dir", str(tmp_path / "m"), "--tracking_uri", "none"])
    assert rc == 0
    (run,) = (tmp_path / "m").iterdir()
    again = json.loads((run / "config.json").read_text())
    assert again["epochs"] == 1 and {k: v for k, v in again.items() if k not in ("epochs", "model_dir", "config",
                                                                                  "resolved")} == \
        {k: v for k, v in config.items() if k not in ("epochs", "model_dir", "config", "resolved")}
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(yaml.safe_dump({"lr": 0.01, "batch_size": 16}))
    assert train.parse_args(["--config", str(yaml_file)]).batch_size == 16
    yaml_file.write_text(yaml.safe_dump({"learning_rate": 0.01}))
    with pytest.raises(train.UsageError, match="unknown keys learning_rate"):
        train.parse_args(["--config", str(yaml_file)])


@pytest.mark.parametrize("text, message", [
    ("epochs: 1.5", "--config epochs: expected an int, got 1.5"),
    ("batch_size: 16.0", "--config batch_size: expected an int, got 16.0"),
    ("epochs: true", "--config epochs: expected a number, got True"),
    ("epochs: null", "--config epochs: needs a value"),
    ("resize: 32", "--config resize: expected a list [H, W] as --resize takes, got 32"),
    ("resize: [32, 32.5]", "--config resize: expected an int, got 32.5"),
    ("scheduler: cosin", "--config scheduler: unknown value 'cosin' (known: none, step, cosine, plateau, onecycle)"),
    ("mode: al", "--config mode: unknown value 'al' (known: split, all)"),
    ("class_weights: Auto", "--config class_weights: unknown value 'Auto'"),
    ("cache: maybe", "--config cache: expected True or False, got 'maybe'"),
    ("fold: one", "--config fold: expected a fold number or all"),
])
def test_config_values_are_checked_as_the_flags_are(tmp_path, text, message):
    """argparse applies neither type, nargs nor choices to defaults: a config file's value must not reach
    the run unchecked (a float epoch count crashed in the scheduler; `cosin` silently became cosine)."""
    config = tmp_path / "c.yaml"
    config.write_text(text + "\n")
    with pytest.raises(train.UsageError) as info:
        train.parse_args(["--config", str(config)])
    assert str(info.value).startswith(message) and str(config) in str(info.value)


def test_config_values_parse_as_on_the_command_line(tmp_path):
    """YAML 1.1 reads 2e-3 as text and `yes` as a bool: both mean what the same flag would."""
    config = tmp_path / "c.yaml"
    config.write_text("lr: 2e-3\namp: null\ncache: yes\nname: 123\nkfold: 3\nfold: all\nresize: [32, 48]\n"
                      "scheduler: cosine\nhead_weights: [1, 1, 2]\n")
    args = train.parse_args(["--config", str(config)])
    assert args.lr == 0.002 and isinstance(args.lr, float)
    assert args.amp is None and args.cache is True and args.name == "123" and args.fold == "all"
    assert args.resize == [32, 48] and args.scheduler == "cosine" and args.head_weights == [1.0, 1.0, 2.0]


def test_every_mlproject_parameter_is_a_train_flag_with_the_same_default():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    main = project["entry_points"]["main"]
    defaults = vars(train.build_parser().parse_args([]))
    for name, spec in main["parameters"].items():
        assert name in defaults, f"MLproject parameter {name} is not a train.py flag"
        assert f"--{name}" in main["command"], name
        flag_default, default = defaults[name], spec["default"]
        if default == "":  # "flag not passed": train.py's own default applies
            continue
        if isinstance(flag_default, list):
            flag_default = " ".join(str(v) for v in flag_default)
        elif isinstance(flag_default, bool):
            flag_default = str(flag_default)
        assert str(default) == str(flag_default) or float(default) == float(flag_default), name


# --------------------------------------------------------------------------- names and numbers before any work
@pytest.mark.parametrize("flag, value, message", [
    ("--criterion", "focal_loss", "did you mean 'focal'"), ("--model", "resnet18", "did you mean 'ResNet18'"),
    ("--optimizer", "adamw", "did you mean 'AdamW'"), ("--lr", "-1", "--lr must be >= 0"),
    ("--epochs", "0", "--epochs must be > 0"), ("--resize", "224", "H W, e.g. 224 224"),
    ("--age_sigma", "2", "--age_sigma needs --task multi"), ("--age_sigma", "nan", "--age_sigma must be"),
    ("--name", "../escaped", "--name must be a folder name")])
def test_bad_values_fail_before_any_work(flag, value, message, tmp_path):
    with pytest.raises(train.UsageError, match=re.escape(message)):
        train.main([flag, *value.split(), "--data_dir", str(tmp_path / "none"), "--model_dir", str(tmp_path / "m"),
                    "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert not (tmp_path / "m").exists() and not (tmp_path / "mlflow.db").exists()  # no run, no FAILED run


# --------------------------------------------------------------------------- years age head end to end
def test_years_age_head_trains_calibrates_and_predicts(tiny_train, demo_root, tmp_path, capsys):
    run, out = tiny_train("--task", "multi", "--age_head", "years", "--epochs", "2")
    ckpt = load_checkpoint(run / "best_f1.pth")
    assert ckpt["model"]["heads"] == [3, 2, len(AGE_THRESHOLDS)] and ckpt["task_options"]["age_head"] == "years"
    assert ckpt["age_cuts"] == [30, 60] and build_model(ckpt)(torch.zeros(2, 3, 48, 36)).shape == (2, 5 + len(AGE_THRESHOLDS))
    assert np.load(run / "val_logits.npy").shape[1] == 5 + len(AGE_THRESHOLDS)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert calibrate.main(["--runs", str(copy), "--write"]) == 0
    printed = capsys.readouterr().out
    cuts = load_checkpoint(copy / "best_f1.pth")["age_cuts"]
    assert f"age cut points: {cuts[0]} {cuts[1]}" in printed
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(copy), "--output_dir",
                           str(tmp_path / "out"), "--num_workers", "0"]) == 0
    assert (tmp_path / "out" / "output.csv").is_file()


def test_spread_age_labels_train_and_predict(tiny_train, demo_root, tmp_path):
    run, out = tiny_train("--task", "multi", "--age_sigma", "3", "--epochs", "1")
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["task_options"] == {"name": "multi", "age_head": "bins", "age_sigma": 3.0}
    assert ckpt["model"]["heads"] == [3, 2, 3] and "age labels spread by 3 years" in out
    assert json.loads((run / "config.json").read_text())["age_sigma"] == 3.0
    assert inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(run), "--output_dir",
                           str(tmp_path / "out"), "--num_workers", "0"]) == 0
    predicted = np.loadtxt(tmp_path / "out" / "output.csv", delimiter=",", skiprows=1, usecols=1)
    assert predicted.size > 0 and predicted.min() >= 0 and predicted.max() < 18


def test_calibrate_refuses_a_cross_validated_claim_for_overlapping_runs(trained_run, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(trained_run, a)
    shutil.copytree(trained_run, b)
    assert calibrate.main(["--runs", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "no cross-validated estimate" in out and "cross-validated (" not in out
    assert "validation predictions (people repeated across runs) from 2 run(s)" in out and "out-of-fold" not in out


def test_recipe_config_files_are_valid_train_configs():
    """Recipes are config files plus a few overrides: every shipped one parses, with flags winning."""
    for config in sorted((ROOT / "recipes").glob("*.yaml")):
        args = train.parse_args(["--config", str(config), "--data_dir", "somewhere", "--epochs", "1"])
        assert args.epochs == 1 and args.data_dir == "somewhere"
        assert args.model == yaml.safe_load(config.read_text())["model"]


KNOWN_RECIPE_MODELS = "face portrait flip fastaug fastaug96 erase faceprobe"


@pytest.mark.parametrize("models, message", [("flip bogus", f"unknown model 'bogus' (known: {KNOWN_RECIPE_MODELS})"),
                                             # every name the message lists is one flags_of accepts
                                             (f"{KNOWN_RECIPE_MODELS} bogus", "unknown model 'bogus'"),
                                             (" ", f"MODELS is empty (known: {KNOWN_RECIPE_MODELS})")])
def test_realface_recipe_rejects_unknown_models_before_training(tmp_path, models, message):
    """A typo in MODELS stops the recipe at once, not after the first model's training."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "recipes" / "realface_cpu.sh"), "train", "eval", str(out)],
                            env={**os.environ, "MODELS": models}, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr
    assert not out.exists()


def run_recipe_recording_calls(tmp_path, **env) -> tuple[list[list[str]], list[list[str]], Path]:
    """Run realface_cpu.sh with a fake `python` that records each command instead of training: the
    train.py and inference.py argument lists, and the output folder."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "recipes" / "realface_cpu.sh"), "train", "eval", str(out)],
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in calls.read_text().splitlines()]
    return [a for a in lines if a[0] == "train.py"], [a for a in lines if a[0] == "inference.py"], out


def flag_value(argv: list[str], flag: str) -> str:
    """The word after `flag` in a recorded command line."""
    return argv[argv.index(flag) + 1]


def test_realface_recipe_default_fine_tunes_the_face_network(tmp_path):
    """The default trains one model, dlib's face network with its last two stages fine-tuned, and predicts
    with it alone (last epoch, flip TTA)."""
    trains, predict, out = run_recipe_recording_calls(tmp_path)
    assert [flag_value(a, "--name") for a in trains] == ["face"]
    argv = trains[0][1:]
    argv[argv.index("--config") + 1] = str(ROOT / flag_value(argv, "--config"))  # the recipe runs from the repo root
    face = train.parse_args(argv)  # what train.py would make of it, yaml included
    assert (face.model, face.freeze_blocks, face.resize, face.lr, face.epochs, face.augmentation, face.face_crop) == (
        "DlibFaceResNet", 3, [150, 150], 0.001, 6, "FastAugmentation", "none")
    args = inference.build_parser().parse_args(predict[0][1:])
    assert args.tta == "hflip" and args.state == "last"
    assert args.model_dir == [str(out / "model" / "face")]


def test_realface_recipe_votes_several_models_geometrically(tmp_path):
    """MODELS="fastaug faceprobe" (the earlier default): the CNN and the frozen face network, one geometric
    vote; VOTE=mean switches the rule."""
    trains, predict, out = run_recipe_recording_calls(tmp_path, MODELS="fastaug faceprobe")
    assert [flag_value(a, "--name") for a in trains] == ["fastaug", "faceprobe"]
    assert "--model" not in trains[0] and flag_value(trains[0], "--augmentation") == "FastAugmentation"
    probe = trains[1]
    assert (flag_value(probe, "--model"), flag_value(probe, "--freeze_blocks"),
            probe[probe.index("--resize") + 1:][:2]) == ("DlibFaceResNet", "5", ["150", "150"])
    args = inference.build_parser().parse_args(predict[0][1:])
    assert args.vote == "geometric" and args.tta == "hflip" and args.state == "last"
    assert args.model_dir == [str(out / "model" / n) for n in ("fastaug", "faceprobe")]
    _, predict, _ = run_recipe_recording_calls(tmp_path / "mean", MODELS="fastaug faceprobe", VOTE="mean")
    assert inference.build_parser().parse_args(predict[0][1:]).vote == "mean"


def test_realface_recipe_trains_a_repeated_model_with_the_next_seed(tmp_path):
    """MODELS="fastaug96 fastaug96 flip": each run its own folder and seed, all of them soft-voted."""
    trains, predict, out = run_recipe_recording_calls(tmp_path, MODELS="fastaug96 fastaug96 flip", SEED="3")
    assert [(flag_value(a, "--name"), flag_value(a, "--seed")) for a in trains] == [
        ("fastaug96", "3"), ("fastaug96-seed4", "4"), ("flip", "3")]
    assert flag_value(trains[0], "--resize") == "96" and "--resize" not in trains[2]
    assert len(predict) == 1
    runs = predict[0][predict[0].index("--model_dir") + 1:predict[0].index("--state")]
    assert runs == [str(out / "model" / n) for n in ("fastaug96", "fastaug96-seed4", "flip")]
