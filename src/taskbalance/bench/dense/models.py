"""Dense-prediction models with hard parameter sharing: a shared trunk, one head per task.

Each model (:class:`DenseModel`) fits the model contract of
:class:`taskbalance.bench.problem.Problem`: ``trunk`` holds every shared parameter and nothing
else, ``heads`` one module per task, and ``forward(x)`` returns ``(z, {task: output})`` where
``z = trunk(x)`` is the feature-level representation every head reads (the ``features=`` of a
feature-level method). Outputs have the input's height and width: segmentation logits
``(B, classes, H, W)``, depth ``(B, 1, H, W)``, normals ``(B, 3, H, W)`` (not normalised; the
normal loss and metric scale them to unit length).

Architectures (:data:`ARCHITECTURES`), written here from the papers' descriptions:

* ``"segnet"``: SegNet (Badrinarayanan et al., TPAMI 2017) as MTAN uses it for NYUv2 and
  Cityscapes (Liu et al., CVPR 2019): a VGG-16-like encoder of ``len(widths)`` stages (each
  ``convs[i]`` 3x3 conv + BatchNorm + ReLU layers, then a 2x2 max-pool whose indices are
  kept) and a mirrored decoder (max-unpool with those indices, then the same conv layers with
  the widths reversed, ending at ``widths[0]`` channels). Default ``widths=(64, 128, 256, 512,
  512)``, ``convs=(2, 2, 3, 3, 3)``: the 13 + 13 conv layers of MTAN's SegNet (25.0 M
  parameters with NYUv2's three heads; MTAN's code prints 24,981,069). ``z`` is the
  decoder's full-resolution output ``(B, widths[0], H, W)``; each
  head is MTAN's: a 3x3 conv (``widths[0]`` channels) then a 1x1 conv to the outputs. H and W
  must be divisible by ``2 ** len(widths)``.
* ``"deeplab"``: a ResNet with dilated convolutions (Yu et al., CVPR 2017) as the trunk and a
  DeepLab-v3 head per task (Chen et al. 2017), the model of LibMTL's and the IMTL paper's
  NYUv2 / Cityscapes tables. Trunk: 7x7 stride-2 stem conv, 3x3 stride-2 max-pool, then four
  stages of ``layers[i]`` residual blocks (``"bottleneck"``, expansion 4, as ResNet-50 with
  ``layers=(3, 4, 6, 3)``, the default; or ``"basic"``, as ResNet-18/34); stage 2 has stride 2,
  stages 3 and 4 keep the resolution with dilation 2 and 4, so ``z`` is ``(B, C, H/8, W/8)``
  (output stride 8; C = 2048 and 23.5 M parameters for ResNet-50, as torchvision's ResNet-50
  without its classifier). Head: atrous spatial pyramid pooling (a 1x1
  branch, three 3x3 branches at dilation ``rates`` (default 12, 24, 36), an image-pooling
  branch; concatenated, 1x1 projection, dropout 0.5), a 3x3 conv, then a 1x1 conv to the
  outputs, upsampled bilinearly to the input size. The image-pooling branch has no
  BatchNorm (one value per channel and image, which BatchNorm cannot normalise in a batch of
  one). The papers start from ImageNet-pretrained weights; these models start from random
  ones (no weights are downloaded here), so expect lower numbers than the papers'.

Initialisation: Xavier normal for SegNet (as MTAN), Kaiming normal (fan out) for the ResNet,
BatchNorm weight 1 and bias 0, conv biases 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: The architecture names :func:`build_dense_model` accepts.
ARCHITECTURES: tuple[str, ...] = ("segnet", "deeplab")


def conv_bn_relu(c_in: int, c_out: int, dilation: int = 1) -> nn.Sequential:
    """A 3x3 convolution (padding keeps the size), BatchNorm and ReLU.

    >>> conv_bn_relu(3, 8)(torch.zeros(2, 3, 5, 5)).shape
    torch.Size([2, 8, 5, 5])
    """
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _stage(c_in: int, c_out: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*(conv_bn_relu(c_in if i == 0 else c_out, c_out) for i in range(layers)))


class SegNet(nn.Module):
    """SegNet encoder-decoder (the ``"segnet"`` trunk; see the module docstring).

    >>> SegNet(widths=(8, 16), convs=(1, 1))(torch.zeros(2, 3, 8, 12)).shape
    torch.Size([2, 8, 8, 12])
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512, 512),
        convs: Sequence[int] = (2, 2, 3, 3, 3),
    ) -> None:
        super().__init__()
        if len(widths) != len(convs) or not widths:
            raise ValueError(f"SegNet: widths {tuple(widths)} and convs {tuple(convs)} must be "
                             "non-empty and of one length")  # fmt: skip
        self.out_channels = widths[0]
        ins = [in_channels, *widths[:-1]]
        self.encoder = nn.ModuleList(
            _stage(i, o, n) for i, o, n in zip(ins, widths, convs, strict=True)
        )
        # Decoder stage i mirrors encoder stage i: widths[i] -> widths[i - 1] (widths[0] last).
        outs = [widths[0], *widths[:-1]]
        self.decoder = nn.ModuleList(
            _stage(w, o, n) for w, o, n in zip(widths, outs, convs, strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(B, widths[0], H, W)``."""
        side = 2 ** len(self.encoder)
        if x.shape[-2] % side or x.shape[-1] % side:
            raise ValueError(f"SegNet with {len(self.encoder)} stages needs a height and width "
                             f"divisible by {side}, got {tuple(x.shape[-2:])}")  # fmt: skip
        indices = []
        for stage in self.encoder:
            x, where = F.max_pool2d(stage(x), 2, 2, return_indices=True)
            indices.append(where)
        for stage, where in zip(reversed(self.decoder), reversed(indices), strict=True):
            x = stage(unpool(x, where))
        return x


def unpool(x: Tensor, indices: Tensor) -> Tensor:
    """The inverse of a 2x2, stride-2 max-pool with ``indices``: each value back at the
    position of its window's maximum, zeros elsewhere. What ``F.max_unpool2d`` computes, written
    with nearest upsampling and a mask, so that it is deterministic on every device (torch
    flags ``max_unpool2d`` as nondeterministic).

    >>> x = torch.tensor([[[[1.0, 5.0], [2.0, 0.0]]]])
    >>> pooled, where = F.max_pool2d(x, 2, 2, return_indices=True)
    >>> unpool(pooled, where)
    tensor([[[[0., 5.],
              [0., 0.]]]])
    """
    h, w = x.shape[-2:]
    up = x.repeat_interleave(2, -2).repeat_interleave(2, -1)
    where = indices.repeat_interleave(2, -2).repeat_interleave(2, -1)
    positions = torch.arange(4 * h * w, device=x.device).view(2 * h, 2 * w)
    return up * (where == positions)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, dilation: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _shortcut(c_in, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class DilatedResNet(nn.Module):
    """A ResNet of output stride 8: stages 3 and 4 dilated instead of strided (the
    ``"deeplab"`` trunk; see the module docstring).

    >>> net = DilatedResNet(block="basic", layers=(1, 1, 1, 1), width=4)
    >>> net(torch.zeros(2, 3, 16, 24)).shape, net.out_channels
    (torch.Size([2, 32, 2, 3]), 32)
    """

    def __init__(
        self,
        in_channels: int = 3,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        width: int = 64,
    ) -> None:
        super().__init__()
        blocks = {"bottleneck": _Bottleneck, "basic": _Basic}
        if block not in blocks or len(layers) != 4:
            raise ValueError(f"DilatedResNet: block must be one of {sorted(blocks)} and layers "
                             f"four numbers, got {block!r} and {tuple(layers)}")  # fmt: skip
        kind = blocks[block]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        c_in, stages = width, []
        plan = zip(layers, (1, 2, 1, 1), (1, 1, 2, 4), strict=True)
        for i, (n, stride, dilation) in enumerate(plan):
            stage = []
            for j in range(n):
                stage.append(kind(c_in, width * 2**i, stride if j == 0 else 1, dilation))
                c_in = width * 2**i * kind.expansion
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.out_channels = c_in

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(B, out_channels, H/8, W/8)`` (sizes rounded up)."""
        return self.stages(self.stem(x))


class ASPPHead(nn.Module):
    """DeepLab-v3 head: atrous spatial pyramid pooling, a 3x3 conv and a 1x1 conv to
    ``outputs`` channels (see the module docstring).

    >>> ASPPHead(16, 3, channels=8, rates=(1, 2, 3))(torch.zeros(2, 16, 4, 5)).shape
    torch.Size([2, 3, 4, 5])
    """

    def __init__(
        self,
        c_in: int,
        outputs: int,
        channels: int = 256,
        rates: Sequence[int] = (12, 24, 36),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        one_by_one = nn.Sequential(
            nn.Conv2d(c_in, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)
        )
        self.branches = nn.ModuleList([one_by_one, *(conv_bn_relu(c_in, channels, r)
                                                     for r in rates)])  # fmt: skip
        self.pooled = nn.Sequential(nn.Conv2d(c_in, channels, 1), nn.ReLU(inplace=True))
        width = channels * (len(rates) + 2)
        self.project = nn.Sequential(
            nn.Conv2d(width, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            conv_bn_relu(channels, channels),
            nn.Conv2d(channels, outputs, 1),
        )

    def forward(self, z: Tensor) -> Tensor:
        """Outputs at ``z``'s resolution."""
        pooled = self.pooled(F.adaptive_avg_pool2d(z, 1)).expand(-1, -1, *z.shape[-2:])
        return self.project(torch.cat([*(b(z) for b in self.branches), pooled], dim=1))


class SegNetHead(nn.Sequential):
    """MTAN's SegNet task head: a 3x3 conv keeping ``c_in`` channels, then a 1x1 conv.

    >>> SegNetHead(8, 13)(torch.zeros(1, 8, 4, 4)).shape
    torch.Size([1, 13, 4, 4])
    """

    def __init__(self, c_in: int, outputs: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, outputs, 1))


class DenseModel(nn.Module):
    """Hard parameter sharing for dense tasks: ``forward(x) = (z, {task: output})`` with
    ``z = trunk(x)`` and each output upsampled (bilinear) to the input's size if needed.

    >>> model = DenseModel(nn.Conv2d(3, 4, 1), {"depth": nn.Conv2d(4, 1, 1)})
    >>> z, out = model(torch.zeros(2, 3, 6, 6))
    >>> z.shape, out["depth"].shape
    (torch.Size([2, 4, 6, 6]), torch.Size([2, 1, 6, 6]))
    """

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(z, {task: output})``, outputs at the input's height and width."""
        z = self.trunk(x)
        outputs = {}
        for task, head in self.heads.items():
            out = head(z)
            if out.shape[-2:] != x.shape[-2:]:
                out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
            outputs[task] = out
        return z, outputs


def _initialise(model: nn.Module, conv_init: str) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if conv_init == "xavier":
                nn.init.xavier_normal_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_dense_model(
    arch: str,
    outputs: Mapping[str, int],
    in_channels: int = 3,
    options: Mapping[str, Any] | None = None,
) -> DenseModel:
    """The model ``arch`` (one of :data:`ARCHITECTURES`) with one head per task of
    ``outputs`` (``{task: output channels}``).

    ``options`` configure the trunk and heads: for ``"segnet"`` ``widths`` and ``convs``; for
    ``"deeplab"`` ``block``, ``layers``, ``width`` (the trunk), ``channels``, ``rates`` and
    ``dropout`` (the heads). Raises a one-line ``ValueError`` for an unknown architecture or
    option.

    >>> m = build_dense_model("segnet", {"seg": 13, "depth": 1},
    ...                       options={"widths": (8, 16), "convs": (1, 1)})
    >>> sorted(m(torch.zeros(2, 3, 8, 8))[1]), sum(p.numel() for p in m.trunk.parameters())
    (['depth', 'seg'], 3176)
    """
    options = dict(options or {})
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown dense architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    head_keys = {"channels", "rates", "dropout"} if arch == "deeplab" else set()
    head_options = {k: options.pop(k) for k in head_keys & set(options)}
    try:
        if arch == "segnet":
            trunk: nn.Module = SegNet(in_channels, **options)
            heads = {t: SegNetHead(trunk.out_channels, n) for t, n in outputs.items()}
        else:
            trunk = DilatedResNet(in_channels, **options)
            heads = {t: ASPPHead(trunk.out_channels, n, **head_options)
                     for t, n in outputs.items()}  # fmt: skip
    except TypeError as error:
        raise ValueError(f"bad {arch} option: {error}") from None
    model = DenseModel(trunk, heads)
    _initialise(model, "xavier" if arch == "segnet" else "kaiming")
    return model
