"""Training losses: each equals a direct computation with explicit loops over a handful of vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysearch.train.losses import contrastive, info_nce, koleo, multiview_info_nce, supcon, triplet_hardest


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _dot(a, b) -> float:
    return float(sum(x * y for x, y in zip(a.tolist(), b.tolist())))


def _dist(a, b) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a.tolist(), b.tolist())))


def test_info_nce_equals_nt_xent_written_out():
    z1, z2 = _unit(5, 4, 0), _unit(5, 4, 1)
    t = 0.3
    z = torch.cat([z1, z2])
    n = 5
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(math.exp(_dot(z[i], z[j]) / t) for j in range(2 * n) if j != i)
        total += -math.log(math.exp(_dot(z[i], z[positive]) / t) / denominator)
    expected = total / (2 * n)
    assert float(info_nce(z1, z2, t)) == pytest.approx(expected, rel=1e-9)


def test_info_nce_is_small_when_views_agree_and_large_when_they_do_not():
    z1 = _unit(6, 8, 2)
    assert float(info_nce(z1, z1, 0.05)) < 0.1
    assert float(info_nce(z1, _unit(6, 8, 3), 0.05)) > 1.0


def test_multiview_info_nce_with_a_mixed_view_uses_both_sources_as_positives():
    # Views: image 0 twice, image 1 twice, image 2 once, and one view that is 0.7 of image 0 and
    # 0.3 of image 1 (mixup).
    z = _unit(6, 5, 4)
    membership = torch.tensor(
        [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0.7, 0.3, 0]], dtype=torch.float64
    )
    t = 0.2
    total, anchors = 0.0, 0
    for i in range(6):
        weights = [_dot(membership[i], membership[j]) if j != i else 0.0 for j in range(6)]
        if sum(weights) == 0:
            continue  # image 2's only view has no positive
        denominator = sum(math.exp(_dot(z[i], z[j]) / t) for j in range(6) if j != i)
        ce = 0.0
        for j in range(6):
            if weights[j]:
                ce -= weights[j] / sum(weights) * math.log(math.exp(_dot(z[i], z[j]) / t) / denominator)
        total += ce
        anchors += 1
    assert anchors == 5
    assert float(multiview_info_nce(z, membership, t)) == pytest.approx(total / anchors, rel=1e-9)


def test_koleo_is_minus_mean_log_nearest_distance_and_honours_exclusions():
    z = _unit(5, 3, 5)
    nearest = [min(_dist(z[i], z[j]) for j in range(5) if j != i) for i in range(5)]
    expected = -sum(math.log(d) for d in nearest) / 5
    assert float(koleo(z, eps=0.0)) == pytest.approx(expected, rel=1e-9)
    # Rows 0 and 1 are views of one image: neither may be the other's nearest neighbour.
    exclude = torch.zeros(5, 5, dtype=torch.bool)
    exclude[0, 1] = exclude[1, 0] = True
    nearest_excl = [
        min(_dist(z[i], z[j]) for j in range(5) if j != i and not exclude[i, j]) for i in range(5)
    ]
    expected_excl = -sum(math.log(d) for d in nearest_excl) / 5
    assert float(koleo(z, exclude, eps=0.0)) == pytest.approx(expected_excl, rel=1e-9)


def test_koleo_gradient_spreads_close_vectors_apart():
    z = torch.tensor([[1.0, 0.0], [0.995, 0.0998], [0.0, 1.0]], requires_grad=True)
    koleo(z).backward()
    step = z - 0.01 * z.grad
    assert _dist(step[0], step[1]) > _dist(z[0].detach(), z[1].detach())


def test_contrastive_equals_the_pair_sum():
    z = _unit(6, 4, 6)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    m = 0.9
    values = []
    for i in range(6):
        for j in range(i + 1, 6):
            d = _dist(z[i], z[j])
            values.append(0.5 * d * d if labels[i] == labels[j] else 0.5 * max(0.0, m - d) ** 2)
    assert float(contrastive(z, labels, m)) == pytest.approx(sum(values) / len(values), rel=1e-6)


def test_triplet_hardest_equals_batch_hard_mining():
    z = _unit(7, 4, 7)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3])
    m = 0.3
    values = []
    for a in range(7):
        pos = [_dist(z[a], z[p]) for p in range(7) if p != a and labels[p] == labels[a]]
        neg = [_dist(z[a], z[n]) for n in range(7) if labels[n] != labels[a]]
        if pos and neg:
            values.append(max(0.0, m + max(pos) - min(neg)))
    assert len(values) == 5  # labels 2 and 3 have no positive
    assert float(triplet_hardest(z, labels, m)) == pytest.approx(sum(values) / len(values), rel=1e-6)


def test_supcon_equals_the_l_out_sum():
    z = _unit(6, 4, 8)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    t = 0.5
    values = []
    for i in range(6):
        positives = [p for p in range(6) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(_dot(z[i], z[a]) / t) for a in range(6) if a != i)
        values.append(-sum(math.log(math.exp(_dot(z[i], z[p]) / t) / denominator) for p in positives) / len(positives))
    assert float(supcon(z, labels, t)) == pytest.approx(sum(values) / len(values), rel=1e-9)


def test_losses_without_any_positive_are_zero_but_differentiable():
    z = _unit(4, 3, 9).requires_grad_(True)
    distinct = torch.arange(4)
    for loss in (supcon(z, distinct), triplet_hardest(z, distinct), multiview_info_nce(z, torch.eye(4, dtype=torch.float64))):
        assert float(loss.detach()) == 0.0
        loss.backward()
    np.testing.assert_array_equal(z.grad.numpy(), 0.0)


def test_bad_settings_are_value_errors():
    z = _unit(4, 3, 10)
    with pytest.raises(ValueError, match="temperature"):
        supcon(z, torch.arange(4), temperature=0.0)
    with pytest.raises(ValueError, match="margin"):
        contrastive(z, torch.arange(4), margin=-1.0)
    with pytest.raises(ValueError, match="labels"):
        triplet_hardest(z, torch.arange(3))
