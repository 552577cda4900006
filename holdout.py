"""Carve a person-level hold-out out of a training set, in the competition's layouts,
so a whole pipeline (train -> inference -> evaluation, ensembles, TTA, offsets) can be
scored locally exactly as the leaderboard would:

    python holdout.py --data_dir /data/train --out /tmp/local --val_ratio 0.2 --seed 0
    # -> /tmp/local/train/images/<person>/...  (symlinks)   train with --data_dir /tmp/local/train
    #    /tmp/local/eval/info.csv + eval/images/<ImageID>   predict with inference.py
    #    /tmp/local/gt/gt.csv                               score with evaluation.py

The split is `split_by_profile` (stratified by gender x age, no person on both sides).
Images are symlinked, not copied, so it is instant and costs no disk.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

import pandas as pd

import dataset as data


def make_holdout(data_dir: str | os.PathLike, out: str | os.PathLike, val_ratio: float = 0.2, seed: int = 0,
                 age_bins=data.DEFAULT_AGE_BINS) -> Path:
    samples = data.discover(data_dir, age_bins=age_bins, verbose=False)
    train_idx, val_idx = data.split_by_profile(samples, val_ratio, seed, age_bins)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
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
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    people = len({samples[i].person for i in val_idx})
    print(f"hold-out: {len(train_idx)} training images, {len(val_idx)} evaluation images ({people} people) in {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="training set (train/ or train/images)")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--val_ratio", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--age_bins", nargs=2, type=int, default=list(data.DEFAULT_AGE_BINS), help="bins of gt.csv labels")
    args = p.parse_args(argv)
    make_holdout(args.data_dir, args.out, args.val_ratio, args.seed, tuple(args.age_bins))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
