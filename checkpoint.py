"""Self-describing checkpoints: the weights plus everything inference needs (model,
task, classes, age bins, image size, crop, normalisation, decision offsets), saved
atomically and loadable with `torch.load(weights_only=True)`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_FILES = ("best.pth", "best_f1.pth", "last.pth")


class CheckpointError(ValueError):
    """A missing, unreadable or unsuitable checkpoint; the message names the file."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_state_path(model_dir: str | os.PathLike, state: str = "best_f1.pth") -> Path:
    """`model_dir` may be a run folder or a .pth file; `state` accepts best|best_f1|last with or without .pth."""
    path = Path(model_dir)
    if path.is_file():
        return path
    name = state if state.endswith(".pth") else f"{state}.pth"
    if name not in STATE_FILES:
        raise CheckpointError(f"unknown --state {state!r}; choose one of {', '.join(STATE_FILES)}")
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    file = path / name
    if not file.is_file():
        have = ", ".join(p.name for p in sorted(path.glob("*.pth"))) or "none"
        raise CheckpointError(f"checkpoint not found: {file} (present: {have})")
    return file


def load_checkpoint(path: str | os.PathLike) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}): "
                              f"{path}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"not a checkpoint written by train.py: {path}")
    return ckpt


def build_model(ckpt: dict) -> nn.Module:
    """Rebuild the network a checkpoint describes (random init, then its weights)."""
    from model import create_model

    spec = ckpt["model"]
    model = create_model(spec["name"], spec["num_classes"], pretrained=False,
                         multihead=spec.get("multihead", False), **spec.get("options", {}))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
