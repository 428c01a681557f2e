"""The ReLIC objective (DESIGN.md, "The objective")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossTerms(NamedTuple):
    """Scalar tensors: ``total = contrastive + alpha * invariance``."""

    total: torch.Tensor
    contrastive: torch.Tensor
    invariance: torch.Tensor


def view_pairs(num_online: int, num_target: int) -> list[tuple[int, int]]:
    """The ordered view pairs P = {(o, t) : o != t, t < Vt}, in the order ``relic_loss`` uses them."""
    return [(o, t) for t in range(num_target) for o in range(num_online) if o != t]


def _check_views(name: str, views: Sequence[torch.Tensor], rows: str) -> tuple[int, int]:
    if len(views) == 0:
        raise ValueError(f"relic_loss: {name} must hold at least one view tensor, got none")
    shape = tuple(views[0].shape)
    if len(shape) != 2:
        raise ValueError(f"relic_loss: {name}[0] must have shape [{rows}, D], got {list(shape)}")
    for v, x in enumerate(views):
        if tuple(x.shape) != shape:
            raise ValueError(
                f"relic_loss: every {name} view must have the shape of {name}[0] {list(shape)}, "
                f"got {list(x.shape)} for {name}[{v}]"
            )
    return shape


def relic_loss(
    online: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    *,
    temperature: float,
    alpha: float,
    offset: int = 0,
    kl_stop_grad: bool = True,
    target_normalized: bool = False,
) -> LossTerms:
    r"""ReLIC loss of Vo online views [B, D] against Vt target views [M, D]; scalar terms, means over anchors.

    ReLIC (Mitrovic et al. 2021, arXiv 2010.07922) and ReLICv2 (Tomasev et al. 2022, arXiv 2201.05119).
    With cosine logits ``logits[o,t] = normalize(online[o]) @ normalize(target[t]).T / temperature``
    ([B, M]), the instance-prediction distribution of anchor i under the augmentation pair (o, t) is
    ``p_(o,t)(j | i) = softmax_j(logits[o,t][i])`` and, with P = {(o, t) : o != t, t < Vt}::

        contrastive = mean_{(o,t) in P}  mean_i  -log p_(o,t)(offset + i | i)
        invariance  = mean_{A != B in P} mean_i  KL( p_A(. | i) || sg[p_B(. | i)] )
        total       = contrastive + alpha * invariance

    ``sg`` is stop-gradient when ``kl_stop_grad`` (otherwise gradients flow through both arguments).
    ``target`` may also be one [Vt, M, D] tensor; ``target_normalized=True`` says its rows are unit
    vectors already, so the (possibly large, queue-extended) contrast set is used as it is.
    The invariance term is the paper's sum of KL divergences over pairs of augmentation pairs,
    averaged instead of summed; it is 0 when |P| = 1. Anchor i's positive is row ``offset + i`` of
    every target view (``offset`` = this worker's first sample in the gathered contrast set; rows
    beyond the gathered batch, e.g. a queue, are negatives only).

    Cost: one batched matmul [Vt, (Vo-1)B, D] x [Vt, D, M]; the invariance over all |P|(|P|-1)
    ordered pairs is computed from per-pair sums, with no loop over pairs:
    ``sum_{B != A} log q_B = (sum_B log q_B) - log q_A``.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"relic_loss: temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"relic_loss: alpha must be a finite number >= 0, got {alpha!r}")
    batch, dim = _check_views("online", online, "B")
    contrast, target_dim = _check_views("target", target, "M")
    num_online, num_target = len(online), len(target)
    if num_online < max(num_target, 2):
        raise ValueError(
            f"relic_loss: need at least 2 online views and at least as many as target views "
            f"(Vo >= max(Vt, 2)), got Vo={num_online}, Vt={num_target}"
        )
    if target_dim != dim:
        raise ValueError(
            f"relic_loss: online and target must share D, got online D={dim}, target D={target_dim}"
        )
    if not (isinstance(offset, int) and 0 <= offset <= contrast - batch):
        raise ValueError(
            f"relic_loss: offset must be an integer in [0, M - B] = [0, {contrast - batch}] "
            f"(M={contrast} target rows, B={batch} anchors), got {offset!r}"
        )

    # 1/temperature is folded into the [Vo, B, D] anchors rather than applied to the [P, B, M] logits.
    anchors = F.normalize(torch.stack(list(online)), dim=-1) / temperature  # [Vo, B, D]
    pairs = view_pairs(num_online, num_target)  # t-major: Vt blocks of Vo - 1 anchor views
    anchors = anchors[[o for o, _ in pairs]].view(num_target, (num_online - 1) * batch, dim)
    targets = target if isinstance(target, torch.Tensor) else torch.stack(list(target))  # [Vt, M, D]
    if not target_normalized:
        targets = F.normalize(targets, dim=-1)
    logits = torch.bmm(anchors, targets.transpose(1, 2))  # [Vt, (Vo-1) B, M]
    num_pairs = len(pairs)
    log_p = torch.log_softmax(logits.view(num_pairs, batch, contrast), dim=-1)

    anchor = torch.arange(batch, device=log_p.device)
    contrastive = -log_p[:, anchor, anchor + offset].mean()

    if num_pairs < 2:
        invariance = log_p.new_zeros(())
    else:
        # KL(p_A || q_B) = sum_j p_A log p_A - sum_j p_A log q_B, with q = sg[p] under stop-gradient.
        p = log_p.exp()
        log_q = log_p.detach() if kl_stop_grad else log_p
        neg_entropy = torch.einsum("pbm,pbm->pb", p, log_p)  # sum_j p_A log p_A
        cross_self = torch.einsum("pbm,pbm->pb", p, log_q)  # sum_j p_A log q_A
        cross_all = torch.einsum("pbm,bm->pb", p, log_q.sum(0))  # sum_j p_A sum_B log q_B
        cross_others = cross_all - cross_self  # sum_{B != A} sum_j p_A log q_B
        invariance = neg_entropy.mean() - cross_others.mean() / (num_pairs - 1)

    return LossTerms(contrastive + alpha * invariance, contrastive, invariance)
