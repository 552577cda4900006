"""The face stage: find the face in a photo of a person, find its five landmarks and cut an aligned crop.

The competition's photos are 384x512 portraits, while the face network (DlibFaceResNet) learnt on
aligned 150x150 face chips; resizing the whole frame loses most of what it knows. This stage turns a
photo into the crop a face model expects, before the image cache, so it runs once per image.

- Detector: MTCNN (Zhang et al. 2016), three small cascaded networks ported here; their weights are read
  from the PyPI package facenet-pytorch (`facenet_pytorch/data/{pnet,rnet,onet}.pt`, 2 MB, no network,
  the package itself is never imported). Thresholds below the paper's find masked faces too (measured in
  docs/face-stage.md): a mask hides the mouth and nose that a bare-face detector looks for.
- Geometries (`GEOMETRIES`): a similarity transform from the five landmarks onto a template.
  `chip` is dlib's own `get_face_chip_details(shape, size, 0.25)`: the input DlibFaceResNet was trained
  on. `wide` is the same template with more margin (hair, chin, a mask pulled down), for the CNNs.
- When no face is found: training takes the landmarks found on the same person's other photos (the
  seven are one sitting); prediction, and training when the whole sitting is missed, takes the
  `fallback` landmarks: where faces sat on average in the training photos (stored in the checkpoint).
- `FaceStage.locate` caches every image's landmarks on disk (keyed by the detector's settings and each
  file's path, size and mtime), so re-runs and later epochs detect nothing again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_align

from maskcls.cli import ToolkitError
from maskcls.fileio import atomic_write_bytes

WEIGHTS_PACKAGE = "facenet_pytorch"  # PyPI facenet-pytorch: ships MTCNN's weights in data/*.pt


class FaceStageError(ToolkitError, ValueError):
    """The face stage cannot run (weights missing, a bad setting); one line saying how to fix it."""


# --------------------------------------------------------------------------- MTCNN networks
class _PNet(nn.Module):
    """Proposal network: fully convolutional, a face score and a box offset every 2 pixels (12x12 cells)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


def _caffe_flatten(x: torch.Tensor) -> torch.Tensor:
    # The dense layers were converted from a Caffe model that saw images transposed (W, H).
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class _RNet(nn.Module):
    """Refinement network: 24x24 candidates -> face score and box offset."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_caffe_flatten(self.prelu3(self.conv3(x)))))
        return F.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class _ONet(nn.Module):
    """Output network: 48x48 candidates -> face score, box offset and five landmarks."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_caffe_flatten(self.prelu4(self.conv4(x)))))
        return F.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def weights_folder() -> Path:
    """facenet-pytorch's data folder, found without importing the package (its __init__ pulls in more
    than the three weight files we read)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if all((Path(folder) / "data" / f"{n}.pt").is_file() for n in ("pnet", "rnet", "onet")):
            return Path(folder) / "data"
    raise FaceStageError("the face stage's detector weights come from the PyPI package facenet-pytorch, which is "
                         "not installed: pip install facenet-pytorch==2.5.3 (or train with --face_crop none)")


# --------------------------------------------------------------------------- detection
@dataclass
class Face:
    """One detection, in the photo's pixels: box (x1, y1, x2, y2), score, landmarks [5, 2] (x, y) in the
    order left eye, right eye, nose, left mouth corner, right mouth corner (left = the image's left)."""
    box: np.ndarray
    score: float
    landmarks: np.ndarray


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Each box grown to a square about its centre (MTCNN's `rerec`)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1, y1 = boxes[:, 0] + (w - side) / 2, boxes[:, 1] + (h - side) / 2
    return torch.stack([x1, y1, x1 + side, y1 + side], 1)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply the networks' box offsets (fractions of the box's width and height)."""
    wh = (boxes[:, 2:4] - boxes[:, 0:2]).repeat(1, 2)
    return boxes + offsets * wh


class MTCNN:
    """The three-stage cascade on one RGB uint8 image (HWC). CPU: about 30 ms for a 384x512 photo.

    min_face: the smallest face side searched, in pixels (a larger one skips pyramid levels);
    thresholds: the three stages' score thresholds (the paper's 0.6, 0.7, 0.7 miss many masked faces)."""

    def __init__(self, min_face: int = 40, thresholds: Sequence[float] = (0.5, 0.5, 0.5), factor: float = 0.709,
                 device: torch.device | str = "cpu"):
        self.min_face, self.thresholds, self.factor = int(min_face), tuple(float(t) for t in thresholds), float(factor)
        self.device = torch.device(device)
        folder = weights_folder()
        self.pnet, self.rnet, self.onet = _PNet(), _RNet(), _ONet()
        for net, name in ((self.pnet, "pnet"), (self.rnet, "rnet"), (self.onet, "onet")):
            net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
            net.to(self.device).eval()

    def _tensor(self, img: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(img)).to(self.device).permute(2, 0, 1)[None].float()
        return (x - 127.5) * 0.0078125

    def _crops(self, x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
        # Box averaging inside each output cell (sampling_ratio adaptive): an area resize, zeros outside.
        rois = torch.cat([torch.zeros(len(boxes), 1, device=boxes.device), boxes], 1)
        return roi_align(x, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    def _proposals(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        scale, side, found = 12.0 / self.min_face, min(h, w) * 12.0 / self.min_face, []
        while side >= 12:
            size = (max(12, math.ceil(h * scale)), max(12, math.ceil(w * scale)))
            prob, reg = self.pnet(F.interpolate(x, size=size, mode="area"))
            ys, xs = torch.nonzero(prob[0] >= self.thresholds[0], as_tuple=True)
            if len(ys):
                cells = torch.stack([xs, ys], 1).float()
                boxes = torch.cat([(2 * cells + 1) / scale, (2 * cells + 12) / scale], 1)
                boxes = _regress(boxes, reg[0, :, ys, xs].T)
                score = prob[0, ys, xs]
                keep = nms(boxes, score, 0.5)
                found.append(torch.cat([boxes[keep], score[keep, None]], 1))
            scale, side = scale * self.factor, side * self.factor
        if not found:
            return torch.zeros(0, 5, device=x.device)
        found = torch.cat(found)
        return found[nms(found[:, :4], found[:, 4], 0.7)]

    @torch.inference_mode()
    def detect(self, img: np.ndarray) -> list[Face]:
        """Every face found, the most confident first."""
        x = self._tensor(img)
        cand = self._proposals(x)
        if not len(cand):
            return []
        boxes = _square(cand[:, :4])
        score, offsets = self.rnet(self._crops(x, boxes, 24))
        keep = score >= self.thresholds[1]
        boxes, score, offsets = boxes[keep], score[keep], offsets[keep]
        if not len(boxes):
            return []
        boxes = _regress(boxes, offsets)
        boxes = _square(boxes[nms(boxes, score, 0.7)])
        return self._output(x, boxes, self.thresholds[2])

    def _output(self, x: torch.Tensor, boxes: torch.Tensor, threshold: float) -> list[Face]:
        score, offsets, marks = self.onet(self._crops(x, boxes, 48))
        keep = score >= threshold
        boxes, score, offsets, marks = boxes[keep], score[keep], offsets[keep], marks[keep]
        if not len(boxes):
            return []
        wh = boxes[:, 2:4] - boxes[:, 0:2]
        points = torch.stack([boxes[:, None, 0] + wh[:, None, 0] * marks[:, :5],
                              boxes[:, None, 1] + wh[:, None, 1] * marks[:, 5:]], 2)
        boxes = _regress(boxes, offsets)
        order = nms(boxes, score, 0.7)
        return [Face(boxes[i].cpu().numpy().astype(np.float64), float(score[i]), points[i].cpu().numpy().astype(np.float64))
                for i in order.tolist()]


# --------------------------------------------------------------------------- geometry
# dlib's mean face (`get_face_chip_details`, points 17-67 of the 68-point iBUG layout, in a unit square),
# reduced to MTCNN's five points: the centres of the two eyes (points 36-41, 42-47), the nose tip (30)
# and the mouth corners (48, 54).
_DLIB_EYE_L = ((0.121737, 0.216423), (0.187122, 0.178758), (0.265825, 0.179852),
               (0.334606, 0.231733), (0.260918, 0.245099), (0.182743, 0.244077))
_DLIB_EYE_R = ((0.645647, 0.231733), (0.714428, 0.179852), (0.793132, 0.178758),
               (0.858516, 0.216423), (0.79751, 0.244077), (0.719335, 0.245099))
MEAN_FACE = np.array([np.mean(_DLIB_EYE_L, 0), np.mean(_DLIB_EYE_R, 0), (0.490127, 0.515625),
                      (0.254149, 0.780233), (0.726104, 0.780233)])


@dataclass(frozen=True)
class Geometry:
    """Where the five landmarks go in the crop: dlib's mean face with `padding` (a fraction of the face
    box on every side, as dlib's `get_face_chip_details(shape, size, padding)`)."""
    name: str
    padding: float
    doc: str = ""

    def template(self, size: Sequence[int]) -> np.ndarray:
        """The landmarks' target positions [5, 2] (x, y) in a crop of `size` (H, W): a square chip of
        side min(H, W), centred; a taller or wider crop shows more of the photo along its long side."""
        h, w = int(size[0]), int(size[1])
        side = min(h, w)
        points = (self.padding + MEAN_FACE) / (1 + 2 * self.padding) * side
        return points + ((w - side) / 2, (h - side) / 2)


GEOMETRIES: dict[str, Geometry] = {}


def register_geometry(name: str, padding: float, doc: str) -> Geometry:
    GEOMETRIES[name] = Geometry(name, padding, doc)
    return GEOMETRIES[name]


register_geometry("chip", 0.25, "dlib's face chip (get_face_chip_details, padding 0.25): DlibFaceResNet's own input")
register_geometry("wide", 0.6, "the same alignment with more margin (hair, chin, a mask pulled down): for CNNs")
FACE_CROPS = ("none", *GEOMETRIES)  # --face_crop's choices


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, shift; no reflection) taking points `src`
    to `dst` ([n, 2] each), as a 2x3 matrix (dlib's `find_similarity_transform`, Umeyama's method)."""
    z = src[:, 0] + 1j * src[:, 1]
    t = dst[:, 0] + 1j * dst[:, 1]
    zc, tc = z - z.mean(), t - t.mean()
    a = np.vdot(zc, tc) / max(np.vdot(zc, zc).real, 1e-12)  # scale * e^{i angle}
    b = t.mean() - a * z.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def warp(img: np.ndarray, matrix: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """The crop of `size` (H, W) that `matrix` (photo -> crop) cuts from `img`, antialiased when it shrinks:
    a box blur about as wide as the shrink factor first (as `imaging.preprocess` resizes), then bilinear."""
    shrink = 1.0 / max(math.hypot(matrix[0, 0], matrix[1, 0]), 1e-12)  # photo pixels per crop pixel
    if shrink >= 1.5:
        k = int(math.ceil(shrink))
        k += 1 - k % 2
        img = cv2.blur(np.ascontiguousarray(img), (k, k), borderType=cv2.BORDER_REFLECT_101)
    out = cv2.warpAffine(np.ascontiguousarray(img), matrix, (int(size[1]), int(size[0])), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------- the stage
DETECTED, SITTING, FALLBACK = 0, 1, 2
SOURCES = ("detected", "sitting", "fallback")  # what a crop's landmarks came from, by code


@dataclass
class FaceSettings:
    """Everything that decides a crop, recorded in the checkpoint (`preprocess.face`) so prediction crops
    as training did: the geometry, the detector's settings, and the fallback landmarks (fractions of the
    photo's width and height: where training photos' faces sat on average)."""
    geometry: str = "chip"
    min_face: int = 40
    thresholds: tuple[float, float] = (0.1, 0.1)  # proposal and refinement stages: low, to reach masked faces
    # The output stage's score a face needs; below it, the photo falls back. A portrait always holds a face,
    # and a low-scored one is mostly the masked face, its landmarks rougher (docs/face-stage.md) but far
    # nearer than a fixed crop; so any candidate that passed the first two stages is taken.
    accept: float = 0.0
    fallback: list | None = None  # [5, 2] fractions of (W, H); None until training has located its photos

    def __post_init__(self):
        if self.geometry not in GEOMETRIES:
            raise FaceStageError(f"unknown face crop {self.geometry!r}; known: {', '.join(GEOMETRIES)}")
        self.thresholds = tuple(float(t) for t in self.thresholds)

    def to_dict(self) -> dict:
        return {**asdict(self), "thresholds": list(self.thresholds)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "FaceSettings | None":
        return cls(**d) if d else None

    def detector_key(self) -> str:
        """What the detections depend on (not the geometry or fallback: those are applied afterwards)."""
        return json.dumps({"detector": "mtcnn-facenet-2.5.3", "v": 1, "min_face": self.min_face,
                           "thresholds": list(self.thresholds)})


@dataclass
class Located:
    """The landmarks chosen for each photo ([N, 5, 2], photo pixels), where they came from (`SOURCES`
    codes), the detector's score (NaN where it found nothing) and each photo's (H, W)."""
    landmarks: np.ndarray
    source: np.ndarray
    score: np.ndarray
    shape: np.ndarray
    seconds: float = 0.0  # time spent detecting (0 when every photo came from the cache)
    detected_now: int = 0

    def counts(self) -> dict[str, int]:
        return {name: int((self.source == code).sum()) for code, name in enumerate(SOURCES)}

    def sources(self) -> list[str]:
        return [SOURCES[c] for c in self.source]

    def transforms(self, geometry: str, size: Sequence[int]) -> np.ndarray:
        """[N, 2, 3] photo -> crop matrices for `geometry` at `size` (H, W)."""
        target = GEOMETRIES[geometry].template(size)
        return np.stack([similarity(p, target) for p in self.landmarks]) if len(self.landmarks) else np.zeros((0, 2, 3))

    def summary(self) -> str:
        c, n = self.counts(), len(self.source)
        cost = (f", {self.detected_now} detected in {self.seconds:.1f} s ({1000 * self.seconds / self.detected_now:.0f} ms "
                f"an image)" if self.detected_now else ", all from the cache")
        return (f"face stage: {n} images, face found in {c['detected']}, sitting's face used for {c['sitting']}, "
                f"fallback crop for {c['fallback']} ({100 * c['fallback'] / max(n, 1):.1f}%){cost}")


def image_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}\0{st.st_mtime_ns}\0{st.st_size}"  # a holdout symlink shares its target's


class DetectionCache:
    """Detections by image (path, mtime, size) for one detector setting: one .npz beside the image cache,
    read once and rewritten atomically when new photos were detected."""

    def __init__(self, folder: str | os.PathLike | None, detector_key: str):
        digest = hashlib.sha1(detector_key.encode()).hexdigest()[:16]
        self.path = Path(folder) / f"faces-{digest}.npz" if folder else None
        self.rows: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    self.rows = dict(zip(z["keys"].tolist(), z["rows"]))
            except (OSError, ValueError, KeyError):
                self.rows = {}  # a damaged cache is only lost time: detect again

    def save(self) -> None:
        if self.path is None or not self.rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.array(list(self.rows)), rows=np.stack(list(self.rows.values())))
        atomic_write_bytes(self.path, buffer.getvalue())


@dataclass
class FaceRun:
    """What one prediction's face stages share and found: a detection cache per detector setting (a soft
    vote's second face model detects nothing again) and each member's `Located`, for the report."""
    folder: str | os.PathLike | None = None
    workers: int | None = None  # detection processes; None: `detection_workers` (a server detects in-process)
    caches: dict[str, DetectionCache] = field(default_factory=dict)
    located: list[Located] = field(default_factory=list)

    def cache(self, detector_key: str) -> DetectionCache:
        if detector_key not in self.caches:
            self.caches[detector_key] = DetectionCache(self.folder, detector_key)
        return self.caches[detector_key]

    def sources(self) -> list[str] | None:
        """Per photo, where its crop's landmarks came from (the first face model's); None without a face stage."""
        return self.located[0].sources() if self.located else None


# A detection row: found (1/0), score, box x1 y1 x2 y2, landmarks x0 y0 .. x4 y4, photo H W (19 floats)
_ROW = 19


def _row(face: Face | None, shape: Sequence[int]) -> np.ndarray:
    row = np.full(_ROW, np.nan)
    row[0], row[17], row[18] = 0.0, shape[0], shape[1]
    if face is not None:
        row[0], row[1], row[2:6], row[6:16] = 1.0, face.score, face.box, face.landmarks.reshape(-1)
    return row


def _eye_centre(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    return landmarks[:2].mean(0), float(np.linalg.norm(landmarks[1] - landmarks[0]))


def detection_workers(n: int) -> int:
    """Worker processes for detecting n photos: one a core, none for a handful (a worker costs a start-up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 8) if cores > 1 and n >= 32 else 0


def _as_is(row: np.ndarray) -> np.ndarray:
    return row  # the loader's default would make a tensor of it


class _Detections(torch.utils.data.Dataset):
    """Detection rows of photos, computed where the loader asks (its workers each build their own detector)."""

    def __init__(self, settings: FaceSettings, paths: Sequence[str], load: Callable[[str], np.ndarray],
                 stage: "FaceStage | None" = None):
        self.settings, self.paths, self.load, self.stage = settings, list(paths), load, stage

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.stage is None:
            self.stage = FaceStage(self.settings)
        img = self.load(self.paths[i])
        return _row(self.stage.detect(img), img.shape)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class FaceStage:
    """Locates the face of every photo (`locate`): landmarks whose transforms (`Located.transforms`) cut the crops."""

    def __init__(self, settings: FaceSettings, device: torch.device | str = "cpu"):
        self.settings = settings
        self.device = device
        self._detector: MTCNN | None = None

    @property
    def detector(self) -> MTCNN:
        if self._detector is None:  # built on first use: a warm cache needs no network weights
            self._detector = MTCNN(self.settings.min_face, (*self.settings.thresholds, 0.0), device=self.device)
        return self._detector

    def detect(self, img: np.ndarray) -> Face | None:
        """The most confident face of a photo, None when there is none."""
        found = self.detector.detect(img)
        return found[0] if found else None

    def detections(self, paths: Sequence[str], load: Callable[[str], np.ndarray], cache: DetectionCache | None = None,
                   progress: Callable[[Iterable], Iterable] | None = None, workers: int | None = None
                   ) -> tuple[np.ndarray, float, int]:
        """[N, 19] detection rows for `paths` (see `_row`), from `cache` where it has them (it must be for this
        detector: `DetectionCache(folder, settings.detector_key())`); `load` decodes a photo to RGB uint8."""
        cache = cache if cache is not None else DetectionCache(None, self.settings.detector_key())
        keys = [image_key(p) for p in paths]
        todo = [i for i, k in enumerate(keys) if k not in cache.rows]
        start = time.perf_counter()
        workers = detection_workers(len(todo)) if workers is None else workers
        rows = _Detections(self.settings, [paths[i] for i in todo], load, self if not workers else None)
        # One process a core, one thread each: the cascade's small convolutions gain little from a second
        # thread, a second process nearly halves the time (docs/face-stage.md).
        loader = torch.utils.data.DataLoader(rows, batch_size=None, num_workers=workers, collate_fn=_as_is) \
            if workers else rows
        for i, row in zip(todo, progress(loader) if progress and todo else loader):
            cache.rows[keys[i]] = row
        seconds = time.perf_counter() - start
        if todo:
            cache.save()
        return np.stack([cache.rows[k] for k in keys]) if keys else np.zeros((0, _ROW)), seconds, len(todo)

    def locate(self, paths: Sequence[str], load: Callable[[str], np.ndarray],
               groups: Sequence[str | None] | None = None, cache: DetectionCache | None = None,
               progress: Callable[[Iterable], Iterable] | None = None, workers: int | None = None) -> Located:
        """The landmarks each photo is cropped by. `groups[i]`: the sitting (person) of a training photo, or
        None for a photo that must stand alone (validation, prediction). A training photo whose face is not
        found, or found far from where its sitting's most confident face is (half the eye distance away),
        takes the sitting's landmarks; anything else without a face takes `settings.fallback`, which a training
        call (fallback None) sets to the median landmarks of its own photos with a face (fractions of W, H)."""
        rows, seconds, n_new = self.detections(paths, load, cache, progress, workers)
        n = len(paths)
        found = (rows[:, 0] == 1) & (rows[:, 1] >= self.settings.accept)
        marks = rows[:, 6:16].reshape(n, 5, 2).copy()
        shape = rows[:, 17:19].astype(np.int64)
        source = np.where(found, DETECTED, FALLBACK).astype(np.int8)
        if groups is not None:
            best: dict[str, int] = {}
            for i, g in enumerate(groups):
                if g is not None and found[i] and (g not in best or rows[i, 1] > rows[best[g], 1]):
                    best[g] = i
            for i, g in enumerate(groups):
                if g is None or g not in best or best[g] == i:
                    continue
                ref = best[g]
                centre, eyes = _eye_centre(marks[ref])
                if not found[i] or np.linalg.norm(_eye_centre(marks[i])[0] - centre) > 0.5 * eyes:
                    # the same sitting: rescale by the photos' sizes (the same in practice)
                    marks[i] = marks[ref] * (shape[i, ::-1] / shape[ref, ::-1])
                    source[i] = SITTING
        if self.settings.fallback is None:  # training: learn where faces sit from its own photos
            own = found if groups is None else found & np.array([g is not None for g in groups], bool)
            if not own.any():
                raise FaceStageError(f"the face stage found no face in any of {n} training photos: are these photos "
                                     f"of people? Train with --face_crop none")
            self.settings.fallback = np.median(marks[own] / shape[own][:, None, ::-1], axis=0).round(5).tolist()
        fallback = source == FALLBACK
        marks[fallback] = np.asarray(self.settings.fallback)[None] * shape[fallback][:, None, ::-1]
        score = np.where(rows[:, 0] == 1, rows[:, 1], np.nan)
        return Located(marks, source, score, shape, seconds, n_new)
