"""Losses for descriptor learning, on batches of embeddings z (N, d) float32 (L2-normalised unless
said otherwise). Every function returns a scalar tensor that autograd can differentiate.

- `info_nce` / `multiview_info_nce`: in-batch contrastive cross-entropy (SimCLR's NT-Xent, SSCD's
  InfoNCE); the multi-view form takes soft targets so that a mixup/cutmix image is a positive of
  both of its sources;
- `koleo`: the differential-entropy regulariser of Sablayrolles et al. (2019), used by SSCD to spread
  the descriptors apart;
- `contrastive`: pairs with a margin (Hadsell, Chopra and LeCun 2006);
- `triplet_hardest`: triplets with in-batch hardest positive and negative (Hermans et al. 2017);
- `supcon`: supervised contrastive, the L_out form (Khosla et al. 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _off_diagonal_log_softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, N) log-probabilities log p(j | i) over j != i of the similarities z_i.z_j / temperature;
    the diagonal is set to 0 (callers weight it by 0)."""
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T) / temperature
    logp = torch.log_softmax(logits.masked_fill(eye, float("-inf")), dim=1)
    return logp.masked_fill(eye, 0.0)


def multiview_info_nce(z: torch.Tensor, membership: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE over a batch of views with soft positives.

    Parameters
    ----------
    z : (N, d) float tensor, unit rows: N views of K source images.
    membership : (N, K) float tensor >= 0: how much of each source image a view shows (one-hot for
        an ordinary view; lambda and 1 - lambda for a mixup/cutmix of two images).
    temperature : softmax temperature (> 0).

    Returns
    -------
    Scalar: the mean over views i that have a positive of the cross-entropy between the softmax of
    z_i.z_j / temperature over j != i and the target t_ij = m_i.m_j / sum_{k != i} m_i.m_k. With
    one-hot memberships and two views per image this is SimCLR's NT-Xent loss.
    """
    if z.ndim != 2 or membership.ndim != 2 or membership.shape[0] != z.shape[0]:
        raise ValueError(f"z (N, d) and membership (N, K) must have the same N, got {tuple(z.shape)} and {tuple(membership.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    membership = membership.to(z.dtype)
    weights = (membership @ membership.T).masked_fill(eye, 0.0)
    total = weights.sum(dim=1)
    anchors = total > 0
    if not bool(anchors.any()):
        return z.sum() * 0.0  # no view has a positive: nothing to learn, but keep the graph
    targets = weights[anchors] / total[anchors, None]
    logp = _off_diagonal_log_softmax(z, temperature)[anchors]
    return -(targets * logp).sum(dim=1).mean()


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Two-view InfoNCE with in-batch negatives, both directions.

    z1, z2 : (n, d) unit rows; z1[i] and z2[i] are views of image i. Each of the 2n views is
    classified against the 2n - 1 others (its other view is the positive; every view of another
    image, from either side, is a negative), and the 2n cross-entropies are averaged.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    instance = torch.arange(n, device=z1.device).repeat(2)
    membership = F.one_hot(instance, n).to(z1.dtype)
    return multiview_info_nce(torch.cat([z1, z2]), membership, temperature)


def koleo(z: torch.Tensor, exclude: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko differential-entropy regulariser: -mean_i log(min_{j != i} ||z_i - z_j||).

    z : (N, d) float tensor.
    exclude : optional (N, N) bool tensor; True pairs are not candidates for the nearest neighbour
        (views of the same image: pushing them apart would fight the contrastive term). Rows left
        with no candidate are skipped.
    eps : added inside the distance so that duplicate vectors give a finite loss.
    """
    n = z.shape[0]
    with torch.no_grad():
        # The nearest neighbour is chosen without gradient; the loss then acts on that distance.
        dist = torch.cdist(z.detach().float(), z.detach().float())
        blocked = torch.eye(n, dtype=torch.bool, device=z.device)
        if exclude is not None:
            if exclude.shape != (n, n):
                raise ValueError(f"exclude must be ({n}, {n}), got {tuple(exclude.shape)}")
            blocked = blocked | exclude.to(torch.bool)
        dist = dist.masked_fill(blocked, float("inf"))
        nearest_dist, nearest = dist.min(dim=1)
        valid = torch.isfinite(nearest_dist)
    if not bool(valid.any()):
        return z.sum() * 0.0
    d = F.pairwise_distance(z[valid], z[nearest[valid]], eps=eps)
    return -torch.log(d + eps).mean()


def _squared_distances(z: torch.Tensor) -> torch.Tensor:
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b, clamped: rounding can make it slightly negative.
    sq = (z * z).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)


def contrastive(z: torch.Tensor, labels: torch.Tensor, margin: float = 0.7) -> torch.Tensor:
    """Hadsell et al.'s pair loss over every unordered pair i < j of the batch.

    z : (N, d) float tensor; labels : (N,) int tensor (same label = matching pair).
    Returns the mean over pairs of 0.5 * d^2 for a matching pair and 0.5 * max(0, margin - d)^2
    otherwise, where d = ||z_i - z_j||.
    """
    if labels.shape != (z.shape[0],):
        raise ValueError(f"labels must be ({z.shape[0]},), got {tuple(labels.shape)}")
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    n = z.shape[0]
    if n < 2:
        return z.sum() * 0.0
    d2 = _squared_distances(z)
    # sqrt of a clamped value: the gradient of sqrt at 0 is infinite.
    d = d2.clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    pair_loss = torch.where(same, 0.5 * d2, 0.5 * F.relu(margin - d) ** 2)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=z.device), diagonal=1)
    return pair_loss[upper].mean()


def triplet_hardest(z: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Batch-hard triplet loss: for each anchor, its farthest positive and nearest negative.

    z : (N, d) float tensor; labels : (N,) int tensor.
    Returns the mean over anchors that have both a positive and a negative of
    max(0, margin + max_p d(a, p) - min_n d(a, n)), with Euclidean d.
    """
    if labels.shape != (z.shape[0],):
        raise ValueError(f"labels must be ({z.shape[0]},), got {tuple(labels.shape)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    n = z.shape[0]
    d = _squared_distances(z).clamp_min(1e-12).sqrt()
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    same = labels[:, None] == labels[None, :]
    positive = same & ~eye
    negative = ~same
    anchors = positive.any(dim=1) & negative.any(dim=1)
    if not bool(anchors.any()):
        return z.sum() * 0.0
    hardest_positive = d.masked_fill(~positive, float("-inf")).amax(dim=1)
    hardest_negative = d.masked_fill(~negative, float("inf")).amin(dim=1)
    return F.relu(margin + hardest_positive - hardest_negative)[anchors].mean()


def supcon(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out).

    z : (N, d) unit rows; labels : (N,) int tensor.
    Returns the mean over anchors i with at least one positive P(i) = {p != i : y_p = y_i} of
    -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t)).
    """
    if labels.shape != (z.shape[0],):
        raise ValueError(f"labels must be ({z.shape[0]},), got {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    n_positive = positive.sum(dim=1)
    anchors = n_positive > 0
    if not bool(anchors.any()):
        return z.sum() * 0.0
    logp = _off_diagonal_log_softmax(z, temperature)
    per_anchor = -(logp * positive).sum(dim=1)[anchors] / n_positive[anchors]
    return per_anchor.mean()
