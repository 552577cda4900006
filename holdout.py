"""Carve a person-level hold-out out of a training set, in the competition's layouts,
so a whole pipeline (train -> inference -> evaluation, ensembles, TTA, offsets) can be
scored locally exactly as the leaderboard would:

    python holdout.py --data_dir /data/train --out /tmp/local --val_ratio 0.2 --seed 0
    # -> /tmp/local/train/images/<person>/...  (symlinks)   train with --data_dir /tmp/local/train
    #    /tmp/local/eval/info.csv + eval/images/<ImageID>   predict with inference.py
    #    /tmp/local/gt/gt.csv                               score with evaluation.py
    python holdout.py --data_dir /data/train --out /tmp/fold2 --kfold 5 --fold 2   # one fold of five

The split is `split_by_profile` (stratified by gender x age, no person on both sides), or with
--kfold K fold i of the person K-fold that `train.py --kfold K --fold i` uses (same seed, same
people): scoring a pipeline on every fold gives a cross-validated estimate of the whole pipeline.
Images are symlinked, not copied, so it is instant and costs no disk.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import pandas as pd

import dataset as data
from maskcls import cli
from maskcls.fileio import check_apart, replace_folder
from maskcls.task import DEFAULT_AGE_BINS

MARKER = ".mask-toolkit-holdout"  # only a folder carrying it is ever replaced


def _training_set(images: Path) -> list[Path]:
    """The folders of a training set given its images root: `train/images` and `train/` itself."""
    return [images, images.parent] if images.name == "images" else [images]


def make_holdout(data_dir: str | os.PathLike, out: str | os.PathLike, val_ratio: float = 0.2, seed: int = 0,
                 age_bins=DEFAULT_AGE_BINS, kfold: int = 0, fold: int = 0) -> Path:
    """Write the hold-out into `out`; refuses (ToolkitError) an `out` that equals, contains or lies
    inside the data, or an existing `out` that holdout.py did not make."""
    cli.in_range(val_ratio, 0, 1, "--val_ratio", low_open=True, high_open=True)
    if kfold == 1 or kfold < 0 or (kfold and not 0 <= fold < kfold):
        raise cli.UsageError(f"--kfold K (at least 2) takes --fold in 0..K-1; got --kfold {kfold} --fold {fold}")
    check_apart(out, _training_set(data.images_root(data_dir)) + [Path(data_dir)])  # before any work
    samples = data.discover(data_dir, age_bins=age_bins, verbose=False)
    # and where the images really are: a hold-out of a hold-out links to the originals
    check_apart(out, [p for root in sorted({Path(s.path).resolve().parent.parent for s in samples})
                      for p in _training_set(root)])
    train_idx, val_idx = (data.kfold_split(samples, kfold, fold, seed, age_bins) if kfold
                          else data.split_by_profile(samples, val_ratio, seed, age_bins))
    if not val_idx:
        people = len({s.person for s in samples})
        raise cli.DataError(f"--val_ratio {val_ratio} puts none of the {people} people in the hold-out; raise it")

    def build(tmp: Path) -> None:
        for i in train_idx:
            s = samples[i]
            link = tmp / "train" / "images" / s.person / Path(s.path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(s.path).resolve())
        (tmp / "eval" / "images").mkdir(parents=True)
        (tmp / "gt").mkdir()
        rows = []
        for i in val_idx:
            s = samples[i]
            # Opaque, stable names like the competition's, so nothing leaks through the file name.
            image_id = hashlib.sha1(f"{seed}:{s.path}".encode()).hexdigest() + Path(s.path).suffix.lower()
            (tmp / "eval" / "images" / image_id).symlink_to(Path(s.path).resolve())
            rows.append((image_id, s.label18(age_bins)))
        rows.sort()  # order unrelated to people
        gt = pd.DataFrame(rows, columns=["ImageID", "ans"])
        gt.to_csv(tmp / "gt" / "gt.csv", index=False)
        gt.assign(ans=0).to_csv(tmp / "eval" / "info.csv", index=False)

    out = replace_folder(out, build, marker=MARKER, tool="holdout.py")
    people = len({samples[i].person for i in val_idx})
    print(f"hold-out: {len(train_idx)} training images, {len(val_idx)} evaluation images ({people} people) in {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="training set (train/ or train/images)")
    p.add_argument("--out", required=True,
                   help=f"output folder, outside the data; an existing one is replaced only if holdout.py "
                        f"made it (it holds {MARKER})")
    p.add_argument("--val_ratio", type=float, default=0.2, help="share of people in the hold-out, in (0, 1)")
    p.add_argument("--kfold", type=int, default=0, help="K: hold out fold --fold of a person K-fold instead")
    p.add_argument("--fold", type=int, default=0, help="with --kfold: which fold (0..K-1) is held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--age_bins", nargs=2, type=int, default=list(DEFAULT_AGE_BINS), help="bins of gt.csv labels")
    args = p.parse_args(argv)
    make_holdout(args.data_dir, args.out, args.val_ratio, args.seed, tuple(args.age_bins), args.kfold, args.fold)
    return 0


if __name__ == "__main__":
    cli.run(main)
