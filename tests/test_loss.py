"""Loss tests against hand computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loss import (CRITERIA, MultiHeadCriterion, SpreadAgeGroupLoss, class_weights_from_labels, compute_loss,
                  create_criterion, mixed_loss, spread_age)
from maskcls.task import AGE_THRESHOLDS


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(12, 6), torch.tensor([0, 1, 2, 3, 4, 5, 0, 0, 1, 3, 5, 5])


def test_registry_names():
    assert set(CRITERIA) == {"cross_entropy", "focal", "label_smoothing", "f1"}
    with pytest.raises(ValueError, match="cross_entropy.*focal"):
        create_criterion("dice", 18)


def test_cross_entropy_by_hand(batch):
    logits, target = batch
    by_hand = -(logits.log_softmax(1)[torch.arange(12), target]).mean()
    assert torch.allclose(create_criterion("cross_entropy", 6)(logits, target), by_hand)


def test_focal_gamma_zero_is_cross_entropy_and_gamma_two_by_hand(batch):
    logits, target = batch
    ce = F.cross_entropy(logits, target)
    assert torch.allclose(create_criterion("focal", 6, gamma=0.0)(logits, target), ce)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    assert torch.allclose(create_criterion("focal", 6, class_weights=w, gamma=0.0)(logits, target),
                          F.cross_entropy(logits, target, weight=w))
    p = logits.softmax(1)[torch.arange(12), target]
    by_hand = (-(1 - p) ** 2 * p.log()).mean()
    focal = create_criterion("focal", 6)  # default gamma 2
    assert focal.gamma == 2.0
    assert torch.allclose(focal(logits, target), by_hand)
    assert focal(logits, target) < ce  # down-weights easy examples


@pytest.mark.parametrize("s", [0.1, 0.25])
def test_label_smoothing_matches_torch(batch, s):
    logits, target = batch
    options = {} if s == 0.1 else {"smoothing": s}
    crit = create_criterion("label_smoothing", 6, **options)
    assert torch.allclose(crit(logits, target), F.cross_entropy(logits, target, label_smoothing=s))
    assert not torch.allclose(crit(logits, target), F.cross_entropy(logits, target))  # default is not 0
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    weighted = create_criterion("label_smoothing", 6, class_weights=w, **options)
    assert torch.allclose(weighted(logits, target), F.cross_entropy(logits, target, weight=w, label_smoothing=s))
    with pytest.raises(ValueError):
        create_criterion("label_smoothing", 6, smoothing=1.0)


@pytest.mark.parametrize("num_classes", [3, 6, 18])
def test_soft_f1_perfect_random_and_bounds(num_classes):
    torch.manual_seed(num_classes)
    target = torch.arange(2 * num_classes) % num_classes
    crit = create_criterion("f1", num_classes)
    perfect = F.one_hot(target, num_classes).float() * 40 - 20
    assert crit(perfect, target) < 1e-3
    # absent classes given no probability count as perfect, so a partial batch can still reach ~0
    assert crit(perfect[:2], target[:2]) < 1e-3
    wrong = F.one_hot((target + 1) % num_classes, num_classes).float() * 40 - 20
    assert crit(wrong, target) > 0.99
    for _ in range(5):
        value = crit(torch.randn(2 * num_classes, num_classes) * 5, target)
        assert 0.0 <= value <= 1.0
    logits = torch.randn(2 * num_classes, num_classes, requires_grad=True)
    crit(logits, target).backward()
    assert logits.grad.abs().sum() > 0


def test_soft_f1_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0]])
    target = torch.tensor([0, 1, 2, 0])
    p = logits.softmax(1)
    f1s = []
    for c in range(3):
        tp = sum(p[i, c] for i in range(4) if target[i] == c)
        fp = sum(p[i, c] for i in range(4) if target[i] != c)
        fn = sum(1 - p[i, c] for i in range(4) if target[i] == c)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert torch.allclose(create_criterion("f1", 3)(logits, target), 1 - torch.stack(f1s).mean(), atol=1e-6)
    w = torch.tensor([2.0, 1.0, 1.0])
    weighted = 1 - (w * torch.stack(f1s)).sum() / w.sum()
    assert torch.allclose(create_criterion("f1", 3, class_weights=w)(logits, target), weighted, atol=1e-6)
    with pytest.raises(ValueError):
        create_criterion("f1", 18)(logits, target)  # sized by num_classes


@pytest.mark.parametrize("name", ["cross_entropy", "focal", "label_smoothing"])
def test_class_weights_change_the_loss_as_expected(batch, name):
    logits, target = batch
    plain = create_criterion(name, 6)(logits, target)
    ones = create_criterion(name, 6, class_weights=torch.ones(6))(logits, target)
    assert torch.allclose(plain, ones)
    # up-weighting the worst-predicted class raises the loss, up-weighting the best one lowers it
    per_sample = F.cross_entropy(logits, target, reduction="none")
    worst, best = target[per_sample.argmax()], target[per_sample.argmin()]
    up_worst, up_best = torch.ones(6), torch.ones(6)
    up_worst[worst] = 10.0
    up_best[best] = 10.0
    assert create_criterion(name, 6, class_weights=up_worst)(logits, target) > plain
    assert create_criterion(name, 6, class_weights=up_best)(logits, target) < plain
    if name == "cross_entropy":
        w = up_worst
        by_hand = (w[target] * per_sample).sum() / w[target].sum()
        assert torch.allclose(create_criterion(name, 6, class_weights=w)(logits, target), by_hand)
    with pytest.raises(ValueError):
        create_criterion(name, 6, class_weights=torch.ones(5))


def test_class_weights_from_labels():
    w = class_weights_from_labels([0, 0, 0, 1], 3)
    assert torch.allclose(w, torch.tensor([0.5, 1.5, 0.0]))  # 1/3 : 1, present classes average 1, absent 0
    w = class_weights_from_labels(np.array([0, 1, 1, 2, 2, 2, 2, 2]), 3)
    assert torch.allclose(w.mean(), torch.tensor(1.0)) and w[0] > w[1] > w[2]
    assert torch.allclose(w[0] / w[2], torch.tensor(5.0))
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    with pytest.raises(ValueError):
        class_weights_from_labels([0, 3], 3)
    with pytest.raises(ValueError):
        class_weights_from_labels([], 3)


@pytest.mark.parametrize("name", ["cross_entropy", "focal", "label_smoothing", "f1"])
def test_multi_sums_the_three_heads(name):
    torch.manual_seed(1)
    logits = torch.randn(10, 8)
    target = torch.stack([torch.randint(0, 3, (10,)), torch.randint(0, 2, (10,)), torch.randint(0, 3, (10,))], 1)
    crit = create_criterion(name, 18, task="multi", head_weights=(1.0, 2.0, 0.5))
    assert isinstance(crit, MultiHeadCriterion)
    parts = [create_criterion(name, n)(chunk, target[:, i])
             for i, (n, chunk) in enumerate(zip((3, 2, 3), logits.split((3, 2, 3), 1)))]
    assert torch.allclose(crit(logits, target), parts[0] + 2.0 * parts[1] + 0.5 * parts[2])
    default = create_criterion(name, 18, task="multi")
    assert torch.allclose(default(logits, target), sum(parts))
    weights = (torch.tensor([1.0, 2.0, 3.0]), None, torch.tensor([0.5, 1.0, 4.0]))
    weighted = create_criterion(name, 18, task="multi", class_weights=weights)
    expected = (create_criterion(name, 3, class_weights=weights[0])(logits[:, :3], target[:, 0]) + parts[1]
                + create_criterion(name, 3, class_weights=weights[2])(logits[:, 5:], target[:, 2]))
    assert torch.allclose(weighted(logits, target), expected)
    with pytest.raises(ValueError):
        crit(torch.randn(10, 18), target[:, 0])
    with pytest.raises(ValueError):
        create_criterion(name, 18, task="multi", class_weights=torch.ones(18))


def test_options_meant_for_other_criteria_are_ignored_and_typos_rejected(batch):
    logits, target = batch
    crit = create_criterion("cross_entropy", 6, gamma=2.0, smoothing=0.3, head_weights=(1, 1, 1))
    assert torch.allclose(crit(logits, target), F.cross_entropy(logits, target))
    with pytest.raises(TypeError, match="gama"):
        create_criterion("focal", 6, gama=1.0)


def test_compute_loss_handles_inception_aux_and_mixed_loss(batch):
    logits, target = batch
    aux = logits.flip(0)
    crit = create_criterion("cross_entropy", 6)
    assert torch.allclose(compute_loss(crit, logits, target), F.cross_entropy(logits, target))
    assert torch.allclose(compute_loss(crit, (logits, aux), target),
                          F.cross_entropy(logits, target) + 0.4 * F.cross_entropy(aux, target))
    other = target.flip(0)
    lam = 0.3
    expected = lam * F.cross_entropy(logits, target) + (1 - lam) * F.cross_entropy(logits, other)
    assert torch.allclose(mixed_loss(crit, logits, target, other, lam), expected)
    assert torch.allclose(mixed_loss(crit, logits, target, other, 1.0), F.cross_entropy(logits, target))
    mixed_aux = mixed_loss(crit, (logits, aux), target, other, lam)
    assert math.isclose(float(mixed_aux), float(lam * compute_loss(crit, (logits, aux), target)
                                                + (1 - lam) * compute_loss(crit, (logits, aux), other)),
                        rel_tol=1e-6)


def test_weights_follow_the_module_and_the_logits_dtype(batch):
    logits, target = batch
    crit = create_criterion("focal", 6, class_weights=torch.arange(1.0, 7.0))
    assert "weight" in dict(crit.named_buffers())  # moved by criterion.to(device)
    value = crit(logits.double(), target)
    assert value.dtype == torch.float64


def test_spread_age_groups_split_a_gaussian_over_the_cut_points():
    crit = SpreadAgeGroupLoss((30, 60), sigma=3.0)
    q = crit.target(torch.tensor([18, 29, 30, 45, 58, 60, 75]))
    assert torch.allclose(q.sum(1), torch.ones(7)) and (q >= 0).all()
    # age 29 is read as N(29.5, 3): P(< 30) = Phi(0.5 / 3); 29 and 30 mirror each other about the cut
    expected = float(torch.special.ndtr(torch.tensor(0.5 / 3)))
    assert q[1, 0].item() == pytest.approx(expected) and q[2, 1].item() == pytest.approx(expected)
    assert q[0, 0] > 0.999 and q[3, 1] > 0.999 and q[6, 2] > 0.999  # far from a cut: the hard label
    assert q[4, 2] > 0.2 and q[5, 2] > 0.5  # 58 leans to 30-59, 60 to >= 60
    logits, age = torch.randn(7, 3), torch.tensor([18, 29, 30, 45, 58, 60, 75])
    hard = SpreadAgeGroupLoss((30, 60), sigma=1e-6, smoothing=0.1)(logits, age)  # sigma -> 0: label smoothing
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert torch.allclose(hard, F.cross_entropy(logits, groups, label_smoothing=0.1), atol=1e-6)
    assert torch.allclose(SpreadAgeGroupLoss((30, 58), 1e-6)(logits, age), F.cross_entropy(logits, torch.tensor([0, 0, 1, 1, 2, 2, 2])))


def test_spread_years_targets_and_the_multi_head_criterion():
    edges = torch.tensor([40.0, 41.0])
    assert spread_age(torch.tensor([40]), edges).tolist() == [[1.0, 0.0]]  # hard: age >= edge
    assert spread_age(torch.tensor([40]), torch.tensor([40.5]), sigma=2.0).item() == pytest.approx(0.5)
    logits = torch.randn(4, 3 + 2 + len(AGE_THRESHOLDS))
    target = torch.tensor([[0, 1, 25], [1, 0, 59], [2, 1, 60], [0, 0, 70]])
    years = create_criterion("label_smoothing", 18, task="multi", age_head="years", age_sigma=2.0)
    ages = logits[:, 5:]
    soft = spread_age(target[:, 2], torch.tensor(AGE_THRESHOLDS, dtype=torch.float32), 2.0)
    assert 0 < soft[1, AGE_THRESHOLDS.index(60)] < 0.5 < soft[2, AGE_THRESHOLDS.index(60)] < 1
    expected_age = F.binary_cross_entropy_with_logits(ages, soft)
    mask_gender = (F.cross_entropy(logits[:, :3], target[:, 0], label_smoothing=0.1)
                   + F.cross_entropy(logits[:, 3:5], target[:, 1], label_smoothing=0.1))
    assert torch.allclose(years(logits, target), mask_gender + expected_age, atol=1e-6)
    bins = create_criterion("label_smoothing", 18, task="multi", age_sigma=3.0, age_bins=(30, 58), smoothing=0.2)
    spread = bins.criteria[2]
    assert isinstance(spread, SpreadAgeGroupLoss) and spread.cuts.tolist() == [30, 58] and spread.smoothing == 0.2
    assert create_criterion("cross_entropy", 18, task="multi", age_sigma=3.0).criteria[2].smoothing == 0.0
    with pytest.raises(ValueError, match="needs --task multi"):
        create_criterion("cross_entropy", 18, task="all", age_sigma=3.0)
