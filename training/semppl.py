"""SemPPL: ReLIC plus a contrastive term towards semantic positives found through kNN pseudo-labels.

SemPPL (Bošnjak et al., ICLR 2023, "SemPPL: Predicting pseudo-labels for better contrastive
representations", arXiv 2301.05158) builds on ReLICv2. What is taken from the paper (its Figure 1
and Appendix C; the body could not be read offline): unlabelled data are tagged with pseudo-labels by
a k-NN over projected labelled data; semantic positives are queried from a queue and used in the
contrastive loss along the augmentation positives. Everything else here — the queue's contents,
the vote and its tie-break, the uniform draw, the form and normalisation of the term, every default
(``training.config.ObjectiveConfig.semppl_*``) — is this project's design.

The pieces, each a plain function of tensors (``training.loop.semppl_objective`` wires them up):

- :func:`knn_pseudo_labels`: a label for every gathered row: its own if labelled, else the majority
  vote of its k nearest rows of the labelled queue (cosine similarity, per large view, votes pooled);
- :func:`draw_semantic_positives`: for every gathered row, ``n_s`` rows of the extended contrast set
  that share its (pseudo-)label, drawn uniformly without replacement (-1 pads missing ones);
- :func:`semppl_loss`: ReLIC's terms over the extended contrast set plus the semantic term.

The extended contrast set, in row order: the gathered batch [N], the MoCo-style queue's filled rows
(``queue_size`` > 0), then the labelled queue's filled rows. The labelled queue holds the normalised
target projections of the labelled rows of earlier batches (per large view) and their labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from training.loss import PairSet, check_weight, relic_log_probs, relic_terms


class SemPPLTerms(NamedTuple):
    """Scalar tensors: ``total = contrastive + weight * semantic + alpha * invariance``."""

    total: torch.Tensor
    contrastive: torch.Tensor
    invariance: torch.Tensor
    semantic: torch.Tensor


def knn_pseudo_labels(
    rows: torch.Tensor, labels: torch.Tensor, queue: torch.Tensor, queue_labels: torch.Tensor, k: int
) -> torch.Tensor:
    """[N] int64 (pseudo-)labels of the N rows of ``rows`` [Vt, N, D].

    A labelled row (``labels`` [N] >= 0) keeps its label. An unlabelled one (-1) gets the majority
    vote of its neighbours: for each large view t, the ``min(k, Q)`` rows of ``queue[t]`` ([Vt, Q, D],
    the labelled queue's filled rows, labels ``queue_labels`` [Q] >= 0) of highest cosine similarity to
    ``rows[t]`` (equal similarities: the lower queue row first), each giving one vote to its label;
    the Vt * min(k, Q) votes are pooled over the views. The label with the most votes wins; a tie goes
    to the label whose votes have the highest summed similarity, then to the smallest label. With an
    empty queue (Q = 0) unlabelled rows stay -1. Rows are compared as they are: pass unit vectors (the
    contrast set's rows), so that the dot product is the cosine similarity.

    Cost: Vt [N, D] x [D, Q] matmuls and a stable sort of [N, Q] per view, then O(N (Vt k)^2) for the vote.
    """
    if rows.dim() != 3 or queue.dim() != 3 or queue.shape[0] != rows.shape[0]:
        raise ValueError(
            f"knn_pseudo_labels: rows [Vt, N, D] and queue [Vt, Q, D] must share Vt and D, got "
            f"{list(rows.shape)} and {list(queue.shape)}"
        )
    if labels.shape != rows.shape[1:2] or queue_labels.shape != queue.shape[1:2]:
        raise ValueError(
            f"knn_pseudo_labels: labels must be [N] and queue_labels [Q], got {list(labels.shape)} for "
            f"rows {list(rows.shape)} and {list(queue_labels.shape)} for queue {list(queue.shape)}"
        )
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"knn_pseudo_labels: k must be an integer >= 1, got {k!r}")
    labels = labels.long()
    unlabelled = labels < 0
    size = queue.shape[1]
    if size == 0 or not bool(unlabelled.any()):
        return labels.clone()
    take = min(k, size)
    sims = torch.bmm(rows[:, unlabelled], queue.transpose(1, 2))  # [Vt, U, Q]
    top, index = sims.sort(dim=-1, descending=True, stable=True)
    top, index = top[..., :take], index[..., :take]  # [Vt, U, take]
    votes = queue_labels.long()[index].permute(1, 0, 2).flatten(1)  # [U, Vt * take]
    weights = top.permute(1, 0, 2).flatten(1)  # [U, Vt * take]
    same = votes[:, :, None] == votes[:, None, :]  # [U, K, K]
    count = same.sum(-1)  # votes of each vote's label
    summed = (same * weights[:, None, :]).sum(-1)  # summed similarity of each vote's label
    # lexicographic best (count desc, summed desc, label asc) by stable sorts, last key first
    order = votes.sort(dim=1, stable=True).indices
    order = order.gather(1, summed.gather(1, order).sort(dim=1, descending=True, stable=True).indices)
    order = order.gather(1, count.gather(1, order).sort(dim=1, descending=True, stable=True).indices)
    out = labels.clone()
    out[unlabelled] = votes.gather(1, order[:, :1]).squeeze(1)
    return out


def draw_semantic_positives(
    pseudo_labels: torch.Tensor,
    queue_labels: torch.Tensor,
    count: int,
    *,
    queue_offset: int,
    generator: torch.Generator | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, count] int64 semantic positives of the N gathered rows, as rows of the extended contrast
    set; -1 marks a missing one (after the drawn ones).

    Anchor i's candidates: every other gathered row j != i with ``pseudo_labels[j] ==
    pseudo_labels[i]`` (row j of the contrast set), and every labelled-queue row q with
    ``queue_labels[q] == pseudo_labels[i]`` (row ``queue_offset + q``: the labelled queue follows the
    gathered batch and the MoCo queue's filled rows). An anchor with label -1 has none. ``count``
    candidates are drawn uniformly without replacement — all of them when there are fewer — as the
    ``count`` smallest of uniform keys [N, N + Q] (``keys``, or ``torch.rand`` from ``generator``),
    in that order. Drawing for every gathered row from one generator seeded identically on every
    rank makes the draw independent of the number of ranks: each rank takes its own anchors' rows.
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"draw_semantic_positives: count (n_s) must be an integer >= 1, got {count!r}")
    rows, size = pseudo_labels.shape[0], queue_labels.shape[0]
    if not isinstance(queue_offset, int) or queue_offset < rows:
        raise ValueError(
            f"draw_semantic_positives: queue_offset must be an integer >= N = {rows} (the labelled "
            f"queue follows the gathered batch), got {queue_offset!r}"
        )
    device = pseudo_labels.device
    if keys is None:
        if generator is not None:
            device = generator.device
        keys = torch.rand(rows, rows + size, device=device, generator=generator)
    elif keys.shape != (rows, rows + size):
        raise ValueError(f"draw_semantic_positives: keys must be [N, N + Q] = {[rows, rows + size]}")
    pseudo = pseudo_labels.long().to(keys.device)
    columns = torch.cat([pseudo, queue_labels.long().to(keys.device)])  # [N + Q] label of each column
    candidate = (columns[None, :] == pseudo[:, None]) & (pseudo[:, None] >= 0)
    candidate[:, :rows].fill_diagonal_(False)  # not its own semantic positive
    masked = torch.where(candidate, keys, torch.full_like(keys, 2.0))  # keys lie in [0, 1)
    take = min(count, rows + size)
    drawn = masked.topk(take, dim=1, largest=False, sorted=True)
    index = drawn.indices
    index = torch.where(index < rows, index, index - rows + queue_offset)
    index = torch.where(drawn.values < 2.0, index, torch.full_like(index, -1))
    if take < count:
        index = torch.cat([index, index.new_full((rows, count - take), -1)], dim=1)
    return index


def semppl_loss(
    online: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor] | torch.Tensor,
    *,
    positives: torch.Tensor,
    temperature: float,
    alpha: float,
    weight: float,
    offset: int = 0,
    kl_stop_grad: bool = True,
    target_normalized: bool = False,
    pairs: PairSet = "distinct",
    semantic_denominator: float | None = None,
) -> SemPPLTerms:
    r"""SemPPL loss: ``relic_loss``'s terms over the contrast set ``target`` plus the semantic term.

    ``online``, ``target``, ``temperature``, ``alpha``, ``offset``, ``kl_stop_grad``,
    ``target_normalized`` and ``pairs`` are ``relic_loss``'s (full softmax over all M rows: no
    negative subsampling). ``positives`` [B, n_s] int64 holds anchor i's semantic positives as rows of
    the contrast set, -1 for none (never the anchor's own row ``offset + i``). With
    ``p_(o,t)(j | i)`` ReLIC's softmax over the M rows and S_i anchor i's positives::

        semantic = 1/A  sum_{i : |S_i| >= 1}  mean_{s in S_i}  mean_{(o,t) in P}  -log p_(o,t)(s | i)
        total    = contrastive + weight * semantic + alpha * invariance

    A = ``semantic_denominator``, by default the number of anchors with at least one positive (a mean
    over those anchors; every such anchor weighs the same, whatever its number of positives).
    Across ranks pass A = (anchors with a positive over all ranks) / world: the ranks' mean is then
    the mean over the global batch, as the other terms' is. Without any positive, ``semantic`` is 0
    and the other terms are ``relic_loss``'s exactly (values and gradients).
    """
    check_weight("semppl_loss: weight", weight)
    check_weight("semppl_loss: alpha", alpha)
    log_p, positive = relic_log_probs(
        online,
        target,
        temperature=temperature,
        offset=offset,
        target_normalized=target_normalized,
        pairs=pairs,
    )
    _, batch, contrast = log_p.shape
    if positives.dtype != torch.long or positives.dim() != 2 or positives.shape[0] != batch:
        raise ValueError(
            f"semppl_loss: positives must be an int64 tensor [B, n_s] with B={batch}, "
            f"got {positives.dtype} {list(positives.shape)}"
        )
    positives = positives.to(log_p.device)
    if bool(((positives < -1) | (positives >= contrast)).any()):
        raise ValueError(f"semppl_loss: positives must hold rows in [0, M) = [0, {contrast}) or -1")
    if bool((positives == positive[:, None]).any()):
        raise ValueError("semppl_loss: positives must not hold an anchor's own row offset + i")
    terms = relic_terms(log_p, positive, alpha=alpha, kl_stop_grad=kl_stop_grad)
    valid = positives >= 0  # [B, n_s]
    per_anchor_count = valid.sum(1)
    has = per_anchor_count > 0
    if semantic_denominator is None:
        semantic_denominator = float(has.sum())
    if not bool(has.any()):
        return SemPPLTerms(*terms, log_p.new_zeros(()))
    if not (math.isfinite(semantic_denominator) and semantic_denominator > 0):
        raise ValueError(
            f"semppl_loss: semantic_denominator must be a finite number > 0 when an anchor has a "
            f"positive, got {semantic_denominator!r}"
        )
    anchor = torch.arange(batch, device=log_p.device)[:, None]
    nll = -log_p[:, anchor, positives.clamp(min=0)].mean(0)  # [B, n_s], mean over the pairs
    per_anchor = torch.where(valid, nll, torch.zeros_like(nll)).sum(1) / per_anchor_count.clamp(min=1)
    semantic = per_anchor[has].sum() / semantic_denominator
    return SemPPLTerms(terms.total + weight * semantic, terms.contrastive, terms.invariance, semantic)
