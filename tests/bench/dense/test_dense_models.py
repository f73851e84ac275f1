"""Dense models: outputs at the input's size, hard parameter sharing (trunk = the shared part, z
the representation every head reads), the published sizes, and one-line errors."""

import pytest
import torch

from taskbalance.bench.dense.models import build_dense_model, unpool

SMALL = {
    "segnet": {"widths": (4, 8), "convs": (1, 2)},
    "deeplab": {"block": "basic", "layers": (1, 1, 1, 1), "width": 4, "channels": 8,
                "rates": (1, 2, 3)},
}  # fmt: skip
OUTPUTS = {"segmentation": 5, "depth": 1, "normal": 3}


@pytest.mark.parametrize("arch, size", [("segnet", (8, 12)), ("deeplab", (20, 28))])
def test_outputs_have_the_input_size_and_the_task_channels(arch, size):
    model = build_dense_model(arch, OUTPUTS, in_channels=1, options=SMALL[arch])
    z, out = model(torch.randn(2, 1, *size))
    assert {t: tuple(o.shape) for t, o in out.items()} == {
        t: (2, c, *size) for t, c in OUTPUTS.items()
    }
    assert z.shape[0] == 2


@pytest.mark.parametrize("arch", ["segnet", "deeplab"])
def test_trunk_and_heads_split_the_parameters_and_heads_read_only_z(arch):
    torch.manual_seed(0)
    model = build_dense_model(arch, OUTPUTS, options=SMALL[arch]).eval()
    trunk = {id(p) for p in model.trunk.parameters()}
    heads = {id(p) for p in model.heads.parameters()}
    assert not trunk & heads and trunk | heads == {id(p) for p in model.parameters()}
    x = torch.randn(2, 3, 16, 16)
    z, out = model(x)
    z2 = z.detach().requires_grad_()
    _, again = type(model).forward(_FixedTrunk(model, z2), x)
    for task in OUTPUTS:
        torch.testing.assert_close(again[task], out[task])
    # A task's loss reaches the trunk only through z: its gradient w.r.t. z is non-zero, and no
    # other head receives any.
    again["depth"].sum().backward()
    assert z2.grad.abs().sum() > 0
    assert all(p.grad is None for t in ("segmentation", "normal")
               for p in model.heads[t].parameters())  # fmt: skip


class _FixedTrunk(torch.nn.Module):
    """The model's heads on a given z (the trunk replaced by a constant)."""

    def __init__(self, model, z):
        super().__init__()
        self.heads, self._z = model.heads, z

    def trunk(self, x):
        return self._z


def test_full_size_models_have_the_published_parameter_counts():
    nyuv2 = {"segmentation": 13, "depth": 1, "normal": 3}
    segnet = build_dense_model("segnet", nyuv2)
    # MTAN's SegNet with the three NYUv2 heads: its code prints 24,981,069 parameters.
    assert sum(p.numel() for p in segnet.parameters()) == pytest.approx(24_981_069, rel=0.005)
    resnet = build_dense_model("deeplab", {"depth": 1})
    # torchvision's ResNet-50 has 25,557,032 parameters, 2,049,000 of them in its classifier.
    assert sum(p.numel() for p in resnet.trunk.parameters()) == 25_557_032 - 2_049_000


def test_segnet_refuses_a_size_its_pooling_cannot_undo():
    model = build_dense_model("segnet", {"depth": 1}, options=SMALL["segnet"])
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(1, 3, 10, 12))


@pytest.mark.parametrize("arch, options, message", [
    ("unet", {}, "unknown dense architecture 'unet'; valid: segnet, deeplab"),
    ("segnet", {"depth": 3}, "bad segnet option"),
    ("deeplab", {"block": "wide"}, "block must be one of"),
])  # fmt: skip
def test_bad_architecture_or_option_is_one_line(arch, options, message):
    with pytest.raises(ValueError, match=message) as error:
        build_dense_model(arch, {"depth": 1}, options=options)
    assert "\n" not in str(error.value)


def test_a_batch_of_one_trains():  # the ASPP image-pooling branch has no BatchNorm
    model = build_dense_model("deeplab", {"depth": 1}, options=SMALL["deeplab"]).train()
    model(torch.randn(1, 3, 16, 16))[1]["depth"].sum().backward()


@pytest.mark.filterwarnings("ignore:max_unpooling2d_forward_out does not have a deterministic")
@pytest.mark.parametrize("seed", range(3))
def test_unpool_is_max_unpool_and_so_is_its_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 8, generator=g)
    pooled, where = torch.nn.functional.max_pool2d(x, 2, 2, return_indices=True)
    a = pooled.clone().requires_grad_()
    b = pooled.clone().requires_grad_()
    ours, reference = unpool(a, where), torch.nn.functional.max_unpool2d(b, where, 2, 2)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    weights = torch.randn(ours.shape, generator=g)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
