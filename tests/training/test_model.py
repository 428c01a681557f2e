"""Encoders, critic and EMA target."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from training.config import ARCHITECTURES, ModelConfig
from training.model import EMATarget, Projector, ScaledResNet, build_encoder, build_model, resnet
from training.optim import momentum_schedule

FEATURE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "wide_resnet50_2": 2048,
    "wide_resnet101_2": 2048,
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_keeps_torchvision_names(arch):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost, nothing downloaded
        encoder = build_encoder(arch)
        reference = torchvision.models.get_model(arch, weights=None)
    assert encoder.feature_dim == FEATURE_DIMS[arch]
    ours = {k: v.shape for k, v in encoder.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert ours == theirs


def test_small_stem_keeps_resolution_for_32px_images():
    encoder = build_encoder("resnet18", small_stem=True).eval()
    assert encoder.conv1.kernel_size == (3, 3) and encoder.conv1.stride == (1, 1)
    assert isinstance(encoder.maxpool, nn.Identity)
    # 32x32 through the small stem reaches layer4 at 4x4 (the standard stem would leave 1x1).
    feature_maps = {}

    def record(module, inputs, output):
        feature_maps["layer4"] = output.shape

    encoder.layer4.register_forward_hook(record)
    out = encoder(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 512) and feature_maps["layer4"][-2:] == (4, 4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("width", [0.25, 0.5, 2])
def test_width_scales_every_channel_count_and_keeps_torchvision_names(arch, width):
    with torch.device("meta"):
        encoder = build_encoder(arch, width=width)
        reference = torchvision.models.get_model(arch, weights=None)
    assert isinstance(encoder, torchvision.models.ResNet)
    assert encoder.feature_dim == FEATURE_DIMS[arch] * width
    ours = {k: v.shape for k, v in encoder.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert ours.keys() == theirs.keys()
    for key, shape in theirs.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key == "conv1.weight":  # [out, 3 input colours, k, k]
            expected = (shape[0] * width, 3, *shape[2:])
        else:  # every output and input channel count scales; kernel sizes do not
            expected = tuple(int(d * width) if i < 2 else d for i, d in enumerate(shape))
        assert ours[key] == expected, key


def test_width_one_is_torchvision_itself():
    torch.manual_seed(0)
    ours = resnet("resnet18", width=1.0)
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18()
    assert type(ours) is torchvision.models.ResNet
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_narrow_encoder_runs_and_is_initialised_like_torchvision():
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", small_stem=True, width=0.25)
    assert isinstance(encoder, ScaledResNet) and encoder.conv1.weight.shape == (16, 3, 3, 3)
    out = encoder.eval()(torch.randn(4, 3, 16, 16))
    assert out.shape == (4, 128) and torch.isfinite(out).all()
    # kaiming_normal_(fan_out, relu) on the rebuilt stem as on every other convolution
    std = encoder.conv1.weight.std().item()
    assert 0.5 < std / (2 / (16 * 9)) ** 0.5 < 1.5
    assert torch.equal(encoder.bn1.weight, torch.ones(16)) and torch.equal(encoder.bn1.bias, torch.zeros(16))
    model = build_model(ModelConfig(arch="resnet18", width=0.5, projector_hidden_dim=32, projector_out_dim=8))
    assert model.projector[0].in_features == 256
    assert [o.shape for o in model([torch.randn(3, 3, 16, 16)] * 2)] == [(3, 8)] * 2


def test_projector_is_byol_mlp():
    layers = list(Projector(2048))
    assert [type(layer) for layer in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[3].out_features) == (2048, 4096, 256)
    assert layers[0].bias is None and layers[3].bias is not None  # BatchNorm makes a first bias moot


def test_model_forward_equals_per_view_forward():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch="resnet18", small_stem=True, projector_hidden_dim=32, projector_out_dim=8)
    ).eval()  # eval mode: BatchNorm uses running statistics, so batching views together is exact
    views = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    outputs = model(views)
    assert [o.shape for o in outputs] == [(3, 8)] * 3
    for view, out in zip(views, outputs):
        torch.testing.assert_close(out, model.projector(model.encoder(view)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batchnorm", ["shared", "per_view"])
def test_per_view_batchnorm_forwards_each_view_on_its_own(batchnorm):
    """Train mode: "per_view" equals one forward per view (each view's own batch statistics);
    "shared" normalises the two same-size views together, which differs."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="resnet18",
        small_stem=True,
        width=0.25,
        projector_hidden_dim=32,
        projector_out_dim=8,
        batchnorm=batchnorm,
    )
    model = build_model(cfg).train()
    assert model.per_view_batchnorm == (batchnorm == "per_view")
    reference = copy.deepcopy(model)
    views = [torch.randn(4, 3, 16, 16), 2 * torch.randn(4, 3, 16, 16) + 1, torch.randn(4, 3, 8, 8)]
    outputs = model(views)
    separate = [reference.projector(reference.encoder(v)) for v in views]
    assert [o.shape for o in outputs] == [(4, 8)] * 3
    if batchnorm == "per_view":
        for got, want in zip(outputs, separate):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert not torch.allclose(outputs[0], separate[0], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(outputs[2], separate[2], rtol=1e-5, atol=1e-6)  # a size of its own
    # the EMA target, a copy of the online network, forwards the same way
    assert EMATarget(model).network.per_view_batchnorm == model.per_view_batchnorm


def test_ema_update_moves_towards_online_and_copies_buffers():
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    target = EMATarget(online)
    assert all(not p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.network.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(3.0)
    target.update(online, momentum=0.9)
    for old, new, theta in zip(before, target.network.parameters(), online.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * theta)
    assert torch.equal(target.network[1].running_mean, online[1].running_mean)


def test_momentum_schedule_hits_endpoints_and_increases():
    m = momentum_schedule(0.996, 1.0, 101)
    assert m.shape == (101,)
    assert m[0].item() == pytest.approx(0.996, abs=1e-15) and m[-1].item() == 1.0
    assert torch.all(m[1:] >= m[:-1])
    assert m[50].item() == pytest.approx(0.998, abs=1e-12)  # half-way on the cosine
