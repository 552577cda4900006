"""Augmentation ops: `Augmentation` (cheap uint8 ops in the loader workers, colour jitter included),
and `BatchTransform` (the uint8 batch normalised on the device). Presets are named in dataset.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np
import torch


@dataclass
class Augmentation:
    """What a named augmentation does, split by where it runs.

    `crop` and the resize are deterministic and cached; the random operations, `jitter`
    (brightness, contrast, saturation, hue) last, run per sample in the workers on the small
    uint8 image (`cpu_transform`); normalisation and `noise_std` run batched on the device
    (BatchTransform).
    """
    name: str
    crop: tuple | None = None
    hflip: float = 0.0
    shift_scale: tuple[float, float] | None = None  # (max shift fraction, max scale change)
    rotate: float = 0.0  # max rotation in degrees, applied with shift_scale
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    noise_std: float = 0.0  # additive Gaussian noise after normalisation (original AddGaussianNoise)
    erase: float = 0.0  # probability of random erasing: one rectangle of random pixels (2-33% of the area)
    album: Callable[[], object] | None = None  # albumentations Compose factory for uint8 HWC
    _album_pipeline: object = field(default=None, repr=False)

    def cpu_transform(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.hflip and rng.random() < self.hflip:
            img = cv2.flip(np.ascontiguousarray(img), 1)  # ~30x faster than copying an img[:, ::-1] view
        if self.shift_scale and rng.random() < 0.8:
            shift, scale = self.shift_scale
            h, w = img.shape[:2]
            s = 1.0 + rng.uniform(-scale, scale)
            tx, ty = rng.uniform(-shift, shift, size=2) * (w, h)
            angle = rng.uniform(-self.rotate, self.rotate) if self.rotate else 0.0
            matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, s)  # about the centre, then shifted
            matrix[:, 2] += (tx, ty)
            img = cv2.warpAffine(np.ascontiguousarray(img), matrix, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT_101)
        if self.erase and rng.random() < self.erase:
            img = random_erase(img, rng)
        if self.album is not None:
            if self._album_pipeline is None:
                self._album_pipeline = self.album()
            self._album_pipeline.set_random_seed(int(rng.integers(2**31)))
            img = self._album_pipeline(image=np.ascontiguousarray(img))["image"]
        if any(self.jitter):
            img = jitter_colours(np.ascontiguousarray(img), self.jitter, rng)
        return np.ascontiguousarray(img)

    @property
    def is_random(self) -> bool:
        return bool(self.hflip or self.shift_scale or any(self.jitter) or self.noise_std or self.erase or self.album)


_LUMA = np.array([0.299, 0.587, 0.114])


_TO_YIQ = np.array([_LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


_FROM_YIQ = np.linalg.inv(_TO_YIQ)


_GREY = np.tile(_LUMA, (3, 1))  # _GREY @ rgb: the grey level, in every channel


_EYE = np.eye(3)


def colour_jitter_matrix(jitter: Sequence[float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One draw of ColorJitter(brightness, contrast, saturation, hue) as two 3x3 matrices: the
    jittered pixel is `matrix @ rgb + offset_weight @ mean_rgb` (contrast blends with the image's
    mean grey). All four are linear in RGB; hue is a rotation in YIQ space, so grey stays grey."""
    b, c, s, h = (float(j) for j in jitter)
    u = rng.uniform(-1.0, 1.0, 4)  # one draw for all four: a few microseconds per call matter here
    matrix, offset_weight = _EYE * (1 + u[0] * b), np.zeros((3, 3))
    if c:
        f = 1 + u[1] * c
        matrix, offset_weight = matrix * f, (1 - f) * _GREY @ matrix
    if s:
        f = 1 + u[2] * s
        sat = _EYE * f + (1 - f) * _GREY
        matrix, offset_weight = sat @ matrix, sat @ offset_weight
    if h:
        cos, sin = np.cos(u[3] * h * 2 * np.pi), np.sin(u[3] * h * 2 * np.pi)
        hue = _FROM_YIQ @ np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]]) @ _TO_YIQ
        matrix, offset_weight = hue @ matrix, hue @ offset_weight
    return matrix, offset_weight


def jitter_colours(img: np.ndarray, jitter: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Colour jitter of a uint8 RGB image in one OpenCV pass (rounded, clipped to 0..255 once at the
    end): about 0.08 ms for 224x224 on one core, where the same 3x3 map over the float batch (a
    batched matrix product) took 0.16-0.28 ms an image."""
    matrix, offset_weight = colour_jitter_matrix(jitter, rng)
    offset = offset_weight @ np.array(cv2.mean(img)[:3])
    return cv2.transform(img, np.hstack([matrix, offset[:, None]]).astype(np.float32))


def random_erase(img: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.02, 0.33),
                 log_ratio: tuple[float, float] = (np.log(0.3), np.log(3.3))) -> np.ndarray:
    """Random erasing (Zhong et al. 2017, torchvision's RandomErasing defaults): one rectangle of
    uniform random pixels, so no single face region (eyes, hair, the mask) can carry a person's
    identity on its own. A few tries for a rectangle that fits; none fitting leaves the image as is."""
    h, w = img.shape[:2]
    for _ in range(10):
        target = h * w * rng.uniform(*area)
        ratio = np.exp(rng.uniform(*log_ratio))
        eh, ew = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < eh < h and 0 < ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            img = np.array(img, copy=True)
            img[top:top + eh, left:left + ew] = rng.integers(0, 256, size=(eh, ew) + img.shape[2:], dtype=np.uint8)
            return img
    return img


class BatchTransform:
    """uint8 NCHW batch on the device -> normalised float, plus Gaussian noise (`noise_std`) when
    training. Colour jitter runs earlier, per sample on uint8 (`Augmentation.cpu_transform`)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], noise_std: float = 0.0,
                 channels_last: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.noise_std = noise_std
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        # /255 and the normalisation are folded into one per-channel scale and shift, and the float
        # batch is allocated once. On a CPU the work goes in chunks that stay in cache: there each
        # extra pass over a float batch costs about as much as the arithmetic.
        device, n = images.device, images.shape[0]
        scale = (1.0 / (255.0 * self.std)).to(device)  # (1, 3, 1, 1)
        shift = (-self.mean / self.std).to(device)
        out = torch.empty(images.shape, dtype=torch.float32, device=device,
                          memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        if n == 0:
            return out
        step = max(1, (1 << 19) // max(1, images[0].numel())) if device.type == "cpu" else n
        for lo in range(0, n, step):
            out[lo:lo + step].copy_(images[lo:lo + step]).mul_(scale).add_(shift)
        if train and self.noise_std:
            out.add_(torch.randn_like(out), alpha=self.noise_std)
        return out
