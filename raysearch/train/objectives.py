"""The objectives of `raysearch train --objective`: which loss a batch of view embeddings gets.

copy         SSCD: InfoNCE over the views (mixed views positive to both sources) + KoLeo
contrastive  pairs with a margin; positives: views of one image, and images sharing a label
triplet      batch-hard triplets; positives as for contrastive
supcon       supervised contrastive over the views; positives: views of images sharing a label
"""

from __future__ import annotations

import torch

from raysearch.train import losses
from raysearch.train.config import TrainConfig

TERMS: dict[str, tuple[str, ...]] = {
    "copy": ("info_nce", "koleo"),
    "contrastive": ("contrastive",),
    "triplet": ("triplet",),
    "supcon": ("supcon",),
}


def objective_loss(config: TrainConfig, z: torch.Tensor, membership: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one batch and its terms (unweighted).

    z : (N, d) float32 unit rows, one per view; membership : (N, K) float32, how much of each of
    the K images of the batch a view shows (one-hot unless mixed); labels : (N,) int64, the
    view's label (its image's index in the listing when the objective has no labels).
    """
    objective = config.objective
    if objective == "copy":
        info = losses.multiview_info_nce(z, membership, config.effective_temperature)  # type: ignore[arg-type]
        weight = config.effective_koleo_weight
        if weight:
            # Views that share a source image are not each other's "nearest other vector": the
            # regulariser spreads different images, the InfoNCE term pulls views together.
            share = (membership @ membership.T) > 0
            kol = losses.koleo(z, exclude=share)
        else:
            kol = z.new_zeros(())
        return info + weight * kol, {"info_nce": info, "koleo": kol}
    if objective == "contrastive":
        loss = losses.contrastive(z, labels, config.effective_margin)  # type: ignore[arg-type]
        return loss, {"contrastive": loss}
    if objective == "triplet":
        loss = losses.triplet_hardest(z, labels, config.effective_margin)  # type: ignore[arg-type]
        return loss, {"triplet": loss}
    if objective == "supcon":
        loss = losses.supcon(z, labels, config.effective_temperature)  # type: ignore[arg-type]
        return loss, {"supcon": loss}
    raise ValueError(f"unknown objective {objective!r}")
