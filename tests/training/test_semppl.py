"""SemPPL (training.semppl and its wiring in training.loop) against naive loops: kNN pseudo-labels,
semantic-positive draws, the loss; ReLIC exactly when there are no labels; the objective's contrast
set, seeding and rank slices; exact resume; config and batch checks."""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from training import distributed, loop
from training.config import ModelConfig, ObjectiveConfig, OptimConfig, ScheduleConfig
from training.loop import TrainState, build_train_state, enqueue_labelled, semppl_objective, train_step
from training.loss import relic_loss, view_pairs
from training.model import ReLICModel
from training.semppl import draw_semantic_positives, knn_pseudo_labels, semppl_loss

# --- naive references ------------------------------------------------------------------------------


def naive_cosine(a, b):
    return float((a * b).sum() / (torch.sqrt((a * a).sum()) * torch.sqrt((b * b).sum())))


def naive_pseudo_labels(rows, labels, queue, queue_labels, k):
    """Per unlabelled row: per view, every queue row's cosine similarity, sorted (similarity
    descending, then row), the first k vote; the label with most votes, then highest summed
    similarity, then the smallest label."""
    out = []
    for i, label in enumerate(labels.tolist()):
        if label >= 0 or queue.shape[1] == 0:
            out.append(label)
            continue
        votes = []
        for t in range(rows.shape[0]):
            sims = [(naive_cosine(rows[t, i], queue[t, q]), q) for q in range(queue.shape[1])]
            sims.sort(key=lambda s: (-s[0], s[1]))
            votes += [(int(queue_labels[q]), sim) for sim, q in sims[:k]]
        tally: dict[int, list[float]] = {}
        for lab, sim in votes:
            tally.setdefault(lab, []).append(sim)
        best = sorted(tally, key=lambda lab: (-len(tally[lab]), -sum(tally[lab]), lab))[0]
        out.append(best)
    return torch.tensor(out, dtype=torch.long)


def naive_positives(pseudo, queue_labels, count, queue_offset, keys):
    """Per anchor: its candidate rows (same label, not itself, batch then queue), ordered by their key,
    the first ``count``; -1 pads."""
    rows = len(pseudo)
    out = []
    for i in range(rows):
        candidates = []
        if pseudo[i] >= 0:
            candidates += [(float(keys[i, j]), j) for j in range(rows) if j != i and pseudo[j] == pseudo[i]]
            candidates += [
                (float(keys[i, rows + q]), queue_offset + q)
                for q in range(len(queue_labels))
                if queue_labels[q] == pseudo[i]
            ]
        chosen = [row for _, row in sorted(candidates)[:count]]
        out.append(chosen + [-1] * (count - len(chosen)))
    return torch.tensor(out, dtype=torch.long).reshape(rows, count)


def naive_semppl(online, target, positives, *, temperature, alpha, weight, offset, pairs, kl_stop_grad):
    """Explicit loops over pairs, anchors and rows: ReLIC's contrastive and invariance terms, then the
    semantic term as the mean over anchors with a positive of the mean over positives and pairs."""
    num_large, num_views = len(target), len(online)
    pair_set = view_pairs(num_views, num_large, pairs)
    batch, rows = online[0].shape[0], target[0].shape[0]

    def log_probs(pair, i):
        o, t = pair
        logits = torch.stack(
            [
                (online[o][i] * target[t][r]).sum()
                / (online[o][i].norm() * target[t][r].norm())
                / temperature
                for r in range(rows)
            ]
        )
        return logits - torch.logsumexp(logits, 0)

    log_p = {(pair, i): log_probs(pair, i) for pair in pair_set for i in range(batch)}
    contrastive = sum(-log_p[pair, i][offset + i] for pair in pair_set for i in range(batch))
    contrastive = contrastive / (len(pair_set) * batch)
    kl, count = 0.0, 0
    for a in pair_set:
        for b in pair_set:
            if a != b:
                for i in range(batch):
                    log_b = log_p[b, i].detach() if kl_stop_grad else log_p[b, i]
                    kl = kl + (log_p[a, i].exp() * (log_p[a, i] - log_b)).sum()
                    count += 1
    invariance = kl / count if count else torch.zeros((), dtype=torch.float64)
    per_anchor = []
    for i in range(batch):
        mine = [int(s) for s in positives[i] if s >= 0]
        if mine:
            terms = [-log_p[pair, i][s] for s in mine for pair in pair_set]
            per_anchor.append(sum(terms) / len(terms))
    semantic = sum(per_anchor) / len(per_anchor) if per_anchor else torch.zeros((), dtype=torch.float64)
    return contrastive + weight * semantic + alpha * invariance, contrastive, invariance, semantic


def unit_rows(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def gradients(loss, inputs):
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


# --- pseudo-labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_pseudo_labels_match_a_naive_loop(views, k):
    rows, queue = unit_rows(views, 12, 6, seed=k), unit_rows(views, 9, 6, seed=100 + views)
    labels = torch.tensor([-1, 3, -1, -1, 0, -1, -1, 2, -1, -1, -1, 1])
    queue_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 3])
    got = knn_pseudo_labels(rows, labels, queue, queue_labels, k)
    want = naive_pseudo_labels(rows, labels, queue, queue_labels, k)
    assert torch.equal(got, want)
    assert got.dtype == torch.long and bool((got >= 0).all())
    assert torch.equal(got[labels >= 0], labels[labels >= 0])  # labelled rows keep their label
    # k beyond the queue: every row votes
    assert torch.equal(
        knn_pseudo_labels(rows, labels, queue[:, :2], queue_labels[:2], k),
        naive_pseudo_labels(rows, labels, queue[:, :2], queue_labels[:2], k),
    )


def exact(*coordinates):
    """A unit vector with dyadic coordinates: its dot products are exact in any summation order."""
    return torch.tensor(coordinates, dtype=torch.float64)


E0, E1, E2, E3 = (exact(*[1.0 if j == i else 0.0 for j in range(4)]) for i in range(4))
HALF = exact(0.5, 0.5, 0.5, 0.5)  # cosine 0.5 with every E


MINUS_E0 = exact(-1.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("per_view", "queue_labels", "k", "expected", "why"),
    [
        ([(E0, [E0, E0])], [5, 2], 1, 5, "equal similarity at the k-th place: the lower queue row first"),
        ([(E0, [E1, E0, E0])], [9, 5, 2], 2, 2, "one vote each, equal summed similarity: the smallest label"),
        ([(E0, [HALF, E0])], [1, 4], 2, 4, "one vote each: the higher summed similarity"),
        ([(E0, [E0, HALF, HALF])], [1, 4, 4], 3, 4, "two farther votes beat one closer vote"),
        ([(E0, [MINUS_E0, E1])], [1, 2], 1, 2, "similarity 0 beats -1"),
        ([(E0, [E0, E1]), (E1, [E0, E1])], [7, 3], 1, 3, "one vote per view, equal sums: the smallest label"),
        ([(E0, [E0, E1]), (E1, [E0, HALF])], [7, 3], 1, 7, "one vote per view: the closer one"),
        (
            [(E0, [E0, HALF]), (E0, [E1, HALF]), (E2, [E1, HALF])],
            [7, 3],
            1,
            3,
            "votes pooled over three views: two beat one",
        ),
        ([(E0, [E0, HALF, E1]), (E1, [E0, HALF, E1])], [7, 3, 8], 2, 3, "pooled: 3 has a vote in each view"),
    ],
)
def test_pseudo_label_ties(per_view, queue_labels, k, expected, why):
    """Exact dyadic unit vectors: equal similarities are equal in any summation order."""
    rows = torch.stack([anchor for anchor, _ in per_view])[:, None]  # [Vt, 1, D]
    queue = torch.stack([torch.stack(rows_t) for _, rows_t in per_view])  # [Vt, Q, D]
    labels, queue_labels = torch.tensor([-1]), torch.tensor(queue_labels)
    got = knn_pseudo_labels(rows, labels, queue, queue_labels, k)
    assert got.tolist() == [expected], why
    assert torch.equal(got, naive_pseudo_labels(rows, labels, queue, queue_labels, k))


def test_pseudo_labels_without_a_queue_stay_unlabelled_and_bad_shapes_are_refused():
    rows = unit_rows(2, 4, 3, seed=0)
    labels = torch.tensor([-1, 2, -1, 0])
    empty = rows.new_zeros(2, 0, 3)
    assert torch.equal(knn_pseudo_labels(rows, labels, empty, torch.zeros(0, dtype=torch.long), 1), labels)
    with pytest.raises(ValueError, match=r"must share Vt and D"):
        knn_pseudo_labels(rows, labels, rows.new_zeros(1, 2, 3), torch.zeros(2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 0"):
        knn_pseudo_labels(rows, labels, rows, labels.abs(), 0)


# --- semantic positives ----------------------------------------------------------------------------

PSEUDO = torch.tensor([0, 1, -1, 0, 2, 1, 0, 3, -1, 0])  # 10 gathered rows
QUEUE_LABELS = torch.tensor([1, 0, 1, 4, 0])  # label 2: nothing in the queue; 3: alone; 4: queue only
QUEUE_OFFSET = 13  # the labelled queue after 10 gathered rows and 3 MoCo queue rows


@pytest.mark.parametrize("count", [1, 2, 3, 6, 20])
def test_semantic_positives_match_a_naive_loop(count):
    keys = torch.rand(10, 15, generator=torch.Generator().manual_seed(count))
    got = draw_semantic_positives(PSEUDO, QUEUE_LABELS, count, queue_offset=QUEUE_OFFSET, keys=keys)
    want = naive_positives(PSEUDO.tolist(), QUEUE_LABELS.tolist(), count, QUEUE_OFFSET, keys)
    assert torch.equal(got, want)
    # by hand: candidates of each anchor (same label, not itself, batch rows then queue rows 13..17)
    candidates = {
        0: {3, 6, 9, 14, 17},
        1: {5, 13, 15},
        2: set(),
        4: set(),  # label 2: nobody else
        7: set(),  # label 3: alone
        8: set(),
    }
    for anchor, expected in candidates.items():
        row = [r for r in got[anchor].tolist() if r >= 0]
        assert len(row) == len(set(row)) == min(count, len(expected)), anchor  # no repeats, all when few
        assert set(row) <= expected, anchor
        assert got[anchor].tolist()[len(row) :] == [-1] * (count - len(row))


def test_semantic_positive_draw_is_uniform_and_generator_seeded():
    generator = torch.Generator().manual_seed(0)
    first = draw_semantic_positives(PSEUDO, QUEUE_LABELS, 2, queue_offset=13, generator=generator)
    keys = torch.rand(10, 15, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, draw_semantic_positives(PSEUDO, QUEUE_LABELS, 2, queue_offset=13, keys=keys))
    # anchor 0 draws 2 of its 5 candidates: each 2/5 of the time
    counts: dict[int, int] = {}
    for _ in range(2000):
        drawn = draw_semantic_positives(PSEUDO, QUEUE_LABELS, 2, queue_offset=13, generator=generator)
        for r in drawn[0].tolist():
            counts[r] = counts.get(r, 0) + 1
    assert set(counts) == {3, 6, 9, 14, 17}
    expected = 2000 * 2 / 5
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 18.5, counts  # 4 degrees of freedom, p ~ 1e-3


# --- the loss --------------------------------------------------------------------------------------

BATCH, OFFSET = 3, 3  # rank 1 of 2: 6 gathered rows, 2 MoCo queue rows, 3 filled labelled-queue rows


def loss_case(large, small, seed):
    """Online views [B, D] and a contrast set [Vt, 11, D] (float64, with gradient); this rank's positives
    from labels with labelled and unlabelled anchors, pseudo-labels and a partly filled labelled queue."""
    g = torch.Generator().manual_seed(seed)
    online = [
        torch.randn(BATCH, 5, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(large + small)
    ]
    target = [torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(large)]
    pseudo = torch.tensor([0, 1, 2, 0, -1, 2])  # rank 1's anchors: label 0, unlabelled, label 2
    queue_labels = torch.tensor([1, 2, 1])  # three of four slots filled
    keys = torch.rand(6, 9, generator=g)
    positives = draw_semantic_positives(pseudo, queue_labels, 2, queue_offset=8, keys=keys)[OFFSET:]
    return online, target, positives


@pytest.mark.parametrize("stop_grad", [True, False])
@pytest.mark.parametrize("pairs", ["distinct", "all"])
@pytest.mark.parametrize(("large", "small"), [(2, 0), (2, 2), (4, 0), (4, 2)])
def test_loss_matches_a_naive_loop_in_value_and_gradients(large, small, pairs, stop_grad):
    online, target, positives = loss_case(large, small, seed=10 * large + small)
    # anchor 0 (label 0): row 0 only; anchor 1 (unlabelled): none; anchor 2 (label 2): rows 2 and 9
    assert [sorted(r) for r in positives.tolist()] == [[-1, 0], [-1, -1], [2, 9]]
    kwargs = dict(temperature=0.3, alpha=0.7, offset=OFFSET, pairs=pairs, kl_stop_grad=stop_grad)
    ours = semppl_loss(online, target, positives=positives, weight=0.4, **kwargs)
    ref = naive_semppl(online, target, positives, weight=0.4, **kwargs)
    inputs = online + target
    for term, (got, want) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"term {term}")
        for g_got, g_want in zip(gradients(got, inputs), gradients(want, inputs)):
            torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-11, msg=f"term {term}")
    assert ours.semantic > 0
    # the ReLIC terms are relic_loss's over the same contrast set
    relic = relic_loss(online, target, **kwargs)
    for got, want in zip(ours[1:3], relic[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the denominator: the anchors with a positive (2 here), or as given (ranks: global count / world)
    scaled = semppl_loss(online, target, positives=positives, weight=0.4, semantic_denominator=4.0, **kwargs)
    torch.testing.assert_close(scaled.semantic, ours.semantic * 2 / 4, rtol=1e-12, atol=0)


@pytest.mark.parametrize("pairs", ["distinct", "all"])
def test_without_positives_the_loss_is_relic_exactly(pairs):
    online, target, _ = loss_case(4, 2, seed=1)
    kwargs = dict(temperature=0.2, alpha=0.5, offset=OFFSET, pairs=pairs)
    none = torch.full((BATCH, 3), -1, dtype=torch.long)
    ours = semppl_loss(online, target, positives=none, weight=0.5, **kwargs)
    relic = relic_loss(online, target, **kwargs)
    assert ours.semantic.item() == 0.0
    for got, want in zip(ours[:3], relic):
        assert torch.equal(got, want)
    inputs = online + target
    for got, want in zip(gradients(ours.total, inputs), gradients(relic.total, inputs)):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("positives", "message"),
    [
        (torch.tensor([[0], [1], [2]]), r"must not hold an anchor's own row offset \+ i"),  # offset 0
        (torch.tensor([[11], [0], [0]]), r"rows in \[0, M\) = \[0, 11\) or -1"),
        (torch.tensor([[-2], [1], [0]]), r"rows in \[0, M\) = \[0, 11\) or -1"),
        (torch.zeros(2, 1, dtype=torch.long), r"\[B, n_s\] with B=3"),
        (torch.zeros(3, 1), r"int64 tensor"),
    ],
)
def test_bad_positives_are_refused(positives, message):
    online, target, _ = loss_case(2, 0, seed=0)
    with pytest.raises(ValueError, match=message):
        semppl_loss(online, target, positives=positives, temperature=0.1, alpha=1.0, weight=0.2)


# --- through the loop -----------------------------------------------------------------------------


@dataclass
class Batch:
    views: list[torch.Tensor]
    labels: torch.Tensor
    num_large: int = 2


class NoLabels:
    def __init__(self, views):
        self.views, self.num_large = views, 2


def state_for(objective: ObjectiveConfig, batch=4, seed=0, steps=4) -> TrainState:
    """No BatchNorm: the fake-rank tests split a batch and must not change its statistics."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    projector = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
    return build_train_state(
        ModelConfig(arch="resnet18"),
        objective,
        OptimConfig(name="lars", base_lr=2.0),
        ScheduleConfig(epochs=1, warmup_epochs=0),
        steps_per_epoch=steps,
        global_batch=batch,
        model=ReLICModel(encoder, projector),
    )


def batches(count, labels, seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(count):
        views = [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(2)]
        views.append(torch.randn(batch, 3, 4, 4, generator=g))
        out.append(Batch(views, torch.as_tensor(labels[step % len(labels)], dtype=torch.long)))
    return out


SEMPPL = dict(name="semppl", semppl_queue_size=5, semppl_knn_k=2, semppl_positives=2, semppl_weight=0.5)


@pytest.mark.parametrize("target", ["ema", "online"])
@pytest.mark.parametrize("queue_size", [0, 6])
def test_without_labels_semppl_trains_exactly_like_relic(target, queue_size):
    common = dict(target=target, queue_size=queue_size, base_momentum=0.9)
    relic = state_for(ObjectiveConfig(**common))
    semppl = state_for(ObjectiveConfig(**common, **SEMPPL))
    for batch in batches(3, [[-1] * 4]):
        torch.manual_seed(5)  # the global generator is not drawn from by either objective
        want = train_step(relic, batch)
        torch.manual_seed(5)
        got = train_step(semppl, batch)
        assert got == want and got["semantic"] == 0.0
        assert semppl.pseudo_labels.tolist() == [-1] * 4 and relic.pseudo_labels is None
        for (name, p), q in zip(semppl.online.named_parameters(), relic.online.parameters()):
            assert torch.equal(p, q), name
            assert torch.equal(p.grad, q.grad), name
    assert semppl.semppl_len == 0 and bool((semppl.semppl_labels == -1).all())
    if queue_size:
        assert torch.equal(semppl.queue, relic.queue)


def test_semppl_step_fills_the_labelled_queue_and_pseudo_labels():
    state = state_for(ObjectiveConfig(**SEMPPL))
    data = batches(3, [[0, -1, 1, -1], [-1, -1, 2, -1], [0, 0, -1, -1]])
    metrics = train_step(state, data[0])
    assert metrics["semantic"] == 0.0  # labels 0 and 1 once each, nothing queued yet: no positives
    assert state.pseudo_labels.tolist() == [0, -1, 1, -1]  # empty queue: unlabelled stay -1
    assert (state.semppl_len, state.semppl_ptr, state.semppl_labels.tolist()) == (2, 2, [0, 1, -1, -1, -1])
    metrics = train_step(state, data[1])
    pseudo = state.pseudo_labels.tolist()
    assert pseudo[2] == 2 and all(p in (0, 1) for p in pseudo[:2] + pseudo[3:])
    assert metrics["semantic"] > 0
    assert metrics["total"] == pytest.approx(
        metrics["contrastive"] + 0.5 * metrics["semantic"] + metrics["invariance"], rel=1e-6
    )
    train_step(state, data[2])
    assert (state.semppl_len, state.semppl_ptr) == (5, 0)
    assert state.semppl_labels.tolist() == [0, 1, 2, 0, 0]  # FIFO, labelled rows in gathered order
    torch.testing.assert_close(state.semppl_queue.norm(dim=-1), torch.ones(2, 5))


def test_enqueue_labelled_is_a_fifo_of_labelled_rows_only():
    state = state_for(ObjectiveConfig(**{**SEMPPL, "semppl_queue_size": 4}))
    rows = torch.arange(6.0)[None, :, None].expand(2, 6, 3)
    enqueue_labelled(state, rows, torch.tensor([-1, 5, -1, 6, 7, -1]))
    assert (state.semppl_len, state.semppl_ptr, state.semppl_labels.tolist()) == (3, 3, [5, 6, 7, -1])
    assert state.semppl_queue[1, :3, 0].tolist() == [1.0, 3.0, 4.0]
    enqueue_labelled(state, rows, torch.tensor([8, 9, -1, -1, -1, -1]))
    assert (state.semppl_len, state.semppl_ptr, state.semppl_labels.tolist()) == (4, 1, [9, 6, 7, 8])
    enqueue_labelled(state, rows, torch.tensor([0, 1, 2, 3, 4, 5]))  # more than fit: the last 4
    assert (state.semppl_len, state.semppl_ptr, state.semppl_labels.tolist()) == (4, 1, [5, 2, 3, 4])
    assert state.semppl_queue[0, :, 0].tolist() == [5.0, 2.0, 3.0, 4.0]


def test_semppl_objective_contrast_order_seed_and_rank_slice(monkeypatch):
    """Rank 1 of 2 (faked collectives), MoCo queue and labelled queue partly filled: the contrast set is
    [gathered | MoCo queue rows | labelled queue rows], pseudo-labels come from the labelled queue,
    and the positives are rank 1's rows of a draw seeded by (seed, step) alone."""
    state = state_for(ObjectiveConfig(queue_size=4, alpha=0.5, **SEMPPL))
    state.queue = F.normalize(torch.randn(2, 4, 16), dim=-1)
    state.queue_len = 3
    state.semppl_queue = F.normalize(torch.randn(2, 5, 16), dim=-1)
    state.semppl_labels = torch.tensor([0, 1, 0, -1, -1])
    state.semppl_len = 3
    other_target, other_labels = torch.randn(BATCH, 2, 16), torch.tensor([1, -1, 0])
    labels = torch.tensor([0, -1, -1])
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(
        distributed,
        "gather",
        lambda local: torch.cat([other_target if local.dim() == 3 else other_labels, local.detach()]),
    )
    online = [torch.randn(BATCH, 16, requires_grad=True) for _ in range(3)]
    target = [torch.randn(BATCH, 16) for _ in range(2)]
    state.seed, state.step = 7, 2
    terms, gathered, gathered_labels = semppl_objective(state, online, target, labels)

    batch_rows = F.normalize(torch.cat([other_target, torch.stack(target, dim=1)]).transpose(0, 1), dim=-1)
    contrast = torch.cat([batch_rows, state.queue[:, :3], state.semppl_queue[:, :3]], dim=1)
    assert torch.equal(gathered, batch_rows) and gathered_labels.tolist() == [1, -1, 0, 0, -1, -1]
    pseudo = knn_pseudo_labels(
        batch_rows, gathered_labels, state.semppl_queue[:, :3], torch.tensor([0, 1, 0]), 2
    )
    assert torch.equal(state.pseudo_labels, pseudo[3:]) and bool((pseudo >= 0).all())
    generator = torch.Generator().manual_seed(((7 * 1_000_003 + 2) * 1_000_003 + 1_000_002) % (1 << 63))
    positives = draw_semantic_positives(
        pseudo, torch.tensor([0, 1, 0]), 2, queue_offset=9, generator=generator
    )
    with_positive = int((positives >= 0).any(1).sum())
    reference = semppl_loss(
        online,
        contrast,
        positives=positives[3:],
        temperature=0.1,
        alpha=0.5,
        weight=0.5,
        offset=3,
        target_normalized=True,
        semantic_denominator=with_positive / 2,
    )
    assert reference.semantic > 0
    for got, want in zip(terms, reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(gradients(terms.total, online), gradients(reference.total, online)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_the_selection_does_not_depend_on_the_number_of_ranks(monkeypatch):
    """One process with the whole batch vs two fake ranks with a half each: each rank's positives are
    its slice of the single process's draw, its pseudo-labels too, and the mean over the ranks of every
    term is the single process's."""
    recorded: list[torch.Tensor] = []
    real = loop.semppl_loss
    monkeypatch.setattr(
        loop, "semppl_loss", lambda *a, **kw: recorded.append(kw["positives"].clone()) or real(*a, **kw)
    )
    base = state_for(ObjectiveConfig(**SEMPPL), batch=6)
    base.semppl_queue = F.normalize(torch.randn(2, 5, 16), dim=-1)
    base.semppl_labels, base.semppl_len, base.step = torch.tensor([0, 1, 2, 0, 1]), 5, 1
    data = batches(1, [[0, -1, 2, 9, -1, 8]], batch=6)[0]  # 9, 8: alone
    with torch.no_grad():
        online = base.model(data.views)
        target = base.target(data.views[:2])
    single = semppl_objective(copy.deepcopy(base), online, target, data.labels)[0]
    whole = recorded.pop()

    halves = [torch.stack(target, dim=1)[:3], torch.stack(target, dim=1)[3:]]
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    totals = []
    for rank in (0, 1):
        state = copy.deepcopy(base)
        rows = slice(3 * rank, 3 * rank + 3)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(
            distributed,
            "gather",
            lambda local: torch.cat(halves) if local.dim() == 3 else data.labels.clone(),
        )
        terms = semppl_objective(
            state, [o[rows] for o in online], [t[rows] for t in target], data.labels[rows]
        )[0]
        assert torch.equal(recorded.pop(), whole[rows])
        totals.append(torch.stack(list(terms)))
    # the ranks hold 3 and 1 anchors with a positive: the semantic term's denominator is global
    assert (whole >= 0).any(1).tolist() == [True, True, True, False, True, False]
    torch.testing.assert_close((totals[0] + totals[1]) / 2, torch.stack(list(single)), rtol=1e-5, atol=1e-6)


def snapshot(state: TrainState) -> bytes:
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("queue_size", [0, 6])
def test_resume_is_bit_identical(queue_size):
    labels = [[0, -1, 1, -1], [-1, 2, -1, 0], [1, -1, -1, -1]]
    data = batches(4, labels)
    run = state_for(ObjectiveConfig(queue_size=queue_size, **SEMPPL))
    for batch in data[:2]:
        train_step(run, batch)
    saved = snapshot(run)
    expected = [train_step(run, batch) for batch in data[2:]]

    resumed = state_for(ObjectiveConfig(queue_size=queue_size, **SEMPPL), seed=123)
    resumed.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
    assert (resumed.step, resumed.semppl_len, resumed.semppl_ptr) == (2, 4, 4)
    assert resumed.semppl_labels.tolist() == [0, 1, 2, 0, -1]
    got = [train_step(resumed, batch) for batch in data[2:]]
    assert got == expected and expected[0]["semantic"] > 0
    assert torch.equal(resumed.pseudo_labels, run.pseudo_labels)
    for name in ("semppl_queue", "semppl_labels"):
        assert torch.equal(getattr(resumed, name), getattr(run, name)), name
    assert (resumed.semppl_len, resumed.semppl_ptr) == (run.semppl_len, run.semppl_ptr)
    for (name, p), q in zip(resumed.online.named_parameters(), run.online.parameters()):
        assert torch.equal(p, q), name


def test_a_checkpoint_without_the_labelled_queue_still_loads():
    state = state_for(ObjectiveConfig())
    saved = torch.load(io.BytesIO(snapshot(state)), weights_only=True)
    for key in ("semppl_queue", "semppl_labels", "semppl_len", "semppl_ptr"):
        del saved[key]
    state.load_state_dict(saved)
    assert (state.semppl_queue, state.semppl_len, state.semppl_ptr) == (None, 0, 0)


def test_a_semppl_step_needs_integer_labels():
    state = state_for(ObjectiveConfig(**SEMPPL))
    views = batches(1, [[-1] * 4])[0].views
    with pytest.raises(ValueError, match=r"objective.name='semppl' needs the batch's labels.*no 'labels'"):
        train_step(state, NoLabels(views))
    with pytest.raises(ValueError, match=r"batch.labels must hold integers.*torch.float32"):
        train_step(state, Batch(views, torch.zeros(4)))
    with pytest.raises(ValueError, match=r"batch.labels must have shape \[B\] = \[4\], got \[3\]"):
        train_step(state, Batch(views, torch.zeros(3, dtype=torch.long)))
    assert state.step == 0
    # ReLIC ignores labels altogether
    assert math.isfinite(train_step(state_for(ObjectiveConfig()), NoLabels(views))["loss"])


def test_semppl_config_defaults_are_marked_assumed():
    cfg = ObjectiveConfig(name="semppl")
    assert (cfg.semppl_queue_size, cfg.semppl_knn_k, cfg.semppl_positives, cfg.semppl_weight) == (
        2560,
        1,
        3,
        0.2,
    )
    assert ObjectiveConfig().name == "relic"
    fields = ObjectiveConfig.__pydantic_fields__
    for name in ("semppl_queue_size", "semppl_knn_k", "semppl_positives", "semppl_weight"):
        assert "Assumed, not from the paper" in " ".join(fields[name].description.split()), name


@pytest.mark.parametrize(
    ("kwargs", "field", "value", "expected"),
    [
        (dict(name="simclr"), "name", "simclr", "'relic' or 'semppl'"),
        (dict(semppl_queue_size=0), "semppl_queue_size", 0, "greater than 0"),
        (dict(semppl_knn_k=0), "semppl_knn_k", 0, "greater than 0"),
        (dict(semppl_positives=-1), "semppl_positives", -1, "greater than 0"),
        (dict(semppl_weight=-0.1), "semppl_weight", -0.1, "greater than or equal to 0"),
        (dict(name="semppl", negatives=8), "negatives", 8, "expected None with name='semppl'"),
    ],
)
def test_bad_semppl_values_name_the_field(kwargs, field, value, expected):
    with pytest.raises(ValidationError) as info:
        ObjectiveConfig(**kwargs)
    error = info.value.errors()[0]
    assert (error["loc"], error["input"]) == ((field,), value)
    assert expected in error["msg"], error["msg"]
    ObjectiveConfig(negatives=8)  # ReLIC's subsampling stays allowed
