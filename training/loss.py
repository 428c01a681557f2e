"""The ReLIC objective (DESIGN.md, "The objective")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

PairSet = Literal["distinct", "all"]
PAIR_SETS: tuple[str, ...] = ("distinct", "all")


class LossTerms(NamedTuple):
    """Scalar tensors: ``total = contrastive + alpha * invariance``."""

    total: torch.Tensor
    contrastive: torch.Tensor
    invariance: torch.Tensor


def check_weight(what: str, value: object) -> None:
    """Refuse a loss weight that is not a finite number >= 0, naming it (``what``)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")


def view_pairs(num_online: int, num_target: int, pairs: PairSet = "distinct") -> list[tuple[int, int]]:
    """The ordered view pairs P, t-major (the order ``relic_loss`` uses them).

    ``"distinct"``: P = {(o, t) : o != t, t < Vt} (ReLIC), ``Vt * (Vo - 1)`` pairs.
    ``"all"``: P = {(o, t) : o < Vo, t < Vt}, every online view against every target view including
    o = t (ReLICv2's Algorithm 1, Tomasev et al. 2022, arXiv 2201.05119), ``Vo * Vt = (L + S) * L`` pairs.
    """
    if pairs == "distinct":
        return [(o, t) for t in range(num_target) for o in range(num_online) if o != t]
    if pairs == "all":
        return [(o, t) for t in range(num_target) for o in range(num_online)]
    raise ValueError(f"pairs must be one of {', '.join(map(repr, PAIR_SETS))}, got {pairs!r}")


def draw_negatives(
    batch: int,
    contrast: int,
    negatives: int,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B, n_e] int64 rows of the contrast set: for anchor i, ``negatives`` rows drawn uniformly without
    replacement from the ``contrast - 1`` rows other than its positive ``offset + i``.

    Drawn on ``device`` from ``generator`` (default: torch's global generator of that device, which
    checkpoints save) as the ``negatives`` smallest of ``contrast - 1`` uniform keys per anchor; the
    positive is skipped by shifting the drawn positions at or after it by one. Cost O(B * M).
    """
    _check_negatives(negatives, contrast)
    if generator is not None:
        device = generator.device
    keys = torch.rand(batch, contrast - 1, device=device, generator=generator)
    drawn = keys.topk(negatives, dim=1, largest=False, sorted=True).indices  # [B, n_e] in [0, M - 1)
    positive = offset + torch.arange(batch, device=drawn.device)[:, None]
    return drawn + (drawn >= positive).long()


def _check_negatives(negatives: object, contrast: int) -> None:
    if isinstance(negatives, bool) or not isinstance(negatives, int) or not 1 <= negatives <= contrast - 1:
        raise ValueError(
            f"relic_loss: negatives (n_e) must be an integer in [1, M - 1] = [1, {contrast - 1}] "
            f"(an anchor has M - 1 = {contrast - 1} other rows in the contrast set of M={contrast} rows "
            f"to draw from without replacement), got negatives={negatives!r}"
        )


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


def _check_negative_index(
    index: torch.Tensor, negatives: int | None, batch: int, contrast: int, offset: int
) -> None:
    """Explicit draws (tests, references) are checked in full: shape, range, no positive, no repeats."""
    if index.dtype != torch.long or index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(
            f"relic_loss: negative_index must be an int64 tensor [B, n_e] with B={batch}, "
            f"got {index.dtype} {list(index.shape)}"
        )
    if negatives is not None and index.shape[1] != negatives:
        raise ValueError(
            f"relic_loss: negatives={negatives} but negative_index holds {index.shape[1]} per anchor"
        )
    _check_negatives(int(index.shape[1]), contrast)
    if bool(((index < 0) | (index >= contrast)).any()):
        raise ValueError(f"relic_loss: negative_index must hold rows in [0, M) = [0, {contrast})")
    positive = offset + torch.arange(batch, device=index.device)[:, None]
    if bool((index == positive).any()):
        raise ValueError("relic_loss: negative_index must not hold an anchor's positive row offset + i")
    ordered = index.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("relic_loss: negative_index must not repeat a row within an anchor's negatives")


def relic_loss(
    online: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    *,
    temperature: float,
    alpha: float,
    offset: int = 0,
    kl_stop_grad: bool = True,
    target_normalized: bool = False,
    pairs: PairSet = "distinct",
    negatives: int | None = None,
    negative_index: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LossTerms:
    r"""ReLIC loss of Vo online views [B, D] against Vt target views [M, D]; scalar terms, means over anchors.

    ReLIC (Mitrovic et al. 2021, arXiv 2010.07922) and ReLICv2 (Tomasev et al. 2022, arXiv 2201.05119).
    The online views are the Vt = L large views first, then S small ones (Vo = L + S); the target views
    are the L large ones. With cosine logits
    ``logits[o,t] = normalize(online[o]) @ normalize(target[t]).T / temperature`` ([B, M]), the
    instance-prediction distribution of anchor i under the augmentation pair (o, t) is
    ``p_(o,t)(j | i) = softmax_{j in C_i}(logits[o,t][i, j])`` over anchor i's candidate rows C_i
    (all M rows of the contrast set; see ``negatives``). For a pair set P::

        contrastive = 1/|P| sum_{(o,t) in P}  mean_i  -log p_(o,t)(offset + i | i)
        invariance  = mean_{A != B in P}  mean_i  KL( p_A(. | i) || sg[p_B(. | i)] )
        total       = contrastive + alpha * invariance

    (the invariance mean runs over the |P| (|P| - 1) ordered pairs of distinct elements of P). The
    pair sets (``pairs``):

    - ``"distinct"`` (ReLIC, the default): P = {(o, t) : o != t, t < Vt}, |P| = Vt (Vo - 1): no view
      predicts its own target.
    - ``"all"`` (ReLICv2's Algorithm 1): P = {(o, t) : o < Vo, t < Vt}, every online large view i
      against every target large view j *including* i = j, plus every small view against every target
      large view, |P| = (L + S) L; the contrastive term is the sum over P divided by (L + S) L, as in
      Algorithm 1. ReLICv2's per-pair loss carries its own KL; here the invariance term keeps the
      definition above over this larger P.

    ``sg`` is stop-gradient when ``kl_stop_grad`` (otherwise gradients flow through both arguments).
    The invariance term is the paper's sum of KL divergences over pairs of augmentation pairs, averaged
    instead of summed; it is 0 when |P| = 1. Anchor i's positive is row ``offset + i`` of every target
    view (``offset`` = this worker's first sample in the gathered contrast set; rows beyond the
    gathered batch, e.g. a queue, are negatives only). ``target`` may also be one [Vt, M, D] tensor;
    ``target_normalized=True`` says its rows are unit vectors already, so the (possibly large,
    queue-extended) contrast set is used as it is.

    Negative subsampling (ReLICv2's n_e): with ``negatives`` set, C_i = {offset + i} plus ``negatives``
    rows drawn uniformly without replacement from the M - 1 other rows (gathered batch and queue) —
    one draw per anchor, shared by every view pair and target view, so the KL terms compare
    distributions over one candidate set. The draw uses ``generator`` or torch's global generator of
    the target's device (:func:`draw_negatives`); ``negative_index`` ([B, n_e] int64 rows, checked)
    replaces the draw, e.g. to give a reference the same candidates. ``negatives`` must lie in
    [1, M - 1]; M - 1 is every other row, the full softmax in another column order.

    Cost: one batched matmul [Vt, |P|/Vt B, D] x [Vt, D, M] (with negatives, one einsum against the
    gathered [Vt, B, 1 + n_e, D] candidate rows); the invariance over all |P|(|P|-1) ordered pairs is
    computed from per-pair sums, with no loop over pairs:
    ``sum_{B != A} log q_B = (sum_B log q_B) - log q_A``.
    """
    check_weight("relic_loss: alpha", alpha)
    log_p, positive = relic_log_probs(
        online,
        target,
        temperature=temperature,
        offset=offset,
        target_normalized=target_normalized,
        pairs=pairs,
        negatives=negatives,
        negative_index=negative_index,
        generator=generator,
    )
    return relic_terms(log_p, positive, alpha=alpha, kl_stop_grad=kl_stop_grad)


def relic_log_probs(
    online: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    *,
    temperature: float,
    offset: int = 0,
    target_normalized: bool = False,
    pairs: PairSet = "distinct",
    negatives: int | None = None,
    negative_index: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``relic_loss``'s instance-prediction log-probabilities, checked arguments as ``relic_loss`` takes
    them: ``(log_p, positive)`` with ``log_p[k, i, c] = log p_(o,t)(c | i)`` [|P|, B, C] for the k-th
    pair of ``view_pairs(Vo, Vt, pairs)`` over anchor i's C candidate columns (C = M, the rows of the
    contrast set in their order, without ``negatives``; else the positive first, then the drawn
    negatives), and ``positive`` [B] the column of anchor i's positive.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"relic_loss: temperature must be a finite number > 0, got {temperature!r}")
    if pairs not in PAIR_SETS:
        raise ValueError(f"relic_loss: pairs must be one of {', '.join(map(repr, PAIR_SETS))}, got {pairs!r}")
    batch, dim = _check_views("online", online, "B")
    contrast, target_dim = _check_views("target", target, "M")
    num_online, num_target = len(online), len(target)
    min_online = 2 if pairs == "distinct" else 1
    if num_online < max(num_target, min_online):
        raise ValueError(
            f"relic_loss: need at least {min_online} online views and at least as many as target views "
            f"(Vo >= max(Vt, {min_online}) for pairs={pairs!r}), got Vo={num_online}, Vt={num_target}"
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
    if negative_index is not None:
        _check_negative_index(negative_index, negatives, batch, contrast, offset)
    elif negatives is not None:
        _check_negatives(negatives, contrast)

    # 1/temperature is folded into the [Vo, B, D] anchors rather than applied to the [P, B, M] logits.
    anchors = F.normalize(torch.stack(list(online)), dim=-1) / temperature  # [Vo, B, D]
    pair_list = view_pairs(num_online, num_target, pairs)  # t-major: Vt blocks of per_target anchor views
    num_pairs = len(pair_list)
    per_target = num_pairs // num_target
    if pairs == "distinct":
        anchors = anchors[[o for o, _ in pair_list]].view(num_target, per_target, batch, dim)
    else:  # every target view sees every online view: a broadcast view of the [Vo, B, D] anchors
        anchors = anchors.unsqueeze(0).expand(num_target, num_online, batch, dim)
    targets = target if isinstance(target, torch.Tensor) else torch.stack(list(target))  # [Vt, M, D]
    if not target_normalized:
        targets = F.normalize(targets, dim=-1)

    anchor = torch.arange(batch, device=anchors.device)
    if negatives is None and negative_index is None:
        # [Vt, per_target B, D] x [Vt, D, M]; reshape copies only for pairs="all" (the broadcast)
        flat = anchors.reshape(num_target, per_target * batch, dim)
        logits = torch.bmm(flat, targets.transpose(1, 2))  # [Vt, per_target B, M]
        positive = anchor + offset
        candidates = contrast
    else:
        if negative_index is None:
            negative_index = draw_negatives(
                batch, contrast, negatives, offset=offset, device=targets.device, generator=generator
            )
        negative_index = negative_index.to(targets.device)
        rows = torch.cat([(anchor + offset)[:, None], negative_index], dim=1)  # [B, 1 + n_e], positive first
        chosen = targets[:, rows]  # [Vt, B, 1 + n_e, D]
        logits = torch.einsum("tabd,tbkd->tabk", anchors, chosen)  # [Vt, per_target, B, 1 + n_e]
        positive = torch.zeros_like(anchor)
        candidates = rows.shape[1]
    log_p = torch.log_softmax(logits.reshape(num_pairs, batch, candidates), dim=-1)
    return log_p, positive


def relic_terms(
    log_p: torch.Tensor, positive: torch.Tensor, *, alpha: float, kl_stop_grad: bool = True
) -> LossTerms:
    """``relic_loss``'s terms from ``relic_log_probs``'s output (see ``relic_loss`` for the formulas)."""
    num_pairs, batch, _ = log_p.shape
    anchor = torch.arange(batch, device=log_p.device)
    contrastive = -log_p[:, anchor, positive].mean()

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
