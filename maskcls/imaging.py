"""Images: completeness checks, decoding (reduced JPEG decoding, header sizes), the crop and resize of
`preprocess` (with its version: cached crops of another version are never reused), the face warp, and
`ImageStore`, the decoded uint8 images kept in memory or in a memmap cache."""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from maskcls import faces
from maskcls.cli import DataError
from maskcls.fileio import atomic_write_text
# Imported where used, being heavy or optional: torchvision's JPEG decoder (optional: OpenCV decodes without it).

cv2.setNumThreads(1)  # workers parallelise; OpenCV's own threads would oversubscribe the cores

# In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker; anything else
# after a run of 0xFF (fill bytes) is the next marker.
_JPEG_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")


def jpeg_complete(path: str | os.PathLike) -> bool:
    """Whether the JPEG stream reaches its end-of-image marker, found by walking the segments (so an
    EXIF thumbnail's marker does not count); bytes after it do not matter. Reads the whole file."""
    data = Path(path).read_bytes()
    pos = 2  # after SOI
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xD9:
            return True
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            if marker == 0xDA:  # a scan: its entropy-coded data runs to the next marker
                found = _JPEG_NEXT_MARKER.search(data, pos)
                if found is None:
                    return False
                pos = found.start()
    return False


def png_complete(path: str | os.PathLike) -> bool:
    """Whether the PNG's chunks (length, type, data, CRC) run whole to its IEND chunk; bytes after it
    (an editor's or uploader's trailer) do not matter. Reads the whole file."""
    data = Path(path).read_bytes()
    pos = 8  # after the signature
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            return pos <= len(data)
    return False


def check_image(path: str | os.PathLike, decode: bool = False) -> str | None:
    """Cheap validity check without a full decode: returns why the file is bad, or None.

    Reads the header (PIL) and the last bytes: a JPEG must end with its EOI marker and a PNG with
    its IEND chunk (or, when something follows them, reach them: `jpeg_complete`, `png_complete`),
    which catches the truncated files a crashed copy leaves. `decode` also decodes the image (at an
    eighth of its size where the format allows): damage inside a whole file, such as bit rot in its
    compressed data, shows only there (about a millisecond an image).
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return "broken symbolic link"
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with warnings.catch_warnings():  # a phone's 100+ megapixel photo is no decompression bomb here:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # OpenCV decodes up to 2^30 pixels
            try:
                with Image.open(path) as im:
                    fmt = im.format
            except Image.DecompressionBombError:
                fmt = None
        with open(path, "rb") as f:
            f.seek(max(0, size - 16))
            tail = f.read()
    except Exception as e:  # PIL raises several types for garbage
        return f"unreadable image ({e.__class__.__name__})"
    # MPO: a phone's multi-picture JPEG (PIL's name for it); OpenCV decodes its first picture
    if fmt in ("JPEG", "MPO") and b"\xff\xd9" not in tail[-4:] and not tail.rstrip(b"\x00").endswith(b"\xff\xd9") \
            and not jpeg_complete(path):  # phones append trailers (Samsung, motion photos) after the marker
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in tail and not png_complete(path):
        return "truncated PNG (no IEND chunk)"
    if decode:
        try:
            load_image(path, reduce=8)
        except DataError:
            return "cannot decode image"
    return None


# --------------------------------------------------------------------------- images
REFERENCE_FRAME = (512, 384)  # (H, W) of the competition photos; crop sizes are given in its pixels


_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_jpeg_rgb(source: str | os.PathLike | np.ndarray) -> np.ndarray | None:
    """A JPEG (a file, or its bytes from `read_bytes`) in full as RGB uint8 HWC, upright by its EXIF
    orientation, with torchvision's libjpeg-turbo: the same pixels as OpenCV's, in 0.86 against 0.94
    ms for a 384x512 photo (decoding is most of the first epoch). None for anything else or anything
    it cannot decode, which then goes the OpenCV / PIL way (and its error messages). torchvision 0.29
    deprecates its image decoders (for TorchCodec); where a later one has dropped them, OpenCV decodes."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    raw = read_bytes(source) if not isinstance(source, np.ndarray) else source
    if raw is None or raw[:2].tobytes() != b"\xff\xd8":
        return None
    try:
        chw = decode_jpeg(torch.from_numpy(raw), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError):
        return None
    return np.ascontiguousarray(chw.permute(1, 2, 0).numpy())  # a view of its HWC buffer: no copy


def load_image(path: str | os.PathLike, reduce: int = 1, raw: np.ndarray | None = None) -> np.ndarray:
    """Decode to RGB uint8 HWC (torchvision's or OpenCV's libjpeg-turbo: ~4x faster than PIL +
    torchvision transforms).

    `reduce` 2, 4 or 8 decodes a JPEG at that fraction of its size inside the inverse DCT
    (libjpeg's scaled decoding): less work than decoding in full and shrinking afterwards.
    `raw`: the file's bytes from `read_bytes`, when the caller already has them.
    """
    if reduce == 1 and (img := decode_jpeg_rgb(path if raw is None else raw)) is not None:
        return img
    if reduce == 1:
        img = cv2.imread(str(path), getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR))
        bgr = not hasattr(cv2, "IMREAD_COLOR_RGB")
    else:  # OpenCV does not combine the reduced flags with RGB output
        img, bgr = cv2.imread(str(path), _REDUCED_FLAGS[reduce]), True
    if img is None:  # OpenCV returns None rather than raising; PIL names the problem better
        try:
            with Image.open(path) as im:  # upright, as OpenCV reads it
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except Exception as e:
            raise DataError(f"cannot decode image ({e.__class__.__name__}): {path}") from None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else img


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def read_bytes(path: str | os.PathLike) -> np.ndarray | None:
    """A file's bytes as uint8, read once for both the header and the decoder; None if unreadable."""
    try:
        return np.fromfile(path, np.uint8)
    except (OSError, ValueError):
        return None


def jpeg_size(source: str | os.PathLike | np.ndarray) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (of a file, or of its bytes from `read_bytes`),
    None for anything else: much cheaper than PIL's open, which matters once per image on the cold
    path."""
    buf = read_bytes(source) if not isinstance(source, np.ndarray) else source
    if buf is None or buf[:2].tobytes() != b"\xff\xd8":
        return None
    data, pos = buf.data, 2  # a memoryview: indexing it gives ints without copies
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            return None
        while pos + 1 < len(data) and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= len(data):
            return None
        m, pos = data[pos + 1], pos + 2
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a length
            continue
        if pos + 2 > len(data):
            return None
        length = data[pos] << 8 | data[pos + 1]
        if m in _SOF_MARKERS:  # precision, height, width
            if pos + 7 > len(data):
                return None
            return data[pos + 5] << 8 | data[pos + 6], data[pos + 3] << 8 | data[pos + 4]
        if m in (0xD9, 0xDA) or length < 2:  # image data before any frame header
            return None
        pos += length
    return None


def jpeg_reduction(source: str | os.PathLike | np.ndarray, resize: Sequence[int], crop: Sequence | None = None) -> int:
    """The largest `load_image(reduce=)` factor that still leaves the crop at least `resize`
    (H, W) pixels, so nothing is ever upsampled; 1 for other formats. Reads the header only
    (of a file, or of its bytes from `read_bytes`)."""
    size = jpeg_size(source)
    if size is None:
        return 1
    width, height = size
    for factor in (8, 4, 2):
        # libjpeg rounds scaled sizes up
        _, _, h, w = crop_box(-(-height // factor), -(-width // factor), crop)
        if h >= resize[0] and w >= resize[1]:
            return factor
    return 1


def crop_box(height: int, width: int, crop: Sequence | None) -> tuple[int, int, int, int]:
    """(top, left, h, w) for a crop given in 384x512-photo pixels, scaled to this image
    so the same part of the frame is kept whatever the resolution."""
    if not crop:
        return 0, 0, height, width
    mode, ch, cw = crop[0], int(crop[1]), int(crop[2])
    scale = min(height / REFERENCE_FRAME[0], width / REFERENCE_FRAME[1])
    ch, cw = min(height, max(1, round(ch * scale))), min(width, max(1, round(cw * scale)))
    left = (width - cw) // 2
    if mode == "center":
        top = (height - ch) // 2
    elif mode == "bust":  # head and shoulders: start an eighth of the way down the frame
        top = min(height - ch, height // 8)
    else:
        raise ValueError(f"unknown crop mode {mode!r} (center or bust)")
    return top, left, ch, cw


def _box_size(factor: float) -> int:
    """Odd box-filter width that low-passes before sampling `factor` times more sparsely."""
    if factor < 1.5:
        return 1
    k = int(np.ceil(factor))
    return k if k % 2 else k + 1


# Bump when `preprocess` (or `warp_face`) would make other pixels of the same photo: the ImageStore cache
# key holds it, so crops made by an older version are never reused.
PREPROCESS_VERSION = 2


def preprocess(img: np.ndarray, resize: Sequence[int], crop: Sequence | None = None) -> np.ndarray:
    """The deterministic part: crop, then resize to (H, W).

    Shrinking is a box blur about as wide as the shrink factor followed by bilinear sampling:
    antialiased like INTER_AREA (as close to PIL's antialiased bilinear resize) at a fraction
    of INTER_AREA's cost for non-integer factors.
    """
    top, left, h, w = crop_box(img.shape[0], img.shape[1], crop)
    img = img[top:top + h, left:left + w]
    out_h, out_w = int(resize[0]), int(resize[1])
    if img.shape[:2] != (out_h, out_w):
        kx, ky = _box_size(img.shape[1] / out_w), _box_size(img.shape[0] / out_h)
        if kx > 1 or ky > 1:
            img = cv2.blur(np.ascontiguousarray(img), (kx, ky), borderType=cv2.BORDER_REFLECT_101)
        img = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(img)


def warp_face(path: str | os.PathLike, raw: np.ndarray | None, matrix: np.ndarray, resize: Sequence[int]) -> np.ndarray:
    """A face stage crop: the photo decoded (at a JPEG reduction that never upsamples the crop) and cut by
    `matrix` (photo pixels -> crop pixels) at `resize` (H, W)."""
    size = jpeg_size(raw) if raw is not None else None
    shrink = 1.0 / max(float(np.hypot(matrix[0, 0], matrix[1, 0])), 1e-12)  # photo pixels per crop pixel
    factor = next((f for f in (8, 4, 2) if f <= shrink), 1) if size else 1
    img = load_image(path, factor, raw)
    if factor > 1:
        width, height = size
        if img.shape[:2] != (-(-height // factor), -(-width // factor)):  # EXIF rotation: decode in full
            img, factor = load_image(path, raw=raw), 1
    if factor > 1:  # a reduced pixel (u, v) covers photo pixels f*u .. f*u + f - 1
        linear = matrix[:, :2] * factor
        matrix = np.concatenate([linear, (matrix[:, 2] + matrix[:, :2].sum(1) * (factor - 1) / 2)[:, None]], 1)
    return faces.warp(img, matrix, resize)


def face_store(paths: Sequence[str], preprocess: dict, cache_dir: str | os.PathLike | None = None,
               face_run: faces.FaceRun | None = None, groups: Sequence[str | None] | None = None,
               progress: Callable[[Iterable], Iterable] | None = None) -> tuple[ImageStore, faces.Located | None]:
    """The ImageStore a checkpoint's `preprocess` asks for: with a face stage (`preprocess["face"]`), every
    photo located first (detections shared and cached through `face_run`, on disk where its folder is set),
    then cut by its own transform. `groups`: the sitting of each training photo (None for photos that stand
    alone), see `faces.FaceStage.locate`. Returns the store and the located faces (None without a face
    stage); a training call (no fallback yet) writes its learnt fallback into `preprocess["face"]`."""
    settings = faces.FaceSettings.from_dict(preprocess.get("face"))
    if settings is None:
        return ImageStore(paths, preprocess["resize"], preprocess.get("crop"), cache_dir), None
    face_run = face_run if face_run is not None else faces.FaceRun()
    located = faces.FaceStage(settings).locate(paths, load_image, groups, face_run.cache(settings.detector_key()),
                                               progress, face_run.workers)
    face_run.located.append(located)
    preprocess["face"] = settings.to_dict()
    transforms = located.transforms(settings.geometry, preprocess["resize"])
    return ImageStore(paths, preprocess["resize"], None, cache_dir, transforms), located


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mask-toolkit"


class ImageStore:
    """Preprocessed uint8 images by index: decoded on demand, or from a memmap cache.

    The cache is one uint8 file of shape (N, H, W, 3) plus a fill-flag file, keyed by the
    file list, their mtimes and sizes, the crop and the size. Workers fill it lazily during
    the first epoch (each writes its own rows), so the cold epoch is parallel and there is
    no separate pre-pass; later epochs and later runs only read. Memory stays bounded:
    pages come from the OS page cache, never one Python object per image.
    """

    def __init__(self, paths: Sequence[str], resize: Sequence[int], crop: Sequence | None = None,
                 cache_dir: str | os.PathLike | None = None, transforms: np.ndarray | None = None):
        self.paths = list(paths)
        self.resize = (int(resize[0]), int(resize[1]))
        self.crop = list(crop) if crop else None
        # [N, 2, 3] photo -> crop matrices of the face stage (faces.Located.transforms), replacing crop + resize
        self.transforms = None if transforms is None else np.asarray(transforms, np.float64)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._pixels: np.ndarray | None = None
        self._filled: np.ndarray | None = None
        self._writer = None  # the data file, for filling rows with pwrite
        self.key = self._key() if self.cache_dir else None

    def _key(self) -> str:
        h = hashlib.sha1(json.dumps({"v": PREPROCESS_VERSION, "resize": self.resize, "crop": self.crop}).encode())
        if self.transforms is not None:  # the face crops: each photo's own matrix (to 1e-4 of a pixel)
            h.update(np.round(self.transforms, 4).tobytes())
        for p in self.paths:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
        return h.hexdigest()[:20]

    @property
    def cache_files(self) -> tuple[Path, Path, Path]:
        base = self.cache_dir / f"images-{self.key}"
        return base.with_suffix(".u8"), base.with_suffix(".filled"), base.with_suffix(".json")

    def is_complete(self) -> bool:
        """True when every image is already in the cache (a warm start: no decoding)."""
        return self.cache_dir is not None and self.cache_files[2].exists()

    def _open(self) -> None:
        # Opened lazily in each process (after fork/spawn), never pickled with the dataset.
        data, flags, meta = self.cache_files
        shape = (len(self.paths), *self.resize, 3)
        if meta.exists():
            self._pixels = np.memmap(data, np.uint8, "r", shape=shape)
            self._filled = None
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for path, size in ((data, int(np.prod(shape))), (flags, len(self.paths))):
            if not path.exists():
                # Create-if-absent atomically: several processes (DDP ranks, workers) may race
                # here, and replacing a file another one already writes into would lose rows.
                tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    f.truncate(size)  # sparse zero file
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass
                tmp.unlink()
        self._pixels = np.memmap(data, np.uint8, "r+", shape=shape)
        self._filled = np.memmap(flags, np.uint8, "r+", shape=(len(self.paths),))
        self._writer = open(data, "r+b", buffering=0)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pixels"] = state["_filled"] = state["_writer"] = None
        return state

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> np.ndarray:
        path = self.paths[index]
        raw = read_bytes(path)  # one read for the header and the decoder
        if self.transforms is not None:
            return warp_face(path, raw, self.transforms[index], self.resize)
        reduce = jpeg_reduction(raw, self.resize, self.crop) if raw is not None else 1
        img = load_image(path, reduce, raw)
        if reduce > 1:
            _, _, h, w = crop_box(img.shape[0], img.shape[1], self.crop)
            if h < self.resize[0] or w < self.resize[1]:  # EXIF rotation swapped the sides
                img = load_image(path, raw=raw)
        return preprocess(img, self.resize, self.crop)

    def __getitem__(self, index: int) -> np.ndarray:
        if self.cache_dir is None:
            return self.decode(index)
        if self._pixels is None:
            self._open()
        if self._filled is not None and not self._filled[index]:
            img = self.decode(index)
            # pwrite rather than assigning into the memmap: the same page cache, without a page
            # fault per 4 KiB of the row (half the cost of the write on a VM)
            row, offset = memoryview(img).cast("B"), index * img.nbytes
            while row:
                written = os.pwrite(self._writer.fileno(), row, offset)
                row, offset = row[written:], offset + written
            self._filled[index] = 1  # flag after the pixels: a crash leaves the row unflagged
            return img  # already private: no need to read the row back
        return np.array(self._pixels[index])  # a private, writable copy of one small image

    def fill(self, indices: Iterable[int] | None = None) -> None:
        """Decode whatever is missing (used before marking the cache complete)."""
        for i in range(len(self)) if indices is None else indices:
            self[i]

    def finalize(self) -> bool:
        """Mark the cache complete once every row is filled; later opens are read-only."""
        if self.cache_dir is None or self.is_complete():
            return self.is_complete()
        if self._pixels is None:
            self._open()
        if self._filled is None or not self._filled.all():
            return False
        self._pixels.flush()
        data, flags, meta = self.cache_files
        # atomic: the meta file's existence is what marks the cache complete
        atomic_write_text(meta, json.dumps({"n": len(self.paths), "resize": self.resize, "crop": self.crop}))
        flags.unlink(missing_ok=True)
        self._writer.close()
        self._pixels = self._filled = self._writer = None
        return True
