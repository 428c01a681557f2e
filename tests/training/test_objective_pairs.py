"""Pair sets ("distinct" / ReLICv2's "all") and negative subsampling (n_e) of ``relic_loss``, against a
naive per-anchor loop; their way through ``relic_objective``; train_step with 4 large + 2 small views."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from training import distributed
from training.config import ModelConfig, ObjectiveConfig, OptimConfig, ScheduleConfig
from training.loop import build_train_state, relic_objective, train_step
from training.loss import draw_negatives, relic_loss, view_pairs

BATCH, OFFSET, CONTRAST = 3, 3, 10  # rank 1 of 2 (6 gathered rows) plus 4 queue rows
NEGATIVES = 4


def naive_relic(online, target, *, temperature, alpha, offset, kl_stop_grad, pairs, negative_index=None):
    """Explicit loops over view pairs, anchors and candidate rows; log-softmax and KL by hand.

    ``pairs="all"`` is written as ReLICv2's Algorithm 1: every large online view i against every
    large target view j (i = j included), then every small view s against every large target view j;
    the contrastive sum is divided by (L + S) * L.
    """
    num_large, num_views = len(target), len(online)
    num_small = num_views - num_large
    if pairs == "distinct":
        pair_set = [(o, t) for o in range(num_views) for t in range(num_large) if o != t]
        normaliser = len(pair_set)
    else:
        pair_set = [(i, j) for i in range(num_large) for j in range(num_large)]
        pair_set += [(num_large + s, j) for s in range(num_small) for j in range(num_large)]
        normaliser = (num_large + num_small) * num_large
    batch, rows = online[0].shape[0], target[0].shape[0]

    def candidates(i):
        if negative_index is None:
            return list(range(rows)), offset + i  # candidate rows, position of the positive among them
        return [offset + i] + [int(r) for r in negative_index[i]], 0

    def log_probs(pair, i):
        o, t = pair
        a = online[o][i]
        logits = []
        for r in candidates(i)[0]:
            b = target[t][r]
            cosine = (a * b).sum() / (torch.sqrt((a * a).sum()) * torch.sqrt((b * b).sum()))
            logits.append(cosine / temperature)
        logits = torch.stack(logits)
        top = logits.max().detach()
        return logits - (top + torch.log(torch.exp(logits - top).sum()))

    log_p = {(pair, i): log_probs(pair, i) for pair in pair_set for i in range(batch)}
    contrastive = 0.0
    for pair in pair_set:
        for i in range(batch):
            contrastive = contrastive - log_p[pair, i][candidates(i)[1]]
    contrastive = contrastive / (normaliser * batch)

    kl_sum, count = 0.0, 0
    for a in pair_set:
        for b in pair_set:
            if a == b:
                continue
            for i in range(batch):
                log_a, log_b = log_p[a, i], log_p[b, i]
                if kl_stop_grad:
                    log_b = log_b.detach()
                kl_sum = kl_sum + (torch.exp(log_a) * (log_a - log_b)).sum()
                count += 1
    invariance = kl_sum / count if count else torch.zeros((), dtype=online[0].dtype)
    return contrastive + alpha * invariance, contrastive, invariance


def make_views(num, rows, dim, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g, dtype=torch.float64, requires_grad=grad) for _ in range(num)]


def explicit_negatives(batch, rows, count, offset, seed):
    """For each anchor, ``count`` rows other than its positive, by a seeded permutation (not the loss's draw)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        others = [r for r in range(rows) if r != offset + i]
        out.append([others[k] for k in torch.randperm(len(others), generator=g)[:count].tolist()])
    return torch.tensor(out, dtype=torch.long)


def gradients(loss, inputs):
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


@pytest.mark.parametrize("stop_grad", [True, False])
@pytest.mark.parametrize("subsample", [False, True])
@pytest.mark.parametrize("pairs", ["distinct", "all"])
@pytest.mark.parametrize(("large", "small"), [(2, 0), (2, 2), (4, 0), (4, 2)])
def test_matches_naive_loop_in_value_and_gradients(large, small, pairs, subsample, stop_grad):
    online = make_views(large + small, BATCH, 5, seed=10 * large + small)
    target = make_views(large, CONTRAST, 5, seed=99)  # carries gradient: the "online" target mode
    index = explicit_negatives(BATCH, CONTRAST, NEGATIVES, OFFSET, seed=large) if subsample else None
    kwargs = dict(temperature=0.3, alpha=0.7, offset=OFFSET, kl_stop_grad=stop_grad, pairs=pairs)
    ours = relic_loss(online, target, negative_index=index, **kwargs)
    ref = naive_relic(online, target, negative_index=index, **kwargs)
    inputs = online + target
    for term, (got, want) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for g_got, g_want in zip(gradients(got, inputs), gradients(want, inputs)):
            torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-11, msg=f"term {term}")
    # the target gradient is really exercised (non-zero through the contrastive term at least)
    assert gradients(ours.total, target)[0].abs().sum() > 0


def test_pair_sets():
    assert view_pairs(2, 2) == view_pairs(2, 2, "distinct") == [(1, 0), (0, 1)]
    assert view_pairs(2, 2, "all") == [(0, 0), (1, 0), (0, 1), (1, 1)]
    every = view_pairs(6, 4, "all")  # L = 4 large, S = 2 small
    assert sorted(every) == sorted(itertools.product(range(6), range(4))) and len(every) == (4 + 2) * 4
    assert set(view_pairs(6, 4)) == {(o, t) for o, t in every if o != t}
    with pytest.raises(ValueError, match="pairs must be one of 'distinct', 'all', got 'some'"):
        view_pairs(2, 2, "some")


def test_distinct_is_the_default_and_all_differs():
    online = make_views(4, BATCH, 5, seed=1, grad=False)
    target = make_views(2, CONTRAST, 5, seed=2, grad=False)
    kwargs = dict(temperature=0.2, alpha=1.0, offset=OFFSET)
    default = relic_loss(online, target, **kwargs)
    distinct = relic_loss(online, target, pairs="distinct", **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(default, distinct))
    every = relic_loss(online, target, pairs="all", **kwargs)
    # (o, o) pairs add easy positives: the contrastive term changes
    assert not torch.allclose(every.contrastive, distinct.contrastive)
    # one online view against one target view: "all" is the single pair (0, 0)
    single = relic_loss(online[:1], target[:1], pairs="all", **kwargs)
    assert single.invariance.item() == 0.0 and single.contrastive.item() > 0
    with pytest.raises(ValueError, match="pairs must be one of 'distinct', 'all', got 'both'"):
        relic_loss(online, target, pairs="both", **kwargs)


@pytest.mark.parametrize("pairs", ["distinct", "all"])
def test_every_other_row_as_negatives_is_the_full_softmax(pairs):
    online = make_views(4, BATCH, 5, seed=3)
    target = make_views(2, CONTRAST, 5, seed=4)
    kwargs = dict(temperature=0.2, alpha=0.5, offset=OFFSET, kl_stop_grad=False, pairs=pairs)
    full = relic_loss(online, target, **kwargs)
    torch.manual_seed(0)
    drawn = relic_loss(online, target, negatives=CONTRAST - 1, **kwargs)  # random column order
    index = torch.tensor([[r for r in range(CONTRAST) if r != OFFSET + i] for i in range(BATCH)])
    ordered = relic_loss(online, target, negative_index=index.flip(1), **kwargs)
    inputs = online + target
    for terms in (drawn, ordered):
        for got, want in zip(terms, full):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        for got, want in zip(gradients(terms.total, inputs), gradients(full.total, inputs)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    # fewer negatives is a different (smaller-softmax) loss
    fewer = relic_loss(online, target, negatives=2, **kwargs)
    assert fewer.contrastive < full.contrastive


def test_the_draw():
    torch.manual_seed(7)
    index = draw_negatives(BATCH, CONTRAST, NEGATIVES, offset=OFFSET)
    torch.manual_seed(7)
    assert torch.equal(draw_negatives(BATCH, CONTRAST, NEGATIVES, offset=OFFSET), index)
    assert index.shape == (BATCH, NEGATIVES) and index.dtype == torch.long
    for i, row in enumerate(index.tolist()):
        assert len(set(row)) == NEGATIVES and OFFSET + i not in row and all(0 <= r < CONTRAST for r in row)

    # the loss draws the same indices from the global generator, reproducibly under manual_seed
    online = make_views(3, BATCH, 5, seed=5, grad=False)
    target = make_views(2, CONTRAST, 5, seed=6, grad=False)
    kwargs = dict(temperature=0.2, alpha=1.0, offset=OFFSET, pairs="all")
    torch.manual_seed(7)
    drawn = relic_loss(online, target, negatives=NEGATIVES, **kwargs)
    explicit = relic_loss(online, target, negative_index=index, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(drawn, explicit))
    torch.manual_seed(7)
    assert torch.equal(relic_loss(online, target, negatives=NEGATIVES, **kwargs).total, drawn.total)
    torch.manual_seed(8)
    assert not torch.equal(relic_loss(online, target, negatives=NEGATIVES, **kwargs).total, drawn.total)
    # an explicit generator instead of the global one
    first = draw_negatives(
        BATCH, CONTRAST, NEGATIVES, offset=OFFSET, generator=torch.Generator().manual_seed(3)
    )
    again = relic_loss(
        online, target, negatives=NEGATIVES, generator=torch.Generator().manual_seed(3), **kwargs
    )
    assert torch.equal(relic_loss(online, target, negative_index=first, **kwargs).total, again.total)


def test_the_draw_is_uniform_over_the_other_rows():
    torch.manual_seed(0)
    index = draw_negatives(500, 503, 2, offset=3)  # anchor i's positive is row 3 + i
    assert not (index == 3 + torch.arange(500)[:, None]).any()
    # one anchor, many draws: rows 1..M-1 equally likely, its positive row 0 never
    counts = torch.zeros(6)
    g = torch.Generator().manual_seed(1)
    for _ in range(3000):
        counts += torch.bincount(draw_negatives(1, 6, 2, offset=0, generator=g)[0], minlength=6)
    assert counts[0] == 0
    expected = 3000 * 2 / 5
    chi2 = ((counts[1:] - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, counts  # 4 degrees of freedom, p ~ 4e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(negatives=CONTRAST),
            r"negatives \(n_e\) must be an integer in \[1, M - 1\] = \[1, 9\].*M=10.*got negatives=10",
        ),
        (dict(negatives=0), r"\[1, 9\].*got negatives=0"),
        (dict(negatives=True), r"got negatives=True"),
        (dict(negative_index=torch.zeros(BATCH, 2, dtype=torch.long)), "must not repeat a row"),
        (
            dict(negative_index=torch.tensor([[OFFSET, 0], [0, 1], [0, 1]])),
            "must not hold an anchor's positive",
        ),
        (dict(negative_index=torch.tensor([[0, 10], [0, 1], [0, 1]])), r"rows in \[0, M\) = \[0, 10\)"),
        (
            dict(negative_index=torch.tensor([[0, 1], [0, 1], [0, 1]]), negatives=3),
            "negatives=3 but negative_index holds 2",
        ),
        (
            dict(negative_index=torch.zeros(2, 2, dtype=torch.long)),
            r"\[B, n_e\] with B=3, got torch.int64 \[2, 2\]",
        ),
    ],
)
def test_bad_negatives_are_refused_naming_the_numbers(kwargs, message):
    online = make_views(2, BATCH, 5, seed=0, grad=False)
    target = make_views(2, CONTRAST, 5, seed=1, grad=False)
    with pytest.raises(ValueError, match=message):
        relic_loss(online, target, temperature=0.1, alpha=1.0, offset=OFFSET, **kwargs)
    if "negatives" in kwargs and "negative_index" not in kwargs:
        with pytest.raises(ValueError, match=message):
            draw_negatives(BATCH, CONTRAST, kwargs["negatives"], offset=OFFSET)


# --- through relic_objective and train_step -------------------------------------------------------


def tiny_resnet(batchnorm="shared") -> ModelConfig:
    return ModelConfig(
        arch="resnet18",
        small_stem=True,
        width=0.25,
        projector_hidden_dim=32,
        projector_out_dim=16,
        batchnorm=batchnorm,
    )


def state_for(objective: ObjectiveConfig, batchnorm="shared", batch=4):
    return build_train_state(
        tiny_resnet(batchnorm),
        objective,
        OptimConfig(name="sgd", base_lr=0.5),
        ScheduleConfig(epochs=1, warmup_epochs=0),
        steps_per_epoch=3,
        global_batch=batch,
        seed=0,
    )


class Views:
    def __init__(self, views, num_large):
        self.views, self.num_large = views, num_large


def four_plus_two(seed, batch=4):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(4)]
    views += [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(2)]
    return Views(views, num_large=4)


@pytest.mark.parametrize("pairs", ["distinct", "all"])
def test_relic_objective_passes_pairs_and_negatives_with_offset_and_queue(monkeypatch, pairs):
    """Rank 1 of 2 (faked collectives): offset B, gathered batch then queue, the draw seeded by
    (seed, step, rank), whatever the global generator holds."""
    objective = ObjectiveConfig(pairs=pairs, negatives=5, queue_size=4, alpha=0.5)
    state = state_for(objective)
    state.queue = torch.nn.functional.normalize(torch.randn(4, 4, 16), dim=-1)  # [Vt, queue, D], full
    state.queue_len = 4
    other_rank = torch.randn(BATCH, 4, 16)  # rank 0's [B, Vt, D]
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "gather", lambda local: torch.cat([other_rank, local.detach()]))
    online = make_views(6, BATCH, 16, seed=3, grad=True)
    online = [o.float().detach().requires_grad_() for o in online]
    target = [t.float() for t in make_views(4, BATCH, 16, seed=4, grad=False)]

    state.seed, state.step = 7, 3
    terms, gathered = relic_objective(state, online, target)
    contrast = [
        torch.cat(
            [torch.nn.functional.normalize(torch.cat([other_rank[:, v], target[v]]), dim=-1), state.queue[v]]
        )
        for v in range(4)
    ]
    assert torch.equal(gathered, torch.stack(contrast)[:, : 2 * BATCH])
    # The draw's generator is seeded by (run seed, step, rank) alone.
    generator = torch.Generator().manual_seed((7 * 1_000_003 + 3) * 1_000_003 + 1)
    index = draw_negatives(BATCH, 2 * BATCH + 4, 5, offset=BATCH, generator=generator)
    reference = relic_loss(
        online, contrast, temperature=0.1, alpha=0.5, offset=BATCH, pairs=pairs, negative_index=index
    )
    for got, want in zip(terms, reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(gradients(terms.total, online), gradients(reference.total, online)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batchnorm", ["shared", "per_view"])
def test_train_step_with_four_large_and_two_small_views(batchnorm):
    objective = ObjectiveConfig(pairs="all", negatives=3, queue_size=8, base_momentum=0.9)
    state = state_for(objective, batchnorm)
    encoder_calls: list[int] = []
    state.target.network.encoder.register_forward_hook(
        lambda m, args, out: encoder_calls.append(args[0].shape[0])
    )
    target_views: list[int] = []
    forward = state.target.forward
    state.target.forward = lambda v: target_views.append(len(v)) or forward(v)
    before = {k: v.detach().clone() for k, v in state.online.named_parameters()}
    ema_before = {k: v.detach().clone() for k, v in state.target.network.named_parameters()}

    for step in range(3):  # the queue fills from 0 to 8 rows: contrast sets of 4, 8 and 12 rows
        metrics = train_step(state, four_plus_two(step))
        assert all(math.isfinite(metrics[k]) for k in ("loss", "contrastive", "invariance"))
        assert metrics["invariance"] > 0
    assert target_views == [4, 4, 4]
    # the EMA target (a copy of the online network) forwards like it: four views, one batch or four
    assert encoder_calls == ([16] * 3 if batchnorm == "shared" else [4] * 12)
    assert state.target.network.per_view_batchnorm == (batchnorm == "per_view")
    for name, value in state.online.named_parameters():
        if name.endswith("weight") and value.dim() > 1:
            assert not torch.equal(value, before[name]), name
    assert any(not torch.equal(v, ema_before[k]) for k, v in state.target.network.named_parameters())
    assert (state.queue_len, tuple(state.queue.shape)) == (8, (4, 8, 16))


def test_ranks_draw_their_own_negatives_and_a_short_contrast_set_uses_every_row(monkeypatch):
    """Identical global generators on every rank (same weights) must not give every rank the same
    draw; and while the queue fills, n_e above the rows available uses them all."""
    state = state_for(ObjectiveConfig(negatives=2))
    online = [o.float() for o in make_views(2, BATCH, 16, seed=3, grad=False)]
    target = [t.float() for t in make_views(2, BATCH, 16, seed=4, grad=False)]
    gathered = torch.cat([torch.stack(target, dim=1)] * 2)  # both ranks hold the same rows
    monkeypatch.setattr(distributed, "gather", lambda local: gathered)
    losses = {}
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        torch.manual_seed(0)
        losses[rank] = relic_objective(state, online, target)[0].total
        torch.manual_seed(1)
        assert torch.equal(relic_objective(state, online, target)[0].total, losses[rank])
    assert not torch.equal(losses[0], losses[1])

    state = state_for(ObjectiveConfig(negatives=10 * BATCH))
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "gather", lambda local: local)
    terms, _ = relic_objective(state, online, target)
    full = relic_loss(online, target, temperature=0.1, alpha=1.0)
    torch.testing.assert_close(terms.total, full.total, rtol=1e-5, atol=1e-6)
