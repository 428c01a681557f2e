"""relic_loss against a naive per-anchor loop written directly from DESIGN.md's formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.loss import relic_loss, view_pairs


def naive_relic(online, target, *, temperature, alpha, offset=0, kl_stop_grad=True):
    """One anchor, one pair at a time: contrastive NLL + alpha * mean over A != B of KL(p_A || sg p_B)."""
    pairs = [(o, t) for o in range(len(online)) for t in range(len(target)) if o != t]
    batch = online[0].shape[0]

    def dist(pair, i):
        o, t = pair
        cos = torch.stack([F.cosine_similarity(online[o][i], row, dim=0) for row in target[t]])
        return torch.softmax(cos / temperature, dim=0)

    probs = {(pair, i): dist(pair, i) for pair in pairs for i in range(batch)}
    contrastive = sum(-torch.log(probs[pair, i][offset + i]) for pair in pairs for i in range(batch))
    contrastive = contrastive / (len(pairs) * batch)
    kls = []
    for a in pairs:
        for b in pairs:
            if a == b:
                continue
            for i in range(batch):
                p_a, p_b = probs[a, i], probs[b, i]
                if kl_stop_grad:
                    p_b = p_b.detach()
                kls.append((p_a * (torch.log(p_a) - torch.log(p_b))).sum())
    invariance = torch.stack(kls).mean() if kls else torch.zeros((), dtype=online[0].dtype)
    return contrastive + alpha * invariance, contrastive, invariance


def make_views(num, rows, dim, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g, dtype=torch.float64, requires_grad=grad) for _ in range(num)]


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize(
    ("vo", "vt", "batch", "contrast", "offset", "stop_grad"),
    [
        (2, 2, 4, 4, 0, True),  # ReLIC: two large views, M = B
        (2, 2, 3, 8, 5, True),  # M > B (gathered + queue), positives not at the start
        (5, 2, 3, 9, 3, True),  # ReLICv2 multi-crop: 3 small views seen only by the online network
        (4, 2, 2, 6, 2, False),  # gradients through both arguments of the KL
        (2, 1, 3, 5, 1, True),  # |P| = 1: no pair of pairs, invariance 0
    ],
)
def test_matches_naive_loop_in_value_and_gradients(vo, vt, batch, contrast, offset, stop_grad):
    online = make_views(vo, batch, 6, seed=vo * 100 + batch)
    target = make_views(vt, contrast, 6, seed=7 + contrast)  # target carries gradient too ("online" mode)
    kwargs = dict(temperature=0.3, alpha=0.7, offset=offset, kl_stop_grad=stop_grad)
    ours = relic_loss(online, target, **kwargs)
    ref = naive_relic(online, target, **kwargs)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    inputs = online + target
    for term in range(3):
        if not ref[term].requires_grad:  # invariance with |P| = 1 is the constant 0
            assert not ours[term].requires_grad
            continue
        for got, want in zip(grads(ours[term], inputs), grads(ref[term], inputs)):
            want = torch.zeros_like(got) if want is None else want
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_alpha_zero_is_infonce_cross_entropy():
    online = make_views(2, 5, 8, seed=1, grad=False)
    target = make_views(2, 5, 8, seed=2, grad=False)
    terms = relic_loss(online, target, temperature=0.1, alpha=0.0)
    infonce = []
    for o, t in [(0, 1), (1, 0)]:
        logits = F.normalize(online[o], dim=1) @ F.normalize(target[t], dim=1).T / 0.1
        infonce.append(F.cross_entropy(logits, torch.arange(5)))
    torch.testing.assert_close(terms.total, torch.stack(infonce).mean())
    assert terms.invariance > 0  # still reported, just not weighted


def test_invariance_zero_iff_all_pairs_agree():
    same_online = make_views(1, 4, 8, seed=3, grad=False) * 3
    same_target = make_views(1, 4, 8, seed=4, grad=False) * 2
    zero = relic_loss(same_online, same_target, temperature=0.1, alpha=1.0).invariance
    assert abs(zero.item()) < 1e-12
    online = make_views(3, 4, 8, seed=5, grad=False)
    positive = relic_loss(online, same_target, temperature=0.1, alpha=1.0).invariance
    assert positive.item() > 1e-3


def test_view_pairs_exclude_same_view_and_small_targets():
    assert view_pairs(2, 2) == [(1, 0), (0, 1)]
    pairs = view_pairs(4, 2)
    assert len(pairs) == 6 and all(o != t and t < 2 for o, t in pairs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
        (dict(alpha=-1.0), "alpha must be a finite number >= 0, got -1.0"),
        (dict(offset=2), r"offset must be an integer in \[0, M - B\] = \[0, 1\] \(M=4 target rows, B=3"),
        (dict(target_dim=5), "must share D, got online D=4, target D=5"),
        (dict(num_online=1), "got Vo=1, Vt=1"),
        (dict(ragged=True), r"got \[2, 4\] for online\[1\]"),
    ],
)
def test_validation_states_expected_and_actual(kwargs, message):
    num_online = kwargs.pop("num_online", 2)
    online = make_views(num_online, 3, 4, seed=0, grad=False)
    if kwargs.pop("ragged", False):
        online[1] = online[1][:2]
    target = make_views(1 if num_online == 1 else 2, 4, kwargs.pop("target_dim", 4), seed=1, grad=False)
    args = dict(temperature=0.1, alpha=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        relic_loss(online, target, **args)
