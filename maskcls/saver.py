"""The one writer of a run's checkpoints, and the keeper of the policy that decides them: best.pth (the best
validation accuracy), best_f1.pth (the best macro F1, whose epoch also restarts the early-stopping count) and
last.pth (every epoch, with the state --resume needs)."""
from __future__ import annotations

import os
from pathlib import Path

from maskcls.checkpoint import RESUME_KEYS, STATE_FILES, atomic_save


class CheckpointSaver:
    """The one writer of a run's checkpoints (best.pth, best_f1.pth, last.pth)."""

    def __init__(self, run_dir: str | os.PathLike, metadata: dict, best: dict | None = None) -> None:
        """`best`: the run's best scores so far, kept up to date in place (a resumed run passes its own)."""
        self.run_dir = Path(run_dir)
        self.metadata = metadata
        self.best = best if best is not None else new_best()
        self.improved: list[str] = []  # the best files this epoch's scores improve, to save

    def score(self, epoch: int, accuracy: float, f1: float) -> list[str]:
        """Take an epoch's validation scores; returns (and keeps in `improved`) the best files they improve."""
        self.improved = [name for name, key, value in (("best.pth", "acc", accuracy), ("best_f1.pth", "f1", f1))
                         if value > self.best[key]]
        if "best.pth" in self.improved:
            self.best["acc"] = accuracy
        if "best_f1.pth" in self.improved:
            self.best.update(f1=f1, epoch=epoch, stale=0)
        else:
            self.best["stale"] += 1
        return self.improved

    def save_best(self, state_dict: dict, epoch: int, metrics: dict) -> list[Path]:
        """The best files this epoch improved (`score`)."""
        return [self.save(name, state_dict, epoch, metrics) for name in self.improved]

    def save_last(self, state_dict: dict, epoch: int, metrics: dict, resume: dict) -> Path:
        """last.pth, with `resume` (every RESUME_KEYS but `best`, which the saver adds)."""
        return self.save("last.pth", state_dict, epoch, metrics, resume={**resume, "best": dict(self.best)})

    def save(self, filename: str, state_dict: dict, epoch: int, metrics: dict, resume: dict | None = None) -> Path:
        """`resume`: the extra state (RESUME_KEYS) that lets --resume continue exactly."""
        if filename not in STATE_FILES:
            raise ValueError(f"unknown checkpoint name {filename!r}; known: {', '.join(STATE_FILES)}")
        ckpt = dict(self.metadata, state_dict=state_dict, epoch=epoch, epoch_number=epoch + 1, metrics=dict(metrics))
        if resume is not None:
            missing = set(RESUME_KEYS) - set(resume)
            if missing:
                raise ValueError(f"resume state lacks {sorted(missing)}")
            ckpt.update(resume)
        path = self.run_dir / filename
        atomic_save(ckpt, path)
        return path


def new_best() -> dict:
    """A run's best scores before its first validation."""
    return {"acc": -1.0, "f1": -1.0, "epoch": -1, "stale": 0}
