"""Export a trained checkpoint to one file that runs without this toolkit.

    python export.py --model_dir model/exp --format onnx            # -> model/exp/best_f1.onnx
    python export.py --model_dir model/exp --format torchscript     # -> model/exp/best_f1.torchscript.pt
    python export.py --model_dir model/exp --state last --format pt2 --out serve/mask.pt2
    python export.py --model_dir model/cv --state last --tta hflip --format onnx   # a --fold all folder's vote
    python export.py --model_dir model/a model/b --weights 2 1 --format onnx --out vote.onnx

What it exports is what inference.py predicts with the same --model_dir, --weights, --state and --tta:
one model, or the soft vote of several (a cross-validation folder stands for its folds), each image
averaged with its mirror image under --tta hflip.

The file holds everything after the image library: input `images`, uint8 [N, H, W, 3] RGB
already cropped and resized to the checkpoint's size (printed; any N); inside: /255, the
checkpoint's mean/std, the model, the task's probabilities (softmax, or the product of a multi-head
model's heads; a `years` age head at the checkpoint's cut points), the weighted mean over the
models and, where the checkpoints have decision offsets, their renormalised result (a vote: the
weighted mean of its models' offsets), so that arg-max is inference.py's class; output
`probs`, float32 [N, classes]. Run it with onnxruntime, torch.jit.load or torch.export.load.

Before the file takes its name it is loaded back and compared with inference.py's PyTorch path on
the run's validation images (val_samples.csv; synthetic images when those are gone). A difference
above --tolerance stops with one error line and writes nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from maskcls import cli, imaging
from maskcls.checkpoint import build_model, check_state_name, decision_age_cuts, state_file, validation_samples
from maskcls.fileio import atomic_write, atomic_write_bytes
from maskcls.predictor import Member, ensemble_offsets, load_members, vote
from maskcls.task import PROB_FLOOR, Task, apply_offsets, task_of
# Imported where used, being heavy or optional: onnx, onnxscript and onnxruntime (only --format onnx).

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}  # format -> file suffix
INPUT_NAME, OUTPUT_NAME = "images", "probs"


class ExportError(cli.ToolkitError, ValueError):
    """A checkpoint that cannot be exported, or an export that disagrees with PyTorch."""


# --------------------------------------------------------------------------- the exported module
class ExportTask(Task):
    """The checkpoint's Task with an export-friendly survival curve: aten.cummin has no ONNX
    translation, so the running minimum is a min over a masked [N, T, T] tensor (identical values)."""

    @staticmethod
    def survival(age_logits: torch.Tensor) -> torch.Tensor:
        s = age_logits.sigmoid()
        t = s.shape[1]
        later = torch.ones(t, t, dtype=torch.bool, device=s.device).triu(diagonal=1)  # [t, j]: j > t
        # S(t) = min_{j <= t} sigmoid(l_j); sigmoid <= 1, so filling the later years with 1 leaves the min
        return s[:, None, :].masked_fill(later, 1.0).amin(dim=2)


class ExportableModel(nn.Module):
    """One checkpoint: uint8 NHWC RGB batch -> its class probabilities, as predictor.predict_probs
    computes them (`tta` "hflip": averaged with the mirrored batch)."""

    def __init__(self, ckpt: dict, tta: str = "none") -> None:
        super().__init__()
        pre, task = ckpt["preprocess"], task_of(ckpt)
        self.model = build_model(ckpt).eval()
        self.task = ExportTask(task.name, task.age_head)
        self.age_cuts = tuple(decision_age_cuts(ckpt))
        self.hflip = tta == "hflip"
        mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(pre["std"], dtype=torch.float32).view(1, 3, 1, 1)
        # the same per-channel scale and shift as augment.BatchTransform, so the network sees the same input
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * self.scale + self.shift
        probs = self.task.probs(self.model(x).float(), self.age_cuts)
        if self.hflip:
            probs = (probs + self.task.probs(self.model(torch.flip(x, dims=[3])).float(), self.age_cuts)) / 2
        return probs


class ExportableClassifier(nn.Module):
    """uint8 NHWC RGB batch -> class probabilities, as inference.py computes them (see the module
    doc): the weighted mean of its models' probabilities, then the decision `offsets` if any."""

    def __init__(self, ckpts: Sequence[dict], weights: Sequence[float], offsets: np.ndarray | None = None,
                 tta: str = "none") -> None:
        super().__init__()
        self.members = nn.ModuleList(ExportableModel(ckpt, tta) for ckpt in ckpts)
        self.weights = [float(w) / float(sum(weights)) for w in weights]
        self.register_buffer("offsets", None if offsets is None else torch.tensor(offsets, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = sum(w * member(images) for w, member in zip(self.weights, self.members))
        if self.offsets is not None:  # task.apply_offsets in torch: p' ∝ p * exp(b)
            probs = (probs.clamp_min(PROB_FLOOR).log() + self.offsets).softmax(dim=1)
        return probs


# --------------------------------------------------------------------------- writing and loading
def _batch_dim() -> dict:
    return {INPUT_NAME: {0: torch.export.Dim.DYNAMIC}}


def _onnx(module: nn.Module, example: torch.Tensor) -> Callable[[Path], None]:
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs {e.name}: pip install -r requirements.txt") from None
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=_batch_dim(), external_data=False, verbose=False)
    return lambda path: program.save(path, external_data=False)


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript's deprecation notices and the tracer's note on the static shape checks in
    Task.probs (shapes other than the batch are fixed) would print on every export."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _torchscript(module: nn.Module, example: torch.Tensor) -> Callable[[Path], None]:
    buffer = io.BytesIO()
    with _quiet_jit():
        torch.jit.save(torch.jit.trace(module, example), buffer)
    return lambda path: Path(path).write_bytes(buffer.getvalue())


def _pt2(module: nn.Module, example: torch.Tensor) -> Callable[[Path], None]:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=_batch_dim()), buffer)
    return lambda path: Path(path).write_bytes(buffer.getvalue())


EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript, "pt2": _pt2}


def load_exported(path: str | os.PathLike, fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    """The exported file as a function uint8 [N, H, W, 3] -> probabilities [N, classes], loaded
    the way a user without this toolkit loads it."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("the ONNX self-check needs onnxruntime: pip install -r requirements.txt") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    if fmt == "torchscript":
        with _quiet_jit():
            module = torch.jit.load(str(path))
    else:  # from the bytes: torch.export.load wants a name ending in .pt2, and the file is still a temp file
        module = torch.export.load(io.BytesIO(Path(path).read_bytes())).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    return run


# --------------------------------------------------------------------------- the self-check
def sample_paths(run_dir: Path, ckpt: dict, n: int) -> list[str]:
    """Up to n of the run's validation images (val_samples.csv, its paths checked to stay inside the run's
    training data), spread over the list; [] if none are there."""
    paths = [row["path"] for row in validation_samples(run_dir, ckpt) if row.get("path")]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        return []
    picks = sorted(set(np.linspace(0, len(paths) - 1, min(n, len(paths))).round().astype(int).tolist()))
    return [paths[i] for i in picks]


def write_synthetic_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n smooth random PNGs the size of a competition photo (so a checkpoint's crop applies as usual)."""
    rng = np.random.default_rng(seed)
    height, width = imaging.REFERENCE_FRAME
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
        img = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        _, png = cv2.imencode(".png", img)
        path = folder / f"synthetic{i:03d}.png"
        atomic_write_bytes(path, png.tobytes())
        paths.append(str(path))
    return paths


def parity(run: Callable[[np.ndarray], np.ndarray], members: Sequence[Member], offsets: np.ndarray | None,
           tta: str, paths: Sequence[str]) -> tuple[float, int]:
    """(max |p_export - p_torch|, images whose classes agree) on the same uint8 images: the exported
    file gets the toolkit pipeline's decoded, cropped, resized pixels; PyTorch is inference.py's
    path (its vote, then the offsets)."""
    store, _ = imaging.face_store(list(paths), dict(members[0].ckpt["preprocess"]))
    images = np.stack([store[i] for i in range(len(store))])
    # one image alone, then the rest as one batch: both batch sizes must work
    exported = np.concatenate([run(images[:1]), *([run(images[1:])] if len(images) > 1 else [])])
    probs = vote(members, list(paths), offsets="none", verbose=False, num_workers=0, tta=tta, progress=False)[0]
    expected = apply_offsets(probs, offsets)
    diff = float(np.abs(exported.astype(np.float64) - expected).max())
    return diff, int((exported.argmax(1) == expected.argmax(1)).sum())


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, nargs="+",
                   help="run folder(s) or .pth file(s); several = their soft vote; a --fold all folder = its folds")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="soft-vote weight per --model_dir, as inference.py's (default equal)")
    p.add_argument("--state", default="best_f1", help="best|best_f1|last (.pth optional; default best_f1)")
    p.add_argument("--tta", choices=["none", "hflip"], default="none",
                   help="hflip: average each image with its mirror image inside the file, as inference.py --tta hflip")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="onnx (onnxruntime), torchscript "
                   "(torch.jit.load), pt2 (torch.export.load)")
    p.add_argument("--out", default=None, help="file to write (default: beside the checkpoint, e.g. "
                   "RUN/best_f1.onnx, RUN/best_f1.torchscript.pt, RUN/best_f1.pt2; a --fold all folder: in it, "
                   "CV/best_f1.onnx; needed for several --model_dir)")
    p.add_argument("--check_images", type=cli.positive_int, default=32,
                   help="images for the parity check (default 32)")
    p.add_argument("--tolerance", type=cli.non_negative, default=1e-4,
                   help="largest allowed difference of probabilities from PyTorch (default 1e-4, fp32)")
    return p


def check_out(out: Path) -> None:
    """Refuse an --out that cannot take a file before the (slow) export; the message names the path
    at fault. Missing folders are made when the file is written."""
    if out.is_dir():
        raise ExportError(f"--out is a folder, not a file name: {out}")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise ExportError(f"a file is in the way of the folder of --out: {folder} (for {out})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"no permission to write in {folder} (for --out {out})")


def default_out(model_dirs: Sequence[str], members: Sequence[Member], state: str, fmt: str) -> Path:
    """Beside the one checkpoint (RUN/best_f1.onnx), or in the one cross-validation folder (CV/best_f1.onnx)."""
    if len(model_dirs) > 1:
        raise ExportError(f"--out is needed for the vote of {len(model_dirs)} --model_dir: there is no one folder "
                          "to write it in")
    if len(members) == 1:
        return members[0].path.with_name(members[0].path.stem + FORMATS[fmt])
    return Path(model_dirs[0]) / (Path(state_file(state)).stem + FORMATS[fmt])


def check_same_input(members: Sequence[Member]) -> None:
    """One file takes one input: the models must share the size and crop of their images."""
    inputs = {json.dumps([m.ckpt["preprocess"]["resize"], m.ckpt["preprocess"].get("crop"),
                          m.ckpt["preprocess"].get("face")]) for m in members}
    if len(inputs) > 1:
        raise ExportError("the models take different inputs (" + ", ".join(
            f"{m.path}: {describe_size(m.ckpt)}" for m in members) + "); export them one at a time")


def describe_size(ckpt: dict) -> str:
    pre = ckpt["preprocess"]
    h, w = pre["resize"]
    crop, face = pre.get("crop"), pre.get("face")
    if face:  # the detector stays outside the file
        return (f"cut each photo's aligned face crop ({face['geometry']}, {h}x{w}) with the toolkit's face stage "
                f"(imaging.face_store(paths, checkpoint['preprocess']), as inference.py does)")
    return (f"crop {crop[0]} {crop[1]}x{crop[2]} (in 384x512-photo pixels), then resize to {h}x{w}"
            if crop else f"resize to {h}x{w} (H x W)")


def describe_input(ckpt: dict) -> str:
    h, w = ckpt["preprocess"]["resize"]
    return f"input  {INPUT_NAME!r}: uint8 [N, {h}, {w}, 3] RGB, any N; {describe_size(ckpt)} yourself"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_state_name(args.state)
    members = load_members(args.model_dir, args.state, args.weights)
    check_same_input(members)
    out = Path(args.out) if args.out else default_out(args.model_dir, members, args.state, args.format)
    check_out(out)
    ckpts = [m.ckpt for m in members]
    ckpt, task = ckpts[0], task_of(ckpts[0])
    for m in members:
        print(f"model {m.path}: {m.ckpt['model']['name']} task {task_of(m.ckpt).describe()}")
    weights = np.array([m.weight for m in members], dtype=np.float64)
    offsets = ensemble_offsets(ckpts, weights)
    if len(members) > 1:
        print(f"soft vote of {len(members)} models, weights "
              + " ".join(f"{w:.3g}" for w in weights / weights.sum()) + f"; tta {args.tta}")
    elif args.tta != "none":
        print(f"tta {args.tta}")
    module = ExportableClassifier(ckpts, weights.tolist(), offsets, args.tta).eval()
    h, w = ckpt["preprocess"]["resize"]
    example = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        save = EXPORTERS[args.format](module, example)
    except ExportError:
        raise
    except Exception as e:  # the exporters raise many types for an unsupported operation
        line = (str(e).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"cannot export {ckpt['model']['name']} to {args.format} "
                          f"({e.__class__.__name__}: {line}): {members[0].path}") from None

    listed = next((found for m in members if (found := sample_paths(m.path.parent, m.ckpt, args.check_images))), [])
    with tempfile.TemporaryDirectory() as scratch:
        paths = listed or write_synthetic_images(Path(scratch), args.check_images)
        what = "validation images (val_samples.csv)" if listed else "synthetic images"

        def write_and_check(tmp: Path) -> None:
            save(tmp)
            diff, agree = parity(load_exported(tmp, args.format), members, offsets, args.tta, paths)
            print(f"parity on {len(paths)} {what}: max |p_{args.format} - p_pytorch| = {diff:.1e}, "
                  f"classes agree on {agree}/{len(paths)}")
            if not diff <= args.tolerance:  # also catches NaN
                raise ExportError(f"the exported {args.format} model disagrees with PyTorch: max difference "
                                  f"{diff:.1e} > --tolerance {args.tolerance:g}; nothing written: {out}")

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, write_and_check)  # checked under a temp name: a failed check leaves no file
    after = " after the checkpoints' decision offsets (renormalised)" if offsets is not None else ""
    print(f"wrote {out} ({args.format}, {out.stat().st_size / 1e6:.1f} MB)")
    print(describe_input(ckpt))
    print(f"output {OUTPUT_NAME!r}: float32 [N, {task.num_classes}] class probabilities{after}; "
          f"arg-max = inference.py's class")
    return 0


if __name__ == "__main__":
    cli.run(main)
