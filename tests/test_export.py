"""export.py (issue 15 item 3): ONNX, TorchScript and pt2 files that run without the toolkit give
inference.py's probabilities and classes (18-class, multi-head, years age head, decision offsets);
unusable --out and a failed self-check write nothing. The module fixtures serve test_predict too."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from maskcls import cli
import dataset as data
import export
import inference
from maskcls.checkpoint import load_checkpoint, set_decision
from maskcls.task import Task, apply_offsets, task_of
from maskcls import imaging

pytestmark = pytest.mark.usefixtures("single_thread")
FEW = 24  # eval images the comparisons use


@pytest.fixture(scope="module")
def few_eval(demo_root, tmp_path_factory) -> Path:
    """An eval folder (info.csv + images/) with the first FEW demo eval images."""
    root = tmp_path_factory.mktemp("few_eval")
    (root / "images").symlink_to(demo_root / "eval" / "images")
    pd.read_csv(demo_root / "eval" / "info.csv").head(FEW).to_csv(root / "info.csv", index=False)
    return root


def infer(eval_dir: Path, out_dir: Path, *args) -> tuple[np.ndarray, np.ndarray]:
    """inference.py in-process -> (output.csv classes, output_probs.csv probabilities) in info.csv order."""
    assert inference.main(["--data_dir", str(eval_dir), "--output_dir", str(out_dir), "--num_workers", "0",
                           *map(str, args)]) == 0
    probs = pd.read_csv(out_dir / "output_probs.csv").drop(columns="ImageID").to_numpy(np.float64)
    return pd.read_csv(out_dir / "output.csv")["ans"].to_numpy(), probs


def copy_run(run: Path, dst: Path, offsets: bool = False) -> Path:
    """best_f1.pth and val_samples.csv of a run in a new folder; `offsets`: with decision offsets that
    boost three classes (so the decided classes differ from plain arg-max)."""
    dst.mkdir(parents=True)
    for name in ("best_f1.pth", "val_samples.csv"):
        shutil.copy2(run / name, dst / name)
    if offsets:
        b = np.zeros(18)
        b[[4, 9, 16]] = 1.5
        set_decision(dst / "best_f1.pth", class_offsets=b.tolist())
    return dst


@pytest.fixture(scope="module")
def offsets_run(trained_run, tmp_path_factory) -> Path:
    return copy_run(trained_run, tmp_path_factory.mktemp("offsets") / "run", offsets=True)


def export_run(capsys, *args) -> str:
    """export.main in-process; returns its stdout after checking its parity line."""
    assert export.main([*map(str, args), "--check_images", "6"]) == 0
    out = capsys.readouterr().out
    diff = float(re.search(r"max \|p_\w+ - p_pytorch\| = (\S+),", out).group(1))
    assert diff < 1e-4 and re.search(r"classes agree on (\d+)/\1\b", out), out
    return out


def pipeline_images(eval_dir: Path, ckpt: dict) -> np.ndarray:
    """uint8 [N, H, W, 3] as the toolkit's pipeline decodes, crops and resizes the eval images."""
    pre = ckpt["preprocess"]
    store = imaging.ImageStore(data.read_eval_info(eval_dir)[1], pre["resize"], pre["crop"])
    return np.stack([store[i] for i in range(len(store))])


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_inputs()[0].type == "tensor(uint8)"
    return session.run(None, {"images": images})[0]


def assert_matches(exported: np.ndarray, ans: np.ndarray, probs: np.ndarray) -> None:
    assert exported.shape == probs.shape and exported.dtype == np.float32
    assert np.abs(exported - probs).max() < 1e-4
    assert (exported.argmax(1) == ans).all()


# --------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("run_fixture", ["trained_run", "multi_run"])
def test_onnx_matches_inference(run_fixture, request, few_eval, tmp_path, capsys):
    run = request.getfixturevalue(run_fixture)
    run = run[0] if isinstance(run, tuple) else run
    out = tmp_path / "model.onnx"
    printed = export_run(capsys, "--model_dir", run, "--format", "onnx", "--out", out)
    assert "validation images (val_samples.csv)" in printed and "uint8 [N, 48, 36, 3]" in printed
    ans, probs = infer(few_eval, tmp_path / "inf", "--model_dir", run)
    exported = run_onnx(out, pipeline_images(few_eval, load_checkpoint(run / "best_f1.pth")))
    assert_matches(exported, ans, probs)
    assert len(set(ans)) > 1  # a model that predicts one class everywhere would prove little


def test_decision_offsets_give_inference_classes(offsets_run, few_eval, tmp_path, capsys):
    printed = export_run(capsys, "--model_dir", offsets_run, "--format", "onnx")
    assert "after the checkpoints' decision offsets" in printed
    ans, probs = infer(few_eval, tmp_path / "inf", "--model_dir", offsets_run)
    ckpt = load_checkpoint(offsets_run / "best_f1.pth")
    assert (ans != probs.argmax(1)).any()  # the offsets decide some images differently
    exported = run_onnx(offsets_run / "best_f1.onnx", pipeline_images(few_eval, ckpt))
    assert (exported.argmax(1) == ans).all()
    assert np.abs(exported - apply_offsets(probs, ckpt["class_offsets"])).max() < 1e-4
    np.testing.assert_allclose(exported.sum(1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- soft votes
def test_cross_validation_folder_is_its_folds_vote_with_flip_tta(trained_run, multi_run, few_eval, tmp_path, capsys):
    """A --fold all folder exports as inference.py predicts it: the mean of its folds (here an 18-class and a
    multi-head model), each image averaged with its mirror image; the file goes in the folder."""
    cv = tmp_path / "cv"
    copy_run(trained_run, cv / "fold0")
    copy_run(multi_run[0], cv / "fold1")
    printed = export_run(capsys, "--model_dir", cv, "--format", "onnx", "--tta", "hflip")
    assert "soft vote of 2 models, weights 0.5 0.5; tta hflip" in printed and f"wrote {cv / 'best_f1.onnx'}" in printed
    ans, probs = infer(few_eval, tmp_path / "inf", "--model_dir", cv, "--tta", "hflip")
    exported = run_onnx(cv / "best_f1.onnx", pipeline_images(few_eval, load_checkpoint(cv / "fold0" / "best_f1.pth")))
    assert_matches(exported, ans, probs)
    _, plain = infer(few_eval, tmp_path / "plain", "--model_dir", cv)
    assert np.abs(exported - plain).max() > 1e-3  # the flip is inside the file: without it the answer differs


def test_weighted_vote_with_offsets_needs_out_and_matches_inference(offsets_run, multi_run, few_eval, tmp_path,
                                                                     capsys):
    """Several --model_dir with --weights: the weighted mean, then the weighted mean of their offsets."""
    other = copy_run(multi_run[0], tmp_path / "other")
    set_decision(other / "best_f1.pth", class_offsets=np.linspace(-1, 1, 18).tolist())
    argv = ["--model_dir", offsets_run, other, "--weights", "3", "1", "--format", "pt2"]
    one_error_line(capsys, argv, "--out is needed for the vote of 2 --model_dir")
    out = tmp_path / "vote.pt2"
    printed = export_run(capsys, *argv, "--out", out)
    assert "weights 0.75 0.25; tta none" in printed and "after the checkpoints' decision offsets" in printed
    ans, probs = infer(few_eval, tmp_path / "inf", "--model_dir", offsets_run, other, "--weights", "3", "1")
    images = torch.from_numpy(pipeline_images(few_eval, load_checkpoint(other / "best_f1.pth")))
    with torch.inference_mode():
        exported = torch.export.load(str(out)).module()(images).numpy()
    assert (exported.argmax(1) == ans).all()
    a, b = (np.array(load_checkpoint(r / "best_f1.pth")["class_offsets"]) for r in (offsets_run, other))
    assert np.abs(exported - apply_offsets(probs, (3 * a + b) / 4)).max() < 1e-4


def test_models_with_different_inputs_are_refused(trained_run, tmp_path, capsys):
    small = copy_run(trained_run, tmp_path / "small")
    ckpt = torch.load(small / "best_f1.pth", weights_only=True)
    ckpt["preprocess"]["resize"] = [32, 24]
    torch.save(ckpt, small / "best_f1.pth")
    one_error_line(capsys, ["--model_dir", trained_run, small, "--format", "onnx", "--out", tmp_path / "v.onnx"],
                   "the models take different inputs", "resize to 32x24", "export them one at a time")
    assert not (tmp_path / "v.onnx").exists()


# --------------------------------------------------------------------------- TorchScript, pt2, defaults
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt, name", [("torchscript", "best_f1.torchscript.pt"), ("pt2", "best_f1.pt2")])
def test_torch_formats_load_and_match_with_default_paths(fmt, name, trained_run, few_eval, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    export_run(capsys, "--model_dir", run, "--format", fmt, "--out", tmp_path / "serve" / "new" / name)
    assert (tmp_path / "serve" / "new" / name).is_file()  # missing folders of --out are made
    printed = export_run(capsys, "--model_dir", run, "--format", fmt)
    assert f"wrote {run / name}" in printed and sorted(p.name for p in run.iterdir()) == sorted(
        ["best_f1.pth", "val_samples.csv", name])  # nothing else, no temp file left
    module = torch.jit.load(str(run / name)) if fmt == "torchscript" else torch.export.load(str(run / name)).module()
    images = torch.from_numpy(pipeline_images(few_eval, load_checkpoint(run / "best_f1.pth")))
    with torch.inference_mode():
        exported = torch.cat([module(images[:1]), module(images[1:])]).numpy()  # batch size is free
    assert_matches(exported, *infer(few_eval, tmp_path / "inf", "--model_dir", run))


def test_years_age_head_with_fitted_cuts(tiny_train, few_eval, tmp_path, capsys):
    run = copy_run(tiny_train("--task", "multi", "--age_head", "years", "--epochs", "1")[0], tmp_path / "run")
    set_decision(run / "best_f1.pth", age_cuts=[27, 52])
    ckpt = load_checkpoint(run / "best_f1.pth")
    assert task_of(ckpt).age_head == "years"
    export_run(capsys, "--model_dir", run, "--format", "onnx")
    ans, probs = infer(few_eval, tmp_path / "inf", "--model_dir", run)
    assert_matches(run_onnx(run / "best_f1.onnx", pipeline_images(few_eval, ckpt)), ans, probs)


def test_export_survival_equals_cummin():
    logits = torch.randn(64, 57) * 3  # independent sigmoids: the curves cross, cummin matters
    cummin = Task.survival(logits)
    assert not torch.equal(cummin, logits.sigmoid())
    assert torch.equal(export.ExportTask.survival(logits), cummin)


def test_synthetic_images_when_the_validation_images_are_gone(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    data_dir = load_checkpoint(run / "best_f1.pth")["resolved"]["data_dir"]  # a photo of it, deleted since
    (run / "val_samples.csv").write_text(f"path,person,kind,age\n{data_dir}/images/gone_p/mask1.jpg,p,mask1,30\n")
    printed = export_run(capsys, "--model_dir", run, "--format", "pt2")
    assert "parity on 6 synthetic images" in printed


# --------------------------------------------------------------------------- errors
def one_error_line(capsys, argv: list, *fragments: str) -> None:
    assert cli.call(lambda: export.main([*map(str, argv), "--check_images", "2"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)


def test_unusable_out_gives_one_error_line(trained_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    outs = [(tmp_path, "is a folder"), (a_file / "m.onnx", "a file is in the way"),
            (a_file / "sub" / "m.onnx", "a file is in the way")]
    outs += [(locked / "new" / "m.onnx", "no permission to write in")] if os.geteuid() != 0 else []  # root: anywhere
    for out, why in outs:
        one_error_line(capsys, ["--model_dir", trained_run, "--format", "onnx", "--out", out], out, why)
    one_error_line(capsys, ["--model_dir", tmp_path / "nope", "--format", "onnx"], tmp_path / "nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "locked"] and not any(locked.iterdir())


def test_failed_self_check_keeps_the_previous_file(trained_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"previous")
    real = export.load_exported
    monkeypatch.setattr(export, "load_exported", lambda path, fmt: (lambda x: real(path, fmt)(x) + 1e-3))
    one_error_line(capsys, ["--model_dir", trained_run, "--format", "pt2", "--out", out],
                   "disagrees with PyTorch", "nothing written", out)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_negative_tolerance_is_refused_when_parsed(trained_run, tmp_path, capsys):
    """Not after a whole export as `disagrees with PyTorch: 3.6e-07 > --tolerance -1`."""
    with pytest.raises(SystemExit) as exit_:
        export.main(["--model_dir", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                     "--tolerance", "-1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: argument --tolerance: must be >= 0, got -1")
    assert not any(tmp_path.iterdir())
