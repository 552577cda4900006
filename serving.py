"""A trained model in MLflow: logged as a pyfunc model, served by `mlflow models serve`, registered.

    python -m serving model/exp [--tracking_uri URI] [--register_model NAME]   # a run folder after the fact
    mlflow models serve -m runs:/<run_id>/model --env-manager local -p 5001     # then POST images

train.py calls `log_model` at the end of every tracked run (a --fold all parent run logs one model,
the soft vote of its folds). What a run gets:
- `checkpoints/<file>.pth`: the checkpoint(s) the model predicts with (best_f1.pth, else last.pth
  without its resume state), for inference.py;
- the MLflow model `model`: `maskcls.pyfunc.MaskClassifier`, whose artifacts are those checkpoints and whose code
  is the maskcls package and the top-level modules it needs (so it is served from any folder), with a signature, an input
  example (a real image) and pip requirements pinned to requirements.txt.
Input: a DataFrame with a column `image` of encoded image bytes (in JSON base64, MLflow's convention
for a binary column). Output, one row per image: `class` (the label output.csv would hold), `name`
(e.g. `wear/female/30-59`) and p0..p<C-1> (the soft vote's probabilities, as output_probs.csv); a model
with a face stage adds `face` (`detected`, or `fallback` where no face was found).
Prediction is maskcls.predictor's vote on the decoded files: the checkpoint's preprocessing, the soft vote
and the decision offsets exactly as inference.py applies them.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from maskcls import cli
from maskcls.pyfunc import log_model_for
from maskcls.tracking import TrackingError, check_model_name, require_tracking


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a train.py run folder (or a --fold all folder: the soft vote of its folds)")
    p.add_argument("--tracking_uri", default=None, help="default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--experiment", default=None, help="experiment of a new run (when the training run is not there)")
    p.add_argument("--register_model", default=None, metavar="NAME", help="register the model as a new version of NAME")
    args = p.parse_args(argv)
    if args.register_model is not None:
        check_model_name(args.register_model)
    # else a disabled Tracker would log nothing, silently
    require_tracking(args.tracking_uri, "python -m serving logs a model to MLflow, so it needs tracking")
    try:
        logged = log_model_for(args.run_dir, args.tracking_uri, args.register_model, args.experiment)
    except TrackingError as e:
        raise cli.UsageError(str(e)) from None
    return 0 if logged else 1


if __name__ == "__main__":
    cli.run(main)
