"""Ranking losses over query groups.

Every loss takes the student's relevance logits ``[queries, candidates]`` and a boolean
``mask`` of the same shape (groups differ in size; padded slots are False).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = -1e4


def listwise_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) between the softmaxes over each query's candidates.

    ``temperature`` divides the teacher's scores only (cosine teachers span ~0.3, so they
    need a sharper softmax than the student's logits). Zero when the distributions agree.
    """
    t = torch.log_softmax(torch.where(mask, teacher / temperature, NEG_INF), dim=-1)
    s = torch.log_softmax(torch.where(mask, student, NEG_INF), dim=-1)
    kl = (t.exp() * (t - s)).masked_fill(~mask, 0.0).sum(-1)
    return kl.mean()


def pointwise_bce(student: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each candidate's logit against its 0/1 label."""
    loss = F.binary_cross_entropy_with_logits(student, labels, reduction="none")
    return loss[mask].mean()


def ranknet(student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
            margin: float | None = None) -> torch.Tensor:
    """Pairwise loss over every pair (i, j) of a query with ``target_i > target_j``.

    RankNet's ``log(1 + exp(-(s_i - s_j)))`` by default; with ``margin``, the hinge
    ``max(0, margin - (s_i - s_j))``. Zero when no pair is ordered.
    """
    diff = student.unsqueeze(-1) - student.unsqueeze(-2)  # [q, i, j] = s_i - s_j
    ordered = (target.unsqueeze(-1) > target.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
    if not ordered.any():
        return student.sum() * 0.0
    per_pair = F.softplus(-diff) if margin is None else F.relu(margin - diff)
    return per_pair[ordered].mean()
