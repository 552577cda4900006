"""The label scheme, in one place: what a model of each task predicts and how it is scored.

Tasks (SPEC §1): `all` (18 classes), `mask` (3), `genderage` (6) and `multi`, one network with
three heads (mask 3 | gender 2 | age) whose product gives the 18 classes. A multi-head model's
age head is either `bins` (softmax over the three age groups) or `years`: cumulative logits
P(age >= t) for every year t in AGE_THRESHOLDS, trained on the raw age in the folder name, so
the cut points are applied at prediction and can be fitted for macro F1 (`age_cuts`) without
retraining. Either head can train on the age spread over neighbouring years (`age_sigma`, a label
distribution: the folder's age a read as N(a + 0.5, sigma) years), so a person a year from a cut
point trains partly on the next group instead of all on one.

Consumers ask a `Task` (`get_task(name, age_head)` or `task_of(checkpoint)`) for the number of
classes, head sizes, class names, training targets, probabilities from logits, the loss and the
decision rule; nobody else compares task names. Label arithmetic is numpy; torch is imported
only by the methods that take tensors, so importing this module stays cheap.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
# Imported where used, being heavy or optional: torch (only where tensors are given: metrics and evaluation stay
# numpy-only).

if TYPE_CHECKING:
    import torch

TASK_CLASSES = {"all": 18, "mask": 3, "genderage": 6, "multi": 18}
NUM_CLASSES = TASK_CLASSES["all"]  # the competition's classes: mask * 6 + gender * 3 + age
DEFAULT_AGE_BINS = (30, 60)
MASK_NAMES = ("wear", "incorrect", "not wear")
GENDER_NAMES = ("male", "female")
HEAD_SIZES = (3, 2, 3)  # multi-head layout [mask 3 | gender 2 | age 3] with the `bins` age head
AGE_HEADS = ("bins", "years")
# `years` age head: one logit per threshold t = P(age >= t). 19..75 covers the competition's
# 18..60 and any cut point a user would try; ages outside only saturate the end thresholds.
AGE_THRESHOLDS = tuple(range(19, 76))
PROB_FLOOR = 1e-12


# --------------------------------------------------------------------------- label arithmetic
def age_label(age: int, age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> int:
    """0 below the first cut, 1 between, 2 at or above the second (`30 60`: 29->0, 30->1, 60->2)."""
    return bisect.bisect_right(list(age_bins), age)


def encode_class(mask, gender, age):
    """18-class label: mask * 6 + gender * 3 + age (age already binned); ints, arrays or tensors."""
    return mask * 6 + gender * 3 + age


def decode_class(label: int) -> tuple[int, int, int]:
    return label // 6, (label // 3) % 2, label % 3


def decode18(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """18-class labels -> (mask, gender, age) arrays."""
    return split_labels("all", classes)


# Which parts (mask 3, gender 2, age group 3) a task's class id is made of, in row-major order:
# class = ravel_multi_index(parts), so 18 classes are m*6 + g*3 + a and 6 classes g*3 + a.
PART_SIZES = {"mask": 3, "gender": 2, "age": 3}
TASK_PARTS = {"all": ("mask", "gender", "age"), "multi": ("mask", "gender", "age"),
              "mask": ("mask",), "genderage": ("gender", "age")}
Parts = tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]  # (mask, gender, age); None: not in the task


def _parts_of(task: str) -> tuple[str, ...]:
    num_classes(task)
    return TASK_PARTS[task]


def split_labels(task: str, labels: np.ndarray) -> Parts:
    """A task's class ids -> (mask, gender, age group) label arrays, None for parts it lacks."""
    names = _parts_of(task)
    found = np.unravel_index(np.asarray(labels, dtype=np.int64), [PART_SIZES[n] for n in names])
    by_name = dict(zip(names, found))
    return tuple(by_name.get(n) for n in PART_SIZES)


def join_labels(task: str, mask=None, gender=None, age=None) -> np.ndarray:
    """(mask, gender, age group) label arrays -> the task's class ids; parts it lacks are ignored."""
    given = {"mask": mask, "gender": gender, "age": age}
    names = _parts_of(task)
    missing = [n for n in names if given[n] is None]
    if missing:
        raise ValueError(f"task {task} labels need the {', '.join(missing)} part(s)")
    return np.ravel_multi_index([np.asarray(given[n], dtype=np.int64) for n in names],
                                [PART_SIZES[n] for n in names])


def split_probs(task: str, probs: np.ndarray) -> Parts:
    """[N, classes] probabilities -> marginals (p_mask [N,3], p_gender [N,2], p_age [N,3]), None for
    parts the task lacks."""
    names = _parts_of(task)
    grid = np.asarray(probs).reshape(-1, *(PART_SIZES[n] for n in names))
    axes = range(1, grid.ndim)
    by_name = {n: grid.sum(axis=tuple(a for a in axes if a != k)) for k, n in zip(axes, names)}
    return tuple(by_name.get(n) for n in PART_SIZES)


def age_names(age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> tuple[str, str, str]:
    """Readable names of the three age groups for the cut points `age_bins` (30 60 -> <30, 30-59, >=60)."""
    lo, hi = (int(b) for b in age_bins)
    return (f"<{lo}", f"{lo}-{hi - 1}", f">={hi}")


def plain_names(task: str, age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> list[str]:
    """Class names without ids: "wear/male/<30", "incorrect", "female/>=60", ..."""
    n = num_classes(task)
    ages = age_names(age_bins)
    if task == "mask":
        return list(MASK_NAMES)
    if task == "genderage":
        return [f"{GENDER_NAMES[c // 3]}/{ages[c % 3]}" for c in range(n)]
    return [f"{MASK_NAMES[c // 6]}/{GENDER_NAMES[(c // 3) % 2]}/{ages[c % 3]}" for c in range(n)]


def class_names(task: str, age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> list[str]:
    """One readable name per class of `task`, prefixed with its id, e.g. "0 wear/male/<30"."""
    return [f"{i} {name}" for i, name in enumerate(plain_names(task, age_bins))]


def num_classes(task: str) -> int:
    if task not in TASK_CLASSES:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_CLASSES)}")
    return TASK_CLASSES[task]


def task_target(mask: int, gender: int, age: int, task: str) -> int | tuple[int, int, int]:
    """The label a model of `task` is trained on (age already binned)."""
    if get_task(task).multihead:
        return (mask, gender, age)
    return int(join_labels(task, mask, gender, age))


def check_age_bins(age_bins: Sequence[int], what: str = "--age_bins") -> tuple[int, int]:
    a, b = (int(x) for x in age_bins)
    if not 0 < a < b:
        raise ValueError(f"{what} must be two increasing positive ages, e.g. 30 60; got {a} {b}")
    return a, b


# --------------------------------------------------------------------------- decision rule
def log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, PROB_FLOOR, None))


def apply_offsets(probs: np.ndarray, offsets: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """Probabilities after per-class log offsets b_c, renormalised: p'_c ∝ p_c * exp(b_c).
    Their arg-max is the decision `decide` makes; without offsets they are `probs` unchanged."""
    if offsets is None:
        return probs
    z = log_probs(probs) + np.asarray(offsets, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def decide(probs: np.ndarray, offsets: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """The predicted class: arg-max, optionally after adding per-class log offsets (a rule tuned for
    macro F1 by calibrate.py)."""
    if offsets is None:
        return np.asarray(probs).argmax(1)
    return (log_probs(probs) + np.asarray(offsets, dtype=np.float64)).argmax(1)


def age_group_probs_from_survival(survival, cuts: Sequence[int]):
    """[N, 3] P(age group) from survival S(t) = P(age >= t) over AGE_THRESHOLDS (numpy or torch)."""
    lo, hi = (AGE_THRESHOLDS.index(int(c)) if int(c) in AGE_THRESHOLDS else None for c in cuts)
    if lo is None or hi is None:
        raise ValueError(f"age cut points must lie in {AGE_THRESHOLDS[0]}..{AGE_THRESHOLDS[-1]}, got {list(cuts)}")
    s_lo, s_hi = survival[:, lo], survival[:, hi]
    parts = [1 - s_lo, s_lo - s_hi, s_hi]
    if isinstance(survival, np.ndarray):
        return np.clip(np.stack(parts, axis=1), 0.0, 1.0)
    import torch

    return torch.stack(parts, dim=1).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- the task object
@dataclass(frozen=True)
class Task:
    """The label scheme of one task; see the module doc."""

    name: str
    age_head: str = "bins"
    age_sigma: float = 0.0  # years; > 0 trains the age head on the age spread over neighbouring years

    def __post_init__(self) -> None:
        num_classes(self.name)
        if self.age_head not in AGE_HEADS:
            raise ValueError(f"unknown age head {self.age_head!r}; known: {', '.join(AGE_HEADS)}")
        if self.age_head != "bins" and self.name != "multi":
            raise ValueError(f"--age_head {self.age_head} needs --task multi (a separate age head)")
        if not (math.isfinite(self.age_sigma) and self.age_sigma >= 0):
            raise ValueError(f"--age_sigma must be a number of years >= 0, got {self.age_sigma}")
        if self.age_sigma > 0 and self.name != "multi":
            raise ValueError("--age_sigma needs --task multi (a separate age head)")

    # ---- shape
    @property
    def num_classes(self) -> int:
        """Classes of the combined prediction (18 for `multi`)."""
        return TASK_CLASSES[self.name]

    @property
    def multihead(self) -> bool:
        return self.name == "multi"

    @property
    def head_sizes(self) -> tuple[int, ...] | None:
        """Logits per head of a multi-head model, None for one softmax over `num_classes`."""
        if not self.multihead:
            return None
        return (3, 2, len(AGE_THRESHOLDS)) if self.age_head == "years" else HEAD_SIZES

    @property
    def age_in_years(self) -> bool:
        """Whether training targets carry the age in years (a years head, or a spread age label)."""
        return self.multihead and (self.age_head == "years" or self.age_sigma > 0)

    @property
    def report_task(self) -> str:
        """The task whose metrics describe this task's combined labels (multi -> all 18 classes)."""
        return "all" if self.multihead else self.name

    @property
    def predicts_18(self) -> bool:
        """Whether its predictions are the competition's 18 classes (soft votes may mix such tasks)."""
        return self.num_classes == NUM_CLASSES

    def class_names(self, age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> list[str]:
        return class_names(self.report_task, age_bins)

    def describe(self) -> str:
        spread = f", age labels spread by {self.age_sigma:g} years" if self.age_sigma > 0 else ""
        if self.age_head == "years":
            return f"{self.name} (18 classes, age from years {AGE_THRESHOLDS[0]}..{AGE_THRESHOLDS[-1]}{spread})"
        return f"{self.name} ({self.num_classes} classes{spread})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "age_head": self.age_head, "age_sigma": self.age_sigma}

    # ---- targets
    def target(self, mask: int, gender: int, age_years: int, age_bins: Sequence[int]) -> int | tuple[int, int, int]:
        """What the model is trained on: a class id, or (mask, gender, age group | age in years)."""
        if self.age_in_years:
            return (mask, gender, int(age_years))
        return task_target(mask, gender, age_label(age_years, age_bins), self.name)

    def label(self, mask: int, gender: int, age_years: int, age_bins: Sequence[int]) -> int:
        """The class id of the combined prediction (18 classes for multi) a sample should get."""
        return task_target(mask, gender, age_label(age_years, age_bins), self.report_task)

    def head_labels(self, targets: np.ndarray) -> list[np.ndarray]:
        """Per-head class labels of training targets, for class weights ([N] or [N, 3] targets); an age
        head trained on years takes no class weights."""
        targets = np.asarray(targets)
        if not self.multihead:
            return [targets]
        return [targets[:, 0], targets[:, 1]] if self.age_in_years else [targets[:, i] for i in range(3)]

    def head_classes(self) -> tuple[int, ...]:
        """Sizes of the softmax heads that class weights apply to (`head_labels` order)."""
        if not self.multihead:
            return (self.num_classes,)
        return HEAD_SIZES[:2] if self.age_in_years else HEAD_SIZES

    def batch_labels(self, targets: "torch.Tensor", age_bins: Sequence[int]) -> "torch.Tensor":
        """Class ids (combined prediction) of a batch of training targets."""
        if not self.multihead:
            return targets
        mask, gender, age = targets.unbind(1)
        if self.age_in_years:
            import torch

            age = torch.bucketize(age.contiguous(), torch.tensor(list(age_bins), device=age.device), right=True)
        return encode_class(mask, gender, age)

    # ---- outputs
    def probs(self, logits: "torch.Tensor", age_cuts: Sequence[int] = DEFAULT_AGE_BINS) -> "torch.Tensor":
        """Class probabilities [N, num_classes] from logits: a softmax, or for multi-head models the
        product p(m*6 + g*3 + a) = p_mask(m) p_gender(g) p_age(a); a `years` age head gives
        p_age from its survival curve at `age_cuts`."""
        import torch

        if not self.multihead:
            if logits.ndim != 2 or logits.shape[1] != self.num_classes:
                raise ValueError(f"{self.name} logits must be [N, {self.num_classes}], got {tuple(logits.shape)}")
            return logits.softmax(dim=1)
        sizes = self.head_sizes
        if logits.ndim != 2 or logits.shape[1] != sum(sizes):
            raise ValueError(f"multi-head logits must be [N, {sum(sizes)}], got {tuple(logits.shape)}")
        mask_logits, gender_logits, age_logits = torch.split(logits, sizes, dim=1)
        pm, pg = mask_logits.softmax(dim=1), gender_logits.softmax(dim=1)
        pa = (age_group_probs_from_survival(self.survival(age_logits), age_cuts) if self.age_head == "years"
              else age_logits.softmax(dim=1))
        # [N,3,1,1] * [N,1,2,1] * [N,1,1,3] -> [N,3,2,3]; row-major flattening gives index m*6 + g*3 + a.
        return (pm[:, :, None, None] * pg[:, None, :, None] * pa[:, None, None, :]).flatten(1)

    @staticmethod
    def survival(age_logits: "torch.Tensor") -> "torch.Tensor":
        """S(t) = P(age >= t), made non-increasing in t (independent sigmoids may cross)."""
        return age_logits.sigmoid().cummin(dim=1).values

    def age_survival(self, logits: "torch.Tensor") -> "torch.Tensor | None":
        """The survival curve of a `years` head from full logits, else None."""
        if self.age_head != "years":
            return None
        return self.survival(logits[:, -len(AGE_THRESHOLDS):])


def get_task(name: str, age_head: str = "bins", age_sigma: float = 0.0) -> Task:
    return Task(name, age_head, float(age_sigma))


def task_of(checkpoint: dict) -> Task:
    """The task a checkpoint was trained for (format mask-toolkit/1; age_sigma absent in older files)."""
    options = checkpoint.get("task_options") or {}
    return Task(checkpoint["task"], options.get("age_head", "bins"), float(options.get("age_sigma", 0.0)))


# --------------------------------------------------------------------------- labels
MASK_KINDS = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}


GENDERS = {"male": 0, "female": 1}


MAX_AGE = 130  # years: a folder name or an override above it is a typo, not a person
