"""Training criteria: cross_entropy, focal, label_smoothing, f1 (SPEC §3), sized by the number of classes.

Public API (used by train.py):

- ``CRITERIA``: registry ``name -> builder(num_classes, weight, **options)`` filled by ``@register_criterion``.
- ``create_criterion(name, num_classes, task="all", class_weights=None, **options)``; for task "multi"
  a ``MultiHeadCriterion`` over the three heads (mask 3, gender 2, age 3), or with ``age_head="years"``
  an ``AgeYearsLoss`` on the age head (cumulative targets age >= t from the raw age); ``age_sigma > 0``
  spreads the age label over neighbouring years (``spread_age``) for either age head.
- ``class_weights_from_labels(labels, num_classes)``: inverse-frequency weights (``--class_weights auto``).
- ``compute_loss(criterion, output, target)``: handles Inception's ``(logits, aux_logits)``.
- ``mixed_loss(criterion, output, target_a, target_b, lam)``: mixup / cutmix.

Class weights are moved to the logits' device in forward, so criteria work on CPU and CUDA alike.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskcls.task import AGE_THRESHOLDS, DEFAULT_AGE_BINS, HEAD_SIZES, Task, get_task

INCEPTION_AUX_WEIGHT = 0.4

CRITERIA: dict[str, Callable[..., nn.Module]] = {}
# Options understood by some criterion. An option meant for another criterion is ignored (train.py may
# pass e.g. gamma and smoothing whatever the criterion); an option nobody knows is a TypeError (a typo).
KNOWN_OPTIONS = {"gamma", "smoothing", "eps", "head_weights", "age_head", "age_sigma", "age_bins"}


def register_criterion(name: str) -> Callable:
    """Decorator registering ``builder(num_classes, weight, **options) -> nn.Module``."""
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in CRITERIA:
            raise ValueError(f"criterion {name!r} registered twice")
        CRITERIA[name] = builder
        return builder
    return decorator


def _as_weight(weight: torch.Tensor | Sequence[float] | None, num_classes: int) -> torch.Tensor | None:
    if weight is None:
        return None
    weight = torch.as_tensor(weight, dtype=torch.float32).flatten()
    if weight.numel() != num_classes:
        raise ValueError(f"class weights have {weight.numel()} entries for {num_classes} classes")
    return weight


class _Weighted(nn.Module):
    def __init__(self, num_classes: int, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("weight", _as_weight(weight, num_classes))

    def _weight_on(self, logits: torch.Tensor) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.to(device=logits.device, dtype=logits.dtype)


class CrossEntropy(_Weighted):
    """Mean (class-weighted) cross-entropy, optionally with label smoothing ``smoothing``."""

    def __init__(self, num_classes: int, weight: torch.Tensor | None = None, smoothing: float = 0.0) -> None:
        super().__init__(num_classes, weight)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self._weight_on(logits), label_smoothing=self.smoothing)


class FocalLoss(_Weighted):
    """Focal loss ``-w_y (1 - p_y)^gamma log p_y``, averaged like weighted cross-entropy
    (divided by the sum of the samples' class weights), so ``gamma=0`` is exactly cross-entropy."""

    def __init__(self, num_classes: int, weight: torch.Tensor | None = None, gamma: float = 2.0) -> None:
        super().__init__(num_classes, weight)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_pt = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1.0 - log_pt.exp()) ** self.gamma) * log_pt
        weight = self._weight_on(logits)
        if weight is None:
            return loss.mean()
        w = weight[target]
        return (w * loss).sum() / w.sum()


class SoftF1Loss(_Weighted):
    """``1 - macro soft F1``: per class tp = sum p*y, fp = sum p*(1-y), fn = sum (1-p)*y over the batch
    with p = softmax(logits), F1_c = (2tp + eps) / (2tp + fp + fn + eps). The eps in the numerator makes a
    class absent from the batch and given no probability count as perfect (F1 = 1) rather than 0, so
    perfect logits give a loss near 0. Class weights turn the mean over classes into a weighted mean.
    The loss always lies in [0, 1].
    """

    def __init__(self, num_classes: int, weight: torch.Tensor | None = None, eps: float = 1e-7) -> None:
        super().__init__(num_classes, weight)
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"f1 loss built for {self.num_classes} classes got logits {tuple(logits.shape)}")
        p = logits.float().softmax(dim=1)
        y = F.one_hot(target, self.num_classes).to(p.dtype)
        tp = (p * y).sum(0)
        fp = (p * (1 - y)).sum(0)
        fn = ((1 - p) * y).sum(0)
        f1 = (2 * tp + self.eps) / (2 * tp + fp + fn + self.eps)
        weight = self._weight_on(f1)
        if weight is None:
            return 1.0 - f1.mean()
        return 1.0 - (weight * f1).sum() / weight.sum()


@register_criterion("cross_entropy")
def _cross_entropy(num_classes: int, weight: torch.Tensor | None = None, **_: object) -> nn.Module:
    return CrossEntropy(num_classes, weight)


@register_criterion("focal")
def _focal(num_classes: int, weight: torch.Tensor | None = None, gamma: float = 2.0, **_: object) -> nn.Module:
    return FocalLoss(num_classes, weight, gamma)


@register_criterion("label_smoothing")
def _label_smoothing(num_classes: int, weight: torch.Tensor | None = None, smoothing: float = 0.1,
                     **_: object) -> nn.Module:
    return CrossEntropy(num_classes, weight, smoothing)


@register_criterion("f1")
def _f1(num_classes: int, weight: torch.Tensor | None = None, eps: float = 1e-7, **_: object) -> nn.Module:
    return SoftF1Loss(num_classes, weight, eps)


def spread_age(age: torch.Tensor, edges: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """[N, E] P(true age >= edge) for ages in years: the folder's age a (a whole year of life) read as
    N(a + 0.5, sigma) years, a label distribution as in age estimation (DLDL); sigma 0 is the hard
    label age >= edge."""
    age = age.to(torch.float32)[:, None]
    edges = edges.to(device=age.device, dtype=torch.float32)[None, :]
    if sigma == 0:
        return (age >= edges).to(torch.float32)
    return torch.special.ndtr((age + 0.5 - edges) / sigma)


class AgeYearsLoss(nn.Module):
    """Ordinal age loss (extended binary classification, as in OR-CNN): one binary cross-entropy per
    threshold t of AGE_THRESHOLDS on the target "age >= t" (spread by ``sigma`` years), averaged; the
    targets are ages in years."""

    def __init__(self, thresholds: Sequence[int] = AGE_THRESHOLDS, sigma: float = 0.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.register_buffer("thresholds", torch.tensor(list(thresholds), dtype=torch.float32), persistent=False)

    def forward(self, logits: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        target = spread_age(age, self.thresholds, self.sigma).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target)


class SpreadAgeGroupLoss(nn.Module):
    """Cross-entropy of the 3-group age head against the age spread by ``sigma`` years and split at
    ``cuts`` (a person aged cut - 1 trains partly on the older group), with label smoothing
    ``smoothing``; the targets are ages in years."""

    def __init__(self, cuts: Sequence[int] = DEFAULT_AGE_BINS, sigma: float = 3.0, smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.sigma, self.smoothing = float(sigma), float(smoothing)
        self.register_buffer("cuts", torch.tensor(list(cuts), dtype=torch.float32), persistent=False)

    def target(self, age: torch.Tensor) -> torch.Tensor:
        """[N, 3] group probabilities: P(< cut 1), P(between), P(>= cut 2)."""
        above = spread_age(age, self.cuts, self.sigma)  # [N, 2] P(age >= cut)
        ones = torch.ones_like(above[:, :1])
        return torch.cat([ones, above], 1) - torch.cat([above, torch.zeros_like(ones)], 1)

    def forward(self, logits: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        # probability targets: cross_entropy mixes in smoothing / 3 per group as it does for class ids
        return F.cross_entropy(logits.float(), self.target(age), label_smoothing=self.smoothing)


class MultiHeadCriterion(nn.Module):
    """Weighted sum of per-head criteria on logits split as ``sizes`` ((3, 2, 3), or (3, 2, years))
    and [N, 3] targets (mask, gender, age group or age in years)."""

    def __init__(self, criteria: Sequence[nn.Module], head_weights: Sequence[float] = (1.0, 1.0, 1.0),
                 sizes: Sequence[int] = HEAD_SIZES) -> None:
        super().__init__()
        if len(criteria) != len(sizes) or len(head_weights) != len(sizes):
            raise ValueError(f"need {len(sizes)} criteria and head weights")
        self.criteria = nn.ModuleList(criteria)
        self.head_weights = tuple(float(w) for w in head_weights)
        self.sizes = tuple(sizes)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != sum(self.sizes) or target.ndim != 2 or target.shape[1] != 3:
            raise ValueError(f"multi-head loss needs logits [N, {sum(self.sizes)}] and targets [N, 3], "
                             f"got {tuple(logits.shape)} and {tuple(target.shape)}")
        parts = torch.split(logits, self.sizes, dim=1)
        return sum(w * c(part, target[:, i])
                   for i, (w, c, part) in enumerate(zip(self.head_weights, self.criteria, parts)))


def create_criterion(name: str, num_classes: int, task: str = "all",
                     class_weights: torch.Tensor | Sequence | None = None, **options) -> nn.Module:
    """Build criterion ``name`` for ``num_classes`` classes.

    task "multi": ``num_classes`` is ignored; three criteria of the same kind sized (3, 2, 3) are summed
    with ``head_weights`` (default (1, 1, 1)); ``class_weights`` is None or a tuple of three tensors
    (an entry may be None). With ``age_head="years"`` the age head's criterion is ``AgeYearsLoss``
    whatever ``name`` is, and with ``age_sigma > 0`` on the bins head ``SpreadAgeGroupLoss`` at
    ``age_bins`` (with label_smoothing's smoothing); class weights then apply to the mask and gender
    heads. Options: gamma (focal, 2.0), smoothing (label_smoothing, 0.1), eps (f1, 1e-7), head_weights,
    age_head, age_sigma (years, 0) and age_bins (multi).
    """
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; known: {', '.join(CRITERIA)}")
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise TypeError(f"unknown criterion options {sorted(unknown)}; known: {sorted(KNOWN_OPTIONS)}")
    head_weights = options.pop("head_weights", None)
    age_head = options.pop("age_head", "bins")
    age_sigma = float(options.pop("age_sigma", 0.0))
    age_bins = options.pop("age_bins", DEFAULT_AGE_BINS)
    builder = CRITERIA[name]
    if not get_task(task, age_head, age_sigma).multihead:
        return builder(num_classes, class_weights, **options)
    if class_weights is None:
        class_weights = (None,) * len(HEAD_SIZES)
    if isinstance(class_weights, torch.Tensor) or len(class_weights) not in (len(HEAD_SIZES), len(HEAD_SIZES) - 1):
        raise ValueError("class_weights for task 'multi' must be None or a tuple of three tensors (mask, gender, age)")
    class_weights = tuple(class_weights) + (None,) * (len(HEAD_SIZES) - len(class_weights))
    criteria = [builder(size, w, **options) for size, w in zip(HEAD_SIZES, class_weights)]
    sizes = HEAD_SIZES
    if age_head == "years":
        criteria[2], sizes = AgeYearsLoss(sigma=age_sigma), (*HEAD_SIZES[:2], len(AGE_THRESHOLDS))
    elif age_sigma > 0:  # the smoothing the criterion built for the age head (label_smoothing's), else none
        criteria[2] = SpreadAgeGroupLoss(age_bins, age_sigma, getattr(criteria[2], "smoothing", 0.0))
    return MultiHeadCriterion(criteria, head_weights if head_weights is not None else (1.0, 1.0, 1.0), sizes)


def class_weights_from_labels(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``w_c ∝ 1 / count_c``, normalised so that the classes present in
    ``labels`` average 1. Classes absent from ``labels`` get weight 0 (they cannot occur as targets)."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if labels.size == 0:
        raise ValueError("cannot compute class weights from no labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = 1.0 / counts[present]
    weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


def compute_loss(criterion: nn.Module, output: torch.Tensor | tuple, target: torch.Tensor) -> torch.Tensor:
    """Loss of a model output; Inception's training tuple gives loss(main) + 0.4 * loss(aux)."""
    if isinstance(output, (tuple, list)):
        main, aux = output
        return criterion(main, target) + INCEPTION_AUX_WEIGHT * criterion(aux, target)
    return criterion(output, target)


def mixed_loss(criterion: nn.Module, output: torch.Tensor | tuple, target_a: torch.Tensor,
               target_b: torch.Tensor, lam: float) -> torch.Tensor:
    """Mixup / cutmix loss: lam * loss(target_a) + (1 - lam) * loss(target_b)."""
    return lam * compute_loss(criterion, output, target_a) + (1.0 - lam) * compute_loss(criterion, output, target_b)


def criterion_for(task: Task, name: str, class_weights=None, age_bins: Sequence[int] = DEFAULT_AGE_BINS,
                  **options) -> nn.Module:
    """The training loss for `task`'s outputs and targets (`create_criterion` with the task's heads); `age_bins`
    are the cut points a spread age label is split at."""
    return create_criterion(name, task.num_classes, task=task.name, class_weights=class_weights,
                            age_head=task.age_head, age_sigma=task.age_sigma, age_bins=age_bins, **options)
