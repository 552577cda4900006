"""Predict the evaluation set and write a submission.

    python inference.py --data_dir eval/ --model_dir model/exp            # output.csv + output_probs.csv
    python inference.py --model_dir model/fold0 model/fold1 model/fold2   # soft vote
    python inference.py --isEnsemble True --mask_model_dir model/mask --genderage_model_dir model/ga
    python inference.py ... --tracking_uri http://server:5000 --run_id checkpoint   # log into the training run

Everything about preprocessing (size, crop, normalisation), the model and its classes
comes from the checkpoint, so nothing here can disagree with training.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

import dataset as data
from maskcls import cli, faces, imaging, loaders
from maskcls.checkpoint import check_state_name, training_run
from maskcls.fileio import atomic_write_text
from maskcls.predictor import VOTES, InferenceError, check_submission_task, load_members, mask_genderage_pair, vote
from maskcls.runtime import resolve_device
from maskcls.tracking import add_tracking_flags, class_metrics, step_tracker


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=env("SM_CHANNEL_EVAL"), help="eval folder with info.csv and images/ (default $SM_CHANNEL_EVAL)")
    p.add_argument("--model_dir", nargs="+", default=[env("SM_CHANNEL_MODEL")] if env("SM_CHANNEL_MODEL") else None,
                   help="run folder(s) or .pth file(s); several = soft vote; a --fold all folder = its folds "
                        "(default $SM_CHANNEL_MODEL)")
    p.add_argument("--output_dir", default=env("SM_OUTPUT_DATA_DIR", "./output"), help="default $SM_OUTPUT_DATA_DIR or ./output")
    p.add_argument("--state", default="best_f1", help="best|best_f1|last (.pth optional; default best_f1: the competition scores macro F1)")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="soft-vote weight per --model_dir, >= 0 and not all 0 (default equal)")
    p.add_argument("--vote", choices=VOTES, default="mean",
                   help="how several models' probabilities combine: mean (default) or geometric (the weighted "
                        "mean of log-probabilities, renormalised)")
    p.add_argument("--batch_size", type=cli.positive_int, default=256)
    p.add_argument("--num_workers", type=cli.non_negative_int, default=loaders.default_num_workers())
    p.add_argument("--tta", choices=["none", "hflip"], default="none", help="hflip: average with the mirrored image")
    p.add_argument("--offsets", choices=["auto", "none"], default="auto",
                   help="auto: apply the per-class decision offsets saved in the checkpoint, if any")
    p.add_argument("--cache_dir", default=None, help="reuse/keep decoded eval images in a uint8 memmap cache")
    p.add_argument("--isEnsemble", type=cli.str2bool, default=False,
                   help="True: combine --mask_model_dir (3 classes) and --genderage_model_dir (6 classes)")
    p.add_argument("--mask_model_dir", default=None)
    p.add_argument("--genderage_model_dir", default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    add_tracking_flags(p, checkpoint_run=True)  # logs the parameters and the predicted class counts
    return p


ENSEMBLE_STEMS = ("output_mask", "output_genderAge", "output_ensemble")  # --isEnsemble's files beside output.csv


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def write_outputs(info: pd.DataFrame, probs: np.ndarray, pred: np.ndarray, out_dir: Path, stem: str = "output",
                  face: Sequence[str] | None = None) -> Path:
    """`<stem>.csv` (ImageID,ans in info.csv order) and `<stem>_probs.csv` (one column per class, and with a face
    stage a column `face`: where each photo's crop came from, `detected` or `fallback`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    submission = info[["ImageID"]].copy()
    submission["ans"] = pred.astype(int)
    write_csv(submission, out_dir / f"{stem}.csv")
    prob_frame = pd.DataFrame(probs, columns=[f"p{i}" for i in range(probs.shape[1])])
    prob_frame.insert(0, "ImageID", info["ImageID"].values)
    if face is not None:
        prob_frame.insert(1, "face", list(face))
    write_csv(prob_frame, out_dir / f"{stem}_probs.csv")
    return out_dir / f"{stem}.csv"


def class_count_summary(pred: np.ndarray, num_classes: int) -> str:
    counts = np.bincount(pred, minlength=num_classes)
    return "predicted per class: " + " ".join(f"{c}:{n}" for c, n in enumerate(counts))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_state_name(args.state)  # before any image is read
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    if args.isEnsemble and not (args.mask_model_dir and args.genderage_model_dir):
        raise InferenceError("--isEnsemble True needs --mask_model_dir and --genderage_model_dir")
    if not args.isEnsemble and not args.model_dir:
        raise InferenceError("no model: pass --model_dir or set SM_CHANNEL_MODEL")
    if not args.data_dir:
        raise InferenceError("no evaluation data: pass --data_dir or set SM_CHANNEL_EVAL")
    if not args.isEnsemble:
        members = load_members(args.model_dir, args.state, args.weights)
        check_submission_task(members)  # before any image is read
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InferenceError(f"--output_dir exists and is not a folder: {out_dir}")
    info, paths = data.read_eval_info(args.data_dir)
    bad = [f"{reason}: {p}" for p in paths if (reason := imaging.check_image(p))]
    if bad:  # every listed image needs a prediction: name them all before any work
        raise InferenceError(data.listed_images_error(bad, len(paths)))
    face_run = faces.FaceRun(args.cache_dir)
    run = dict(batch_size=args.batch_size, num_workers=args.num_workers, tta=args.tta, device=device,
               cache_dir=args.cache_dir, face_run=face_run)
    models = [args.mask_model_dir, args.genderage_model_dir] if args.isEnsemble else args.model_dir

    def checkpoint_run(client) -> str:  # --run_id checkpoint
        return training_run(models, client)

    tracker = step_tracker(args, "inference", {"data_dir": args.data_dir, "model_dir": models, "state": args.state,
                                               "weights": args.weights, "vote": args.vote, "tta": args.tta, "offsets": args.offsets,
                                               "isEnsemble": args.isEnsemble, "images": len(paths)}, checkpoint_run)
    print(f"{len(paths)} images from {args.data_dir}, device {device}, tta {args.tta}")
    with tracker:
        if args.isEnsemble:
            p_mask, p_ga, probs = mask_genderage_pair(args.mask_model_dir, args.genderage_model_dir, args.state, paths,
                                                      **run)
            write_outputs(info, p_mask, p_mask.argmax(1), out_dir, ENSEMBLE_STEMS[0], face_run.sources())
            write_outputs(info, p_ga, p_ga.argmax(1), out_dir, ENSEMBLE_STEMS[1], face_run.sources())
            pred = probs.argmax(1)
            write_outputs(info, probs, pred, out_dir, ENSEMBLE_STEMS[2], face_run.sources())
        else:
            probs, pred, _, _ = vote(members, paths, args.offsets, how=args.vote, **run)
            stale = [f"{stem}.csv" for stem in ENSEMBLE_STEMS if (out_dir / f"{stem}.csv").exists()]
            if stale:  # left by an earlier --isEnsemble run into this folder: not this run's answers
                print(f"note: {out_dir} also holds {', '.join(stale)} from an earlier --isEnsemble run; "
                      f"this run's answers are output.csv")
        written = write_outputs(info, probs, pred, out_dir, "output", face_run.sources())
        print(class_count_summary(pred, probs.shape[1]))
        print(f"wrote {written} and {written.with_name(written.stem + '_probs.csv')}")
        face_counts = {f"inference_face_{k}": v for k, v in face_run.located[0].counts().items()} if face_run.located else {}
        tracker.log_metrics({"inference_images": len(pred), **face_counts,
                             **class_metrics("inference_predicted", np.bincount(pred, minlength=probs.shape[1]))},
                            step=0)
    return 0


if __name__ == "__main__":
    cli.run(main)
