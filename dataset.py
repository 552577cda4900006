"""Data layer: labels, discovery of the competition layout, person-level splits,
datasets, augmentations and the decoded-image cache.

Pipeline, in one line: decode + crop + resize once (optionally cached as uint8 in a
memmap) -> cheap uint8 augmentation in the workers, colour jitter included -> uint8 batch
to the device -> normalisation there (`BatchTransform`). Validation and
inference use the same path without the random parts.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from maskcls import faces
from maskcls.cli import ToolkitError, examples
from maskcls.fileio import atomic_write_text, path_escape
from maskcls.task import (DEFAULT_AGE_BINS, GENDER_NAMES, NUM_CLASSES, TASK_CLASSES, age_label,  # noqa: F401 (re-exported)
                  decode_class, encode_class, task_target)

if TYPE_CHECKING:
    from maskcls.task import Task

cv2.setNumThreads(1)  # workers parallelise; OpenCV's own threads would oversubscribe the cores

# --------------------------------------------------------------------------- labels
MASK_KINDS = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
GENDERS = {"male": 0, "female": 1}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
# Folders the OS leaves beside the data (macOS zips: __MACOSX; Synology NAS: @eaDir): never a person.
SYSTEM_DIRS = {"__MACOSX", "@eaDir"}
MAX_AGE = 130  # years: a folder name or an override above it is a typo, not a person
PERSON_DIR = re.compile(r"^(?P<id>[^_]+)_(?P<gender>[^_]+)_(?P<race>[^_]+)_(?P<age>[^_]+)$")


class DataError(ToolkitError, ValueError):
    """Bad input data; the message is one line and names the offending path."""


# --------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class Sample:
    path: str
    person: str  # the person's folder name
    kind: str  # mask1..mask5, incorrect_mask, normal
    mask: int
    gender: int
    age: int  # raw age in years; binned on demand so the cut points stay a setting

    def target(self, task: str, age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> int | tuple[int, int, int]:
        return task_target(self.mask, self.gender, age_label(self.age, age_bins), task)

    def label18(self, age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> int:
        return encode_class(self.mask, self.gender, age_label(self.age, age_bins))


def images_root(data_dir: str | os.PathLike) -> Path:
    """Accept `train/` (holding `images/`) or `train/images` itself."""
    root = Path(data_dir)
    if root.is_file():  # e.g. train/train.csv: say what to pass rather than "not found"
        folder = root.parent
        if PERSON_DIR.match(folder.name):  # one photo: the folder above its person's
            folder = folder.parent.parent if folder.parent.name == "images" else folder.parent
        elif not (folder / "images").is_dir() and (folder.parent / "train" / "images").is_dir():
            folder = folder.parent / "train"  # e.g. gt/gt.csv: the dataset's training folder, not gt/
        raise DataError(f"the data directory is a file: {root} (pass the folder that holds images/, "
                        f"e.g. {folder})")
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    if (root / "images").is_dir():
        return root / "images"
    if (root / "train" / "images").is_dir():  # the dataset's root (train/, eval/, gt/): one level too high
        raise DataError(f"{root} holds a whole dataset; pass its training folder: --data_dir {root / 'train'}")
    return root


# In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker; anything else
# after a run of 0xFF (fill bytes) is the next marker.
_JPEG_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")


def person_dirs(root: Path) -> list[Path]:
    """The person folders under an `images_root`, sorted: hidden and OS folders are not people."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in SYSTEM_DIRS)


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


def discover(
    data_dir: str | os.PathLike,
    skip_bad_images: bool = False,
    age_bins: Sequence[int] = DEFAULT_AGE_BINS,
    verbose: bool = True,
    label_overrides: "LabelOverrides | str | os.PathLike | None" = None,
) -> list[Sample]:
    """Find every training image of the competition layout.

    Hidden files (`._mask1.jpg`, `.DS_Store`), OS folders (`__MACOSX`) and non-image files are
    skipped and counted; structural problems raise DataError naming the path; bad images raise
    too unless `skip_bad_images`, which warns and drops them. `label_overrides` (an
    audit.csv, see `read_label_overrides`) corrects labels without touching the files;
    a row that names something not in the data raises DataError.
    """
    root = images_root(data_dir)
    people = person_dirs(root)
    if not people:
        raise DataError(f"no person folders (<id>_<gender>_<race>_<age>) in {root}")
    samples: list[Sample] = []
    skipped: dict[str, int] = {}
    bad: list[str] = []
    incomplete: list[str] = []
    for person in people:
        match = PERSON_DIR.match(person.name)
        if not match:
            raise DataError(f"folder name is not <id>_<gender>_<race>_<age>: {person}")
        gender = GENDERS.get(match["gender"].lower())
        if gender is None:
            raise DataError(f"unknown gender {match['gender']!r} (expected male/female): {person}")
        if not match["age"].isdigit():
            raise DataError(f"age is not a number ({match['age']!r}): {person}")
        age = int(match["age"])
        if age >= MAX_AGE:  # a typo ("300") would silently train as ">=60"
            raise DataError(f"age {age} is not a person's age: {person}")
        found: dict[str, Path] = {}
        for file in sorted(person.iterdir()):
            if file.name.startswith("."):
                skipped["hidden file"] = skipped.get("hidden file", 0) + 1
                continue
            kind = file.stem.lower()  # "Normal.JPG" from a camera or a case-insensitive disk is a normal photo
            if file.suffix.lower() not in IMAGE_EXTENSIONS or kind not in MASK_KINDS or \
                    not (file.is_file() or file.is_symlink()):  # a broken link is a bad image, said below
                skipped["not a mask image"] = skipped.get("not a mask image", 0) + 1
                continue
            if kind in found:
                raise DataError(f"two files for {kind!r}: {found[kind]} and {file}")
            found[kind] = file
        for kind, file in found.items():
            reason = check_image(file, decode=skip_bad_images)  # skipping: also what only decoding finds
            if reason:
                if not skip_bad_images:
                    raise DataError(f"{reason}: {file} (pass --skip_bad_images to drop such images)")
                bad.append(f"{file} ({reason})")
                continue
            samples.append(Sample(str(file), person.name, kind, MASK_KINDS[kind], gender, age))
        if len(found) < len(MASK_KINDS):
            incomplete.append(f"{person.name} lacks {', '.join(k for k in MASK_KINDS if k not in found)}")
    # One warning per kind of problem, a few examples each: 288 lines of them hid the real error.
    if bad:
        warnings.warn(f"skipped {len(bad)} bad image(s): {examples(bad, sep='; ')}", stacklevel=2)
    if incomplete:
        warnings.warn(f"{len(incomplete)} incomplete person(s), fewer than {len(MASK_KINDS)} images: "
                      f"{examples(incomplete, sep='; ')}", stacklevel=2)
    if not samples:
        raise DataError(f"no usable images under {root}")
    if label_overrides is not None:
        if not isinstance(label_overrides, LabelOverrides):
            label_overrides = read_label_overrides(label_overrides)
        samples = label_overrides.apply(samples, root)
    if verbose:
        print(summarize(samples, age_bins, skipped, len(bad), label_overrides))
    return samples


def summarize(samples: Sequence[Sample], age_bins: Sequence[int], skipped: dict[str, int] | None = None,
              n_bad: int = 0, overrides: "LabelOverrides | None" = None) -> str:
    counts = np.bincount([s.label18(age_bins) for s in samples], minlength=NUM_CLASSES)
    people = len({s.person for s in samples})
    lines = [f"data: {people} people, {len(samples)} images, age bins {list(age_bins)}",
             "  images per class: " + " ".join(f"{c}:{n}" for c, n in enumerate(counts))]
    notes = [f"{n} {why}" for why, n in sorted((skipped or {}).items())]
    if n_bad:
        notes.append(f"{n_bad} bad image(s) dropped")
    if notes:
        lines.append("  skipped: " + ", ".join(notes))
    if overrides is not None:
        lines.append(f"  {overrides.describe()}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- label overrides
OVERRIDE_COLUMNS = ("person", "image", "kind", "score", "label", "suggested")  # audit.py's audit.csv
OVERRIDE_KINDS = ("gender", "age", "mask_swap", "outlier")
DROP = "drop"


@dataclass(frozen=True)
class LabelOverride:
    """One reviewed row of an audit.csv: `person` (folder name), `image` (file name, "" for the whole
    person), `kind`, `label` (the value it corrects; "" = not checked) and `suggested` (the new value)."""

    person: str
    image: str
    kind: str
    label: str
    suggested: str

    def record(self) -> dict[str, str]:
        return {"person": self.person, "image": self.image, "kind": self.kind, "label": self.label,
                "suggested": self.suggested}


@dataclass
class LabelOverrides:
    """Label corrections applied by `discover` (train.py --label_overrides): the data stays read-only."""

    path: str
    rows: list[LabelOverride]

    def records(self) -> list[dict[str, str]]:
        """What a checkpoint stores: every applied override."""
        return [r.record() for r in self.rows]

    def describe(self) -> str:
        count = {k: sum(r.kind == k for r in self.rows) for k in OVERRIDE_KINDS}
        return (f"label overrides: {count['gender']} gender, {count['age']} age, {count['mask_swap']} mask swap, "
                f"{count['outlier']} dropped ({self.path})")

    def _error(self, row: LabelOverride, what: str) -> DataError:
        return DataError(f"label override {row.kind} {row.person}{'/' + row.image if row.image else ''}: {what} "
                         f"({self.path})")

    def apply(self, samples: Sequence[Sample], root: Path) -> list[Sample]:
        """`samples` with every override applied; DataError for a row naming a person or image that is not
        in the data, or whose `label` is not the data's current value (an audit of other data)."""
        import dataclasses

        out: list[Sample | None] = list(samples)
        by_person: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            by_person.setdefault(s.person, []).append(i)
        for row in sorted(self.rows, key=lambda r: r.kind == "outlier"):  # drops last: a dropped image may be swapped
            if row.person not in by_person:
                raise self._error(row, f"no such person folder in {root}")
            mine = by_person[row.person]
            first = samples[mine[0]]
            if row.kind == "gender":
                current = GENDER_NAMES[first.gender]
                if row.label and row.label != current:
                    raise self._error(row, f"the data says {current}, the file says {row.label}")
                for i in mine:
                    out[i] = dataclasses.replace(out[i], gender=GENDERS[row.suggested])
                continue
            if row.kind == "age":
                if row.label and int(float(row.label)) != first.age:
                    raise self._error(row, f"the data says age {first.age}, the file says {row.label}")
                for i in mine:
                    out[i] = dataclasses.replace(out[i], age=int(row.suggested))
                continue
            named = [i for i in mine if Path(samples[i].path).name == row.image]
            if not named:
                raise self._error(row, f"no image {row.image!r} in {root / row.person}")
            i = named[0]
            if row.kind == "outlier":
                out[i] = None
                continue
            current = samples[i].kind
            if row.label and row.label != current:
                raise self._error(row, f"the image is {current}, the file says {row.label}")
            partner = [j for j in mine if samples[j].kind == row.suggested]
            if not partner:
                raise self._error(row, f"no {row.suggested} image to swap with")
            j = partner[0]
            out[i] = dataclasses.replace(out[i], kind=row.suggested, mask=MASK_KINDS[row.suggested])
            out[j] = dataclasses.replace(out[j], kind=current, mask=MASK_KINDS[current])
        kept = [s for s in out if s is not None]
        if not kept:
            raise DataError(f"the label overrides drop every image ({self.path})")
        return kept


def read_label_overrides(path: str | os.PathLike) -> LabelOverrides:
    """Read and check an audit.csv (audit.py) kept by a reviewer: rows deleted are simply absent,
    `suggested` is the new value (gender male/female; age in years; mask_swap the kind the image really
    shows, its partner taking the image's kind; outlier `drop`). Errors are one line naming the file and
    line; a repeated row counts once, conflicting ones are an error."""
    import csv

    file = Path(path)
    if not file.is_file():
        raise DataError(f"label overrides file not found: {file}" if not file.exists()
                        else f"label overrides must be a CSV file: {file}")
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in ("person", "image", "kind", "suggested") if c not in header]
            if missing:
                raise DataError(f"label overrides lack the column(s) {', '.join(missing)} (expected "
                                f"{','.join(OVERRIDE_COLUMNS)}, as audit.py writes): {file}")
            reader.fieldnames = header
            lines = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read label overrides ({e.__class__.__name__}): {file}") from None
    rows: dict[tuple, LabelOverride] = {}
    swapped: dict[tuple[str, str], tuple] = {}
    for line, raw in lines:
        cell = {k: (raw.get(k) or "").strip() for k in ("person", "image", "kind", "label", "suggested")}
        if not any(cell.values()):
            continue
        try:
            row = _override_row(**cell)
        except ValueError as e:
            raise DataError(f"label overrides line {line}: {e}: {file}") from None
        key = ((row.person, row.kind) if row.kind in ("gender", "age") else
               (row.person, row.kind, *sorted((Path(row.image).stem, row.suggested))) if row.kind == "mask_swap"
               else (row.person, row.kind, row.image))
        if key in rows and rows[key] != row and row.kind != "mask_swap":
            raise DataError(f"label overrides line {line}: a second, different {row.kind} row for "
                            f"{row.person}{'/' + row.image if row.image else ''}: {file}")
        if row.kind == "mask_swap" and key not in rows:
            for kind in key[2:]:  # an image swapped twice: the order of the swaps would decide its label
                if (row.person, kind) in swapped:
                    raise DataError(f"label overrides line {line}: {row.person} {kind} is in two different "
                                    f"mask swaps: {file}")
                swapped[(row.person, kind)] = key
        rows.setdefault(key, row)
    return LabelOverrides(str(file), list(rows.values()))


def _override_row(person: str, image: str, kind: str, label: str, suggested: str) -> LabelOverride:
    """One row, normalised; ValueError saying what is wrong with it."""
    if not person:
        raise ValueError("empty person")
    if kind not in OVERRIDE_KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(OVERRIDE_KINDS)})")
    if kind in ("gender", "age") and image:
        raise ValueError(f"a {kind} override is about the whole person: leave image empty, got {image!r}")
    if kind in ("mask_swap", "outlier") and not image:
        raise ValueError(f"a {kind} override needs the image's file name")
    if kind == "gender":
        suggested, label = suggested.lower(), label.lower()
        for value in filter(None, (suggested, label)):
            if value not in GENDERS:
                raise ValueError(f"gender must be male or female, got {value!r}")
        if not suggested:
            raise ValueError("no suggested gender")
    elif kind == "age":
        for value in filter(None, (suggested, label)):
            try:
                age = float(value)
            except ValueError:
                raise ValueError(f"age must be a number of years, got {value!r}") from None
            if not 0 < age < MAX_AGE:
                raise ValueError(f"age must be between 0 and {MAX_AGE}, got {value!r}")
        if not suggested:
            raise ValueError("no suggested age")
        suggested = str(int(round(float(suggested))))
    elif kind == "mask_swap":
        image_kind = Path(image).stem.lower()  # as discover reads file names
        if image_kind not in MASK_KINDS:
            raise ValueError(f"{image!r} is not a mask image ({', '.join(MASK_KINDS)})")
        for value in filter(None, (suggested, label)):
            if value not in MASK_KINDS:
                raise ValueError(f"mask kind must be one of {', '.join(MASK_KINDS)}, got {value!r}")
        if not suggested or suggested == (label or image_kind):
            raise ValueError(f"a mask swap needs the other image's kind as suggested, got {suggested!r}")
    elif suggested.lower() != DROP:
        raise ValueError(f"an outlier override's suggested value is {DROP}, got {suggested!r}")
    return LabelOverride(person, image, kind, label, suggested.lower() if kind == "outlier" else suggested)


# --------------------------------------------------------------------------- splits
def person_strata(samples: Sequence[Sample], age_bins: Sequence[int]) -> tuple[list[str], list[int]]:
    """Each person once, with their gender x age class (0..5) for stratification."""
    by_person: dict[str, int] = {}
    for s in samples:
        by_person.setdefault(s.person, task_target(s.mask, s.gender, age_label(s.age, age_bins), "genderage"))
    people = sorted(by_person)
    return people, [by_person[p] for p in people]


def split_by_profile(samples: Sequence[Sample], val_ratio: float, seed: int,
                     age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> tuple[list[int], list[int]]:
    """Person-level split: exactly round(n_people * val_ratio) people in validation,
    stratified by gender x age when every stratum allows it, no person on both sides."""
    from sklearn.model_selection import train_test_split

    people, strata = person_strata(samples, age_bins)
    n_val = round(len(people) * val_ratio)
    if n_val == 0:
        return list(range(len(samples))), []
    if n_val >= len(people):
        raise DataError(f"val_ratio {val_ratio} leaves no training person out of {len(people)}")
    counts = np.bincount(strata)
    can_stratify = counts[counts > 0].min() >= 2 and n_val >= len(counts[counts > 0]) \
        and len(people) - n_val >= len(counts[counts > 0])
    _, val_people = train_test_split(people, test_size=n_val, random_state=seed,
                                     stratify=strata if can_stratify else None)
    val_set = set(val_people)
    train_idx = [i for i, s in enumerate(samples) if s.person not in val_set]
    val_idx = [i for i, s in enumerate(samples) if s.person in val_set]
    return train_idx, val_idx


def split_by_image(samples: Sequence[Sample], val_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Image-level random split (the original MaskBaseDataset). Leaky: one person's
    photos land on both sides, so validation scores are optimistic."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = round(len(samples) * val_ratio)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def kfold_split(samples: Sequence[Sample], k: int, fold: int, seed: int,
                age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> tuple[list[int], list[int]]:
    """Fold `fold` of K by person (StratifiedGroupKFold on the 18 classes, grouped by person)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 <= fold < k:
        raise ValueError(f"--fold must be in 0..{k - 1}, got {fold}")
    labels = [s.label18(age_bins) for s in samples]
    groups = [s.person for s in samples]
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        train_idx, val_idx = list(splitter.split(np.zeros(len(samples)), labels, groups))[fold]
    except ValueError as e:  # e.g. fewer people than folds
        raise DataError(f"cannot make {k} person folds of {len(set(groups))} people: {e}") from None
    return train_idx.tolist(), val_idx.tolist()


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
        h = hashlib.sha1(json.dumps({"v": 2, "resize": self.resize, "crop": self.crop}).encode())
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


# --------------------------------------------------------------------------- augmentations
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


AUGMENTATIONS: dict[str, Callable[[], Augmentation]] = {}


def register_augmentation(fn: Callable[[], Augmentation]) -> Callable[[], Augmentation]:
    AUGMENTATIONS[fn.__name__] = fn
    return fn


def create_augmentation(name: str) -> Augmentation:
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(sorted(AUGMENTATIONS))}")
    return AUGMENTATIONS[name]()


@register_augmentation
def BaseAugmentation() -> Augmentation:
    """Resize + normalise, nothing random (the original baseline)."""
    return Augmentation("BaseAugmentation")


@register_augmentation
def FlipAugmentation() -> Augmentation:
    """Horizontal flip only: faces are left-right symmetric, so it is nearly free accuracy."""
    return Augmentation("FlipAugmentation", hflip=0.5)


@register_augmentation
def FastAugmentation() -> Augmentation:
    """Flip, small shift/scale, colour jitter: the cheap, strong default for real photos."""
    return Augmentation("FastAugmentation", hflip=0.5, shift_scale=(0.06, 0.1), jitter=(0.2, 0.2, 0.2, 0.05))


@register_augmentation
def ErasingAugmentation() -> Augmentation:
    """FastAugmentation plus random erasing (half the images lose one random rectangle)."""
    return Augmentation("ErasingAugmentation", hflip=0.5, shift_scale=(0.06, 0.1), jitter=(0.2, 0.2, 0.2, 0.05),
                        erase=0.5)


@register_augmentation
def StrongAugmentation() -> Augmentation:
    """FastAugmentation's operations, stronger: rotation up to 15 degrees, larger shift/scale and colour jitter."""
    return Augmentation("StrongAugmentation", hflip=0.5, shift_scale=(0.1, 0.2), rotate=15.0, jitter=(0.3, 0.3, 0.3, 0.05))


@register_augmentation
def CustomAugmentation() -> Augmentation:
    """Original: CenterCrop(320, 256), ColorJitter(0.1, 0.1, 0.1, 0.1), Gaussian noise."""
    return Augmentation("CustomAugmentation", crop=("center", 320, 256), jitter=(0.1, 0.1, 0.1, 0.1), noise_std=0.1)


@register_augmentation
def MyAugmentationCenter() -> Augmentation:
    """Centre crop 256x256 (in 384x512-photo pixels), then resize."""
    return Augmentation("MyAugmentationCenter", crop=("center", 256, 256))


@register_augmentation
def MyAugmentationBust() -> Augmentation:
    """Upper-body crop 384x384 starting an eighth of the way down, then resize."""
    return Augmentation("MyAugmentationBust", crop=("bust", 384, 384))


def _album_good():
    import albumentations as A
    return A.Compose([A.HorizontalFlip(p=0.5),
                      A.Affine(translate_percent=(-0.05, 0.05), scale=(0.9, 1.1), rotate=(-10, 10), p=0.5),
                      A.RandomBrightnessContrast(p=0.5), A.HueSaturationValue(p=0.3),
                      A.GaussNoise(std_range=(0.02, 0.08), p=0.2)])


def _album_flip():
    import albumentations as A
    return A.Compose([A.HorizontalFlip(p=0.5)])


def _album_best():
    import albumentations as A
    return A.Compose([A.HorizontalFlip(p=0.5),
                      A.Affine(translate_percent=(-0.05, 0.05), scale=(0.95, 1.05), rotate=(-10, 10), p=0.5),
                      A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
                      A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=15, val_shift_limit=10, p=0.3),
                      A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.05, 0.15),
                                      hole_width_range=(0.05, 0.15), p=0.2)])


@register_augmentation
def GoodAugmentation() -> Augmentation:
    """Albumentations assortment: flip, shift-scale-rotate, brightness/contrast, HSV, noise."""
    return Augmentation("GoodAugmentation", album=_album_good)


@register_augmentation
def AugForInception() -> Augmentation:
    """Centre crop 299x299 (photo pixels) plus the GoodAugmentation set; use --resize 299 299."""
    return Augmentation("AugForInception", crop=("center", 299, 299), album=_album_good)


@register_augmentation
def CustomAlbumentationAug() -> Augmentation:
    """Template for your own albumentations pipeline: resize + flip."""
    return Augmentation("CustomAlbumentationAug", album=_album_flip)


@register_augmentation
def BestAugForAlbum() -> Augmentation:
    """Bust crop + flip, mild geometry and colour, small cutout."""
    return Augmentation("BestAugForAlbum", crop=("bust", 384, 384), album=_album_best)


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


# --------------------------------------------------------------------------- datasets
class MaskDataset(Dataset):
    """Training/validation images -> (uint8 CHW tensor, target). `train` enables the
    augmentation's per-sample random ops; validation is never augmented."""

    def __init__(self, samples: Sequence[Sample], store: ImageStore, indices: Sequence[int], task: "str | Task" = "all",
                 age_bins: Sequence[int] = DEFAULT_AGE_BINS, augmentation: Augmentation | None = None,
                 train: bool = False, seed: int = 0):
        from maskcls.task import Task, get_task

        task = task if isinstance(task, Task) else get_task(task)  # the task says what a target is
        self.samples, self.store, self.indices = samples, store, list(indices)
        self.task, self.age_bins = task, tuple(age_bins)
        self.augmentation = augmentation if train else None
        self.targets = [task.target(samples[i].mask, samples[i].gender, samples[i].age, self.age_bins)
                        for i in self.indices]
        self.seed = seed
        # Shared with the (persistent) workers so set_epoch reaches them: each sample's
        # random ops depend on (seed, epoch, index) only, whatever worker draws it, which
        # makes runs and --resume reproducible.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img = self.store[self.indices[i]]
        if self.augmentation is not None and self.augmentation.is_random:
            rng = np.random.default_rng((self.seed, int(self._epoch[0]), self.indices[i]))
            img = self.augmentation.cpu_transform(img, rng)
        target = self.targets[i]
        target = torch.tensor(target) if isinstance(target, tuple) else target
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), target

    def model_input(self, i: int) -> np.ndarray:
        """Row i's preprocessed pixels (crop and resize, or the face crop) before any augmentation: what a
        picture of the model's mistakes shows."""
        return self.store[self.indices[i]]

    def labels18(self) -> list[int]:
        return [self.samples[i].label18(self.age_bins) for i in self.indices]

    def labels(self) -> list[int]:
        """Class ids of the task's combined prediction (18 for multi-head), at this dataset's age bins."""
        return [self.task.label(self.samples[i].mask, self.samples[i].gender, self.samples[i].age, self.age_bins)
                for i in self.indices]


class TestDataset(Dataset):
    """Evaluation images in `info.csv` row order -> (uint8 CHW tensor, row index)."""

    def __init__(self, store: ImageStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.store[i]).permute(2, 0, 1), i


def read_eval_info(data_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """`eval/info.csv` and the image paths in its row order; errors name the file.
    `data_dir` is the eval folder or its info.csv itself (images are then beside it)."""
    root = Path(data_dir)
    if root.is_file():
        root, info_path = root.parent, root
    else:
        info_path = root / "info.csv"
    if not info_path.is_file():
        raise DataError(f"info.csv not found: {info_path}")
    try:
        # Cells as written: an ImageID "0012" or "NA" stays that text. index_col=False: a row with
        # more cells than the header must not shift ImageID into pandas' index.
        info = pd.read_csv(info_path, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"info.csv is empty: {info_path}") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"cannot read info.csv ({e.__class__.__name__}: {str(e).strip().splitlines()[0]}): "
                        f"{info_path}") from None
    info.columns = [str(c).strip() for c in info.columns]  # "ImageID, ans": as evaluation.py reads it
    if "ImageID" not in info.columns:
        raise DataError(f"info.csv has no ImageID column: {info_path}")
    if info.empty:
        raise DataError(f"info.csv has no rows: {info_path}")
    info["ImageID"] = info["ImageID"].str.strip()  # evaluation.py pairs rows by the stripped ImageID
    empty = int((info["ImageID"] == "").sum())
    if empty:
        raise DataError(f"info.csv has {empty} empty ImageID(s): {info_path}")
    repeated = info["ImageID"][info["ImageID"].duplicated()].unique().tolist()
    if repeated:  # output.csv would repeat them too, which evaluation.py rejects
        raise DataError(f"info.csv lists {len(repeated)} ImageID(s) more than once "
                        f"({examples([repr(i) for i in repeated])}): {info_path}")
    escaping = [(row, image_id, reason) for row, image_id in enumerate(info["ImageID"], start=2)
                if (reason := path_escape(image_id))]
    if escaping:  # an info.csv comes from someone else: it must not steer reads outside its images/
        row, image_id, reason = escaping[0]
        more = f" (and {len(escaping) - 1} more row(s))" if len(escaping) > 1 else ""
        raise DataError(f"info.csv line {row}: ImageID {image_id!r} is {reason}, outside {root / 'images'}{more}; "
                        f"ImageIDs name files inside images/: {info_path}")
    paths = [listed_path(root / "images", image_id) for image_id in info["ImageID"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(listed_images_error([f"not found: {p}" for p in missing], len(paths))
                        + extension_hint(missing))
    return info, paths


def listed_path(images: Path, image_id: str) -> str:
    """The file an ImageID names. A name with accents or Hangul may be stored in another Unicode
    form than the CSV writes it (macOS and zip tools decompose it, NFD): same text to a reader,
    other bytes to Linux; the form that exists on disk is taken."""
    path = images / image_id
    if not path.is_file() and not image_id.isascii():
        for form in ("NFC", "NFD"):
            other = images / unicodedata.normalize(form, image_id)
            if other.is_file():
                return str(other)
    return str(path)


def extension_hint(missing: Sequence[str]) -> str:
    """When an ImageID was written without its file's extension (`abc` for images/abc.jpg), say so."""
    suffixes = sorted(IMAGE_EXTENSIONS | {e.upper() for e in IMAGE_EXTENSIONS})
    for path in missing[:20]:
        for suffix in suffixes:
            if os.path.isfile(path + suffix):
                return (f" (an ImageID names the file with its extension: {Path(path).name!r} is "
                        f"{Path(path).name + suffix!r} in images/)")
    return ""


def listed_images_error(problems: Sequence[str], total: int, shown: int = 5) -> str:
    """One line for every bad image info.csv lists (`problems`: "why: path"), the first few named,
    so a user fixes them all in one go rather than one per run."""
    if len(problems) == 1:
        return f"an image listed in info.csv cannot be used: {problems[0]}"
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{len(problems)} of {total} images listed in info.csv cannot be used: {'; '.join(problems[:shown])}{more}"


# Names users already type (SPEC §3): how each splits and which labels it yields.
# "ForAlbum" variants share the one pipeline, which accepts every augmentation.
DATASETS = {
    "MaskBaseDataset": {"split": "image", "task": "all"},
    "MaskSplitByProfileDataset": {"split": "profile", "task": "all"},
    "MaskBaseDatasetForAlbum": {"split": "image", "task": "all"},
    "MaskSplitByProfileDatasetForAlbum": {"split": "profile", "task": "all"},
    "MaskSplitByProfileDatasetForAlbumOnlyMask": {"split": "profile", "task": "mask"},
    "MaskSplitByProfileDatasetForAlbumOnlyGenderAge": {"split": "profile", "task": "genderage"},
}
TEST_DATASETS = ("TestDataset", "TestDatasetForAlbum")


def dataset_spec(name: str) -> dict:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}"
                         + (f" ({name} is for inference)" if name in TEST_DATASETS else ""))
    return DATASETS[name]


def split_indices(samples: Sequence[Sample], dataset: str, val_ratio: float, seed: int,
                  age_bins: Sequence[int] = DEFAULT_AGE_BINS, kfold: int = 0, fold: int = 0
                  ) -> tuple[list[int], list[int]]:
    """Train/validation indices as the named dataset splits (K-fold is always by person)."""
    if kfold:
        return kfold_split(samples, kfold, fold, seed, age_bins)
    if dataset_spec(dataset)["split"] == "image":
        return split_by_image(samples, val_ratio, seed)
    return split_by_profile(samples, val_ratio, seed, age_bins)


def default_num_workers(cpu_training: bool = False) -> int:
    """One worker per core beyond the main process's, at most 8 (more rarely helps). None when the
    model trains on a CPU of 2 cores or fewer: there a worker takes a core from the model's threads,
    and bench.py's training loop decoding every image ran 25-26 img/s with no worker against 19-21
    with one (ResNet18 224x224, 2 cores; 22 against 13 before this toolkit's faster decoding)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpu_training and cores <= 2:
        return 0
    return max(0, min(8, cores - 1))


def collate(batch: list):
    """`default_collate`, with a fast path for the datasets' (uint8 CHW view of an HWC image, ...)
    samples: OpenCV de-interleaves each image straight into the batch, where torch.stack would
    copy the strided views element by element (~10x slower; it dominated a warm epoch)."""
    from torch.utils.data import default_collate

    first = batch[0] if batch else None
    if not (isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor)):
        return default_collate(batch)
    images = [sample[0] for sample in batch]
    if not all(img.dtype == torch.uint8 and img.dim() == 3 and img.shape == images[0].shape
               and img.shape[0] in (1, 3, 4) and img.permute(1, 2, 0).is_contiguous() for img in images):
        return default_collate(batch)
    shape = (len(images), *images[0].shape)
    if torch.utils.data.get_worker_info() is not None:
        # as default_collate does: build the batch in shared memory, saving a copy on the way out
        storage = images[0]._typed_storage()._new_shared(int(np.prod(shape)), device=images[0].device)
        out = images[0].new(storage).resize_(shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    planes = out.numpy()
    for k, img in enumerate(images):
        cv2.split(img.permute(1, 2, 0).numpy(), list(planes[k]))
    rest = default_collate([tuple(sample[1:]) for sample in batch])
    return [out, *rest]


def _worker_excepthook(exc_type, exc, tb) -> None:
    # A batch's file descriptor is handed over by a thread of the worker (multiprocessing's
    # resource_sharer), which reports errors through sys.excepthook: when the main process stops
    # mid-handover, that is a "Connection reset by peer" traceback about nothing the user can fix.
    if issubclass(exc_type, (ConnectionError, EOFError)):
        return
    sys.__excepthook__(exc_type, exc, tb)


class QuietWorker:
    """DataLoader worker_init_fn: the worker ignores SIGTERM and SIGINT, then runs `then` (if any).

    A scheduler (`scancel`, `timeout`, `kill -- -PGID`) or Ctrl-C signals the whole process group.
    Killed first, the workers would end the run in "DataLoader worker (pid ...) is killed by
    signal" tracebacks; ignoring the signal leaves the stop to the main process, which shuts
    its loaders down cleanly (workers also exit by themselves once the main process is gone).
    Connection errors of the worker's batch-handover thread, which only happen when the main
    process stops mid-transfer, are not printed either. A class rather than a closure so it
    pickles for the spawn start method.
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.excepthook = _worker_excepthook
        if self.then is not None:
            self.then(worker_id)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                sampler=None, pin_memory: bool = False, seed: int | None = None,
                worker_init_fn: Callable[[int], None] | None = None) -> DataLoader:
    """The toolkit's DataLoader: persistent workers that leave termination signals to the main
    process (QuietWorker, chained with `worker_init_fn`), the fast uint8 `collate`."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=generator, collate_fn=collate,
                      worker_init_fn=QuietWorker(worker_init_fn) if num_workers > 0 else worker_init_fn,
                      prefetch_factor=4 if num_workers > 0 else None)


def close_loaders(*loaders: DataLoader | None) -> None:
    """Shut the persistent workers of `make_loader` loaders down now (None is skipped).

    Left to the garbage collector they may outlive the run: an interrupt's traceback holds the
    loaders in a reference cycle, and at interpreter exit multiprocessing stops its children with
    SIGTERM, which these workers ignore (QuietWorker), then joins them forever. Shutting down is
    what DataLoader's own iterator does when freed; the loader starts new workers if used again.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None
