"""Data: discovery of the competition layout (labels from folder and file names), person-level splits (and
the split a run records for --resume), the datasets, and the augmentation presets a competitor edits.

Pipeline, in one line: decode + crop + resize once (maskcls/imaging.py, optionally cached as uint8 in a
memmap) -> cheap uint8 augmentation in the workers, colour jitter included (maskcls/augment.py) -> uint8 batch
to the device -> normalisation there (`BatchTransform`). Validation and inference use the same path without
the random parts. Loaders are made by maskcls/loaders.py, label overrides read by maskcls/overrides.py.
"""
from __future__ import annotations

import os
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from maskcls.augment import Augmentation
from maskcls.cli import DataError, UsageError, examples
from maskcls.distributed import log
from maskcls.fileio import path_escape
from maskcls.imaging import ImageStore, check_image
from maskcls.overrides import LabelOverrides, read_label_overrides
from maskcls.task import (DEFAULT_AGE_BINS, GENDERS, MASK_KINDS, MAX_AGE, NUM_CLASSES, Task, age_label, encode_class,
                          get_task, task_target)
# Imported where used, being heavy or optional: scikit-learn's splitters and albumentations (only their presets).

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
# Folders the OS leaves beside the data (macOS zips: __MACOSX; Synology NAS: @eaDir): never a person.
SYSTEM_DIRS = {"__MACOSX", "@eaDir"}
PERSON_DIR = re.compile(r"^(?P<id>[^_]+)_(?P<gender>[^_]+)_(?P<race>[^_]+)_(?P<age>[^_]+)$")


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


def person_dirs(root: Path) -> list[Path]:
    """The person folders under an `images_root`, sorted: hidden and OS folders are not people."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in SYSTEM_DIRS)


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


# --------------------------------------------------------------------------- augmentation presets
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


# --------------------------------------------------------------------------- datasets
class MaskDataset(Dataset):
    """Training/validation images -> (uint8 CHW tensor, target). `train` enables the
    augmentation's per-sample random ops; validation is never augmented."""

    def __init__(self, samples: Sequence[Sample], store: ImageStore, indices: Sequence[int], task: "str | Task" = "all",
                 age_bins: Sequence[int] = DEFAULT_AGE_BINS, augmentation: Augmentation | None = None,
                 train: bool = False, seed: int = 0):
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


def sample_key(sample) -> str:
    """How a run records an image of its split: person folder and file name (not the absolute path, so a
    moved dataset still matches)."""
    return f"{sample.person}/{Path(sample.path).name}"


def recorded_split(samples: list, train_idx: list[int], val_idx: list[int]) -> dict:
    """What last.pth keeps of the split, for --resume to compare: the training and validation images."""
    return {"train": sorted(sample_key(samples[i]) for i in train_idx),
            "val": sorted(sample_key(samples[i]) for i in val_idx)}


def _people(keys) -> str:
    names = sorted({k.split("/", 1)[0] for k in keys})
    return f"{len(names)} ({examples(names)})"


def keep_recorded_split(samples: list, train_idx: list[int], val_idx: list[int], recorded: dict | None,
                        cross_validation: bool) -> tuple[list[int], list[int]]:
    """On --resume: the split the run started with, whatever the data holds now. Images gone since are
    named and dropped; images new since are left out (validation must stay people the model never trained
    on, and the first epochs never saw them). A --fold all resume on changed data stops: its later folds
    would be drawn from other people than its earlier ones. A last.pth from before splits were recorded
    resumes as before."""
    if recorded is None:
        return train_idx, val_idx
    now = {sample_key(x): i for i, x in enumerate(samples)}
    before = {"train": set(recorded["train"]), "val": set(recorded["val"])}
    if before["train"] == {sample_key(samples[i]) for i in train_idx} and \
            before["val"] == {sample_key(samples[i]) for i in val_idx}:
        return train_idx, val_idx
    gone = (before["train"] | before["val"]) - set(now)
    new = set(now) - before["train"] - before["val"]
    changes = "; ".join(part for part in (f"{len(gone)} image(s) of {_people(gone)} people are gone" if gone else "",
                                          f"{len(new)} image(s) of {_people(new)} people are new" if new else "")
                        if part) or "the same images fall otherwise into training and validation"
    if cross_validation:
        raise UsageError(f"the data changed since this cross-validation started ({changes}): its remaining folds "
                         f"would split other people; start it over without --resume (a new --name)")
    log(f"warning: the data changed since this run started ({changes}); keeping the run's recorded split: "
        f"gone images dropped, new ones left out of training and validation")
    return ([now[k] for k in sorted(before["train"] & set(now))], [now[k] for k in sorted(before["val"] & set(now))])
