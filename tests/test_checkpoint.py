"""checkpoint.py: a file that is no readable checkpoint, and a run's arrays that are not complete, are one
`error:` line naming the file, whatever torch or numpy said (an empty EOFError, a page of weights_only advice)."""
from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
import torch

from maskcls import cli
import inference
from maskcls.checkpoint import CheckpointError, atomic_save, load_array, load_checkpoint, resolve_state_path, run_folder


def _message(path) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    text = str(caught.value)
    assert "\n" not in text and text.endswith(f": {path}"), text
    return text


def test_zero_byte_checkpoint_says_it_is_empty(tmp_path):
    (tmp_path / "best_f1.pth").write_bytes(b"")  # `: > run/best_f1.pth`: torch raises EOFError('')
    assert "checkpoint is empty (0 bytes" in _message(tmp_path / "best_f1.pth")


def test_config_json_given_as_checkpoint_says_it_is_not_one(tmp_path):
    (tmp_path / "config.json").write_text('{"model": "SmallCNN", "epochs": 2}\n')
    text = _message(tmp_path / "config.json")
    assert text.startswith("not a PyTorch checkpoint (a text file") and "weights_only" not in text


def test_truncated_and_foreign_checkpoints_are_one_line_cut_at_a_word(tmp_path):
    atomic_save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    assert "checkpoint is truncated or corrupt (RuntimeError: PytorchStreamReader" in _message(tmp_path / "cut.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pth")  # a whole pickled model, refused by weights_only
    text = _message(tmp_path / "whole.pth")
    assert "safe load refuses, torch.nn.modules.linear.Linear" in text
    # any message in parentheses ends at a word (or "..."), never mid-word as a fixed [:120] cut did
    for inner in re.findall(r"\(([^()]*)\)", text):
        assert inner.endswith(("...", "?")) or re.search(r"\w$", inner), inner


def test_empty_checkpoint_is_one_error_line_from_a_cli(tmp_path, demo_root, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_f1.pth").write_bytes(b"")
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.call(lambda: inference.main(["--data_dir", str(demo_root / "eval"), "--model_dir", str(run),
                                                "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: checkpoint is empty (0 bytes"), err
    assert str(run / "best_f1.pth") in err


@pytest.mark.parametrize("damage, fragment", [
    (lambda b: b"", "is empty (0 bytes"),
    (lambda b: b[:len(b) // 2], "is not a complete .npy array (ValueError: Failed to read all data"),
    (lambda b: b[:40], "is not a complete .npy array (ValueError: EOF"),
    (lambda b: b"not an array\n", "is not a complete .npy array"),
], ids=["empty", "truncated", "header-only", "text"])
def test_load_array_names_an_empty_or_truncated_file(tmp_path, damage, fragment):
    np.save(tmp_path / "val_probs.npy", np.random.default_rng(0).random((50, 18)))
    path = tmp_path / "val_probs.npy"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as caught:
        load_array(path, ndim=2)
    text = str(caught.value)
    assert text.startswith("val_probs.npy ") and fragment in text and text.endswith(f": {path}"), text


def test_load_array_checks_dimensions(tmp_path):
    np.save(tmp_path / "val_labels.npy", np.zeros((4, 2)))
    assert load_array(tmp_path / "val_labels.npy").shape == (4, 2)
    with pytest.raises(CheckpointError, match=r"shape \(4, 2\), expected 1 dimension"):
        load_array(tmp_path / "val_labels.npy", ndim=1)


def test_run_folder_says_what_the_path_is_instead(tmp_path):
    (tmp_path / "best_f1.pth").write_bytes(b"")
    assert run_folder(tmp_path) == tmp_path
    with pytest.raises(CheckpointError, match="not a run folder \\(a file"):
        run_folder(tmp_path / "best_f1.pth")
    with pytest.raises(CheckpointError, match="run folder not found"):
        run_folder(tmp_path / "nope")


def test_a_folder_of_runs_names_them(tmp_path):
    """--model_dir one level too high (model/ instead of model/exp): the runs inside are named."""
    for run in ("exp", "exp2"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "best_f1.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint not found: {tmp_path / 'best_f1.pth'} (present: "
                                                        "none); it holds run folders (exp, exp2): pass one of them")):
        resolve_state_path(tmp_path, "best_f1")
