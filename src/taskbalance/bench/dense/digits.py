"""Dense MultiMNIST: scenes of real MNIST digits at different depths, with per-pixel
segmentation, depth and surface normals. THE GEOMETRY IS SYNTHETIC: the digits are real, the
depths, relief, floor and lighting are made up here, so numbers on it say how methods compare on
a dense three-task problem, not how they do on real scenes (NYUv2, Cityscapes).

A scene (``canvas`` x ``canvas`` pixels, ``digits`` digits), deterministic from ``seed``:

* **Camera and floor.** Pixel (row, column); depth grows away from the camera. The background
  is a floor plane whose depth falls linearly from 4 at the top row to 3 at the bottom one.
* **Digits.** Each digit is an MNIST image standing upright at a depth ``d`` drawn uniformly
  from [1, 2], seen in perspective: its 28 x 28 box spans ``0.75 * canvas / d`` pixels (12 to
  24 on a 32-pixel canvas), at a uniformly drawn position inside the canvas (bilinear
  sampling). Its ink ``I`` in [0, 1] is raised toward the camera: depth ``d - 0.05 I``. A
  nearer digit hides a farther one wherever its ink exceeds 0.1.
* **Segmentation** (11 classes): the digit's label (0-9) where the front ink is >= 0.5, 10 for
  the floor, and void (-1) on the faint rim (0.1 < ink < 0.5) whose owner is ambiguous.
* **Depth** ``(1, H, W)``: the depth above, 0 (missing) on void pixels.
* **Normals** ``(3, H, W)``, x to the right, y down, z toward the camera: ``(dD/dx, dD/dy, 1)``
  normalised, with ``D`` the depth map and x, y in scene units (a pixel at depth ``D`` is
  ``D / (0.75 * canvas)`` wide), central differences; (0, 0, 0) (missing) on void pixels and on
  occlusion edges (a 4-neighbour owned by another digit or the floor).
* **Image** (one channel): Lambertian shading of that geometry, ``albedo * (0.3 + 0.7 max(0,
  n . l))`` with light ``l`` from the upper right front, albedo 0.25 for the floor and ``0.25
  + 0.75 I`` for a digit; standardised with the mean and std of the training images.

Splits, as in :mod:`taskbalance.bench.data.multimnist`: a seeded tenth of the MNIST *training*
images is held out, validation scenes draw their digits from it and training scenes from the
rest; test scenes draw from the MNIST test file. Digits are drawn uniformly with replacement.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from taskbalance.bench.data.multimnist import load_raw_images
from taskbalance.bench.data.types import split_indices
from taskbalance.bench.problem import TensorData

from .scenes import DenseData, DenseTarget

PathLike = str | os.PathLike[str]

NEAR, FAR = 1.0, 2.0  # digit depths
FLOOR_TOP, FLOOR_BOTTOM = 4.0, 3.0
RELIEF = 0.05
COVER, INK = 0.1, 0.5  # ink that hides what is behind; ink that is labelled
BACKGROUND = 10
_LIGHT = (0.3, -0.5, 1.0)
_CHUNK = 2048  # scenes rendered at once (memory ~ chunk * digits * canvas^2 floats)

TARGETS = (
    DenseTarget("segmentation", "segmentation", 11),
    DenseTarget("depth", "depth", 1),
    DenseTarget("normal", "normal", 3),
)


def _place(images: Tensor, depth: Tensor, corner: Tensor, canvas: int) -> Tensor:
    """Ink of each digit on the canvas: ``images`` (N, 28, 28) uint8 at depths (N,), the box's
    top-left ``corner`` (N, 2) = (x, y) in pixels; returns (N, canvas, canvas) in [0, 1]."""
    side = 0.75 * canvas / depth  # the digit box in pixels
    centres = torch.arange(canvas, dtype=torch.float64) + 0.5
    u = (centres - corner[:, :1]) / side[:, None] * 2 - 1  # (N, canvas): -1 .. 1 across the box
    v = (centres - corner[:, 1:]) / side[:, None] * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1)
    ink = F.grid_sample(images[:, None].float() / 255, grid.float(), align_corners=False)
    return ink[:, 0]


def render(
    images: Tensor, labels: Tensor, depths: Tensor, corners: Tensor, canvas: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Render scenes (see the module docstring) from ``images`` (N, K, 28, 28) uint8, their
    ``labels`` (N, K), ``depths`` (N, K) and the top-left ``corners`` (N, K, 2) = (x, y) of
    their boxes in pixels. Returns the unnormalised image (N, 1, H, W) and the targets
    ``segmentation`` (N, H, W) int64, ``depth`` (N, 1, H, W), ``normal`` (N, 3, H, W).

    >>> x, y = render(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8), torch.tensor([[3],
    ...               [7]]), torch.ones(2, 1), torch.full((2, 1, 2), 4.0), 32)
    >>> x.shape, sorted(y["segmentation"].unique().tolist())
    (torch.Size([2, 1, 32, 32]), [3, 7, 10])
    """
    n, k = labels.shape
    depths = depths.double()
    flat = _place(images.flatten(0, 1), depths.flatten(), corners.flatten(0, 1).double(), canvas)
    ink = flat.view(n, k, canvas, canvas)
    covered = ink > COVER
    near = torch.where(covered, depths[:, :, None, None].float(), math.inf)
    front = near.argmin(dim=1, keepdim=True)  # (N, 1, H, W): the nearest covering digit
    on_digit = covered.any(dim=1)
    front_ink = ink.gather(1, front)[:, 0]
    rows = torch.linspace(FLOOR_TOP, FLOOR_BOTTOM, canvas).view(1, canvas, 1)
    digit_depth = depths.float().gather(1, front.flatten(1)).view(n, canvas, canvas)
    geometry = torch.where(on_digit, digit_depth - RELIEF * front_ink, rows.expand(n, -1, canvas))
    owner = torch.where(on_digit, front[:, 0], -1)
    void = on_digit & (front_ink < INK)
    front_label = labels.gather(1, front.flatten(1)).view(n, canvas, canvas)
    segmentation = torch.where(on_digit, front_label, BACKGROUND).masked_fill(void, -1)

    normal = _normals(geometry, canvas)
    light = torch.tensor(_LIGHT) / torch.tensor(_LIGHT).norm()
    shade = 0.3 + 0.7 * (normal * light.view(1, 3, 1, 1)).sum(1).clamp_min(0)
    albedo = torch.where(on_digit, 0.25 + 0.75 * front_ink, 0.25)
    edge = _edges(owner)
    return (albedo * shade)[:, None], {
        "segmentation": segmentation,
        "depth": geometry.masked_fill(void, 0.0)[:, None],
        "normal": normal.masked_fill((void | edge)[:, None], 0.0),
    }


def _normals(depth: Tensor, canvas: int) -> Tensor:
    """Unit normals (N, 3, H, W) of a depth map (N, H, W), x right, y down, z to the camera."""
    padded = F.pad(depth[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    scale = 0.75 * canvas / depth / 2  # central difference over two pixels, in scene units
    dx = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) * scale
    dy = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) * scale
    return F.normalize(torch.stack([dx, dy, torch.ones_like(dx)], dim=1), dim=1)


def _edges(owner: Tensor) -> Tensor:
    """Pixels with a 4-neighbour of another owner (occlusion edges), (N, H, W) bool."""
    padded = F.pad(owner[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0]
    centre = padded[:, 1:-1, 1:-1]
    shifts = (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:])
    return torch.stack([s != centre for s in shifts]).any(0)


def _scenes(
    raw: tuple[Tensor, Tensor], pool: Tensor, n: int, digits: int, canvas: int, g: torch.Generator
) -> tuple[Tensor, dict[str, Tensor]]:
    images, labels = raw
    chosen = pool[torch.randint(len(pool), (n, digits), generator=g)]
    depths = NEAR + (FAR - NEAR) * torch.rand(n, digits, generator=g, dtype=torch.float64)
    free = canvas - 0.75 * canvas / depths  # room left for the box's corner, per axis
    corners = torch.rand(n, digits, 2, generator=g, dtype=torch.float64) * free[..., None]
    chunks = zip(chosen.split(_CHUNK), depths.split(_CHUNK), corners.split(_CHUNK), strict=True)
    parts = [render(images[c], labels[c], d, xy, canvas) for c, d, xy in chunks]
    x = torch.cat([p[0] for p in parts])
    return x, {t.name: torch.cat([p[1][t.name] for p in parts]) for t in TARGETS}


def load_dense_multi_mnist(
    size: int = 3_000,
    test_size: int = 1_000,
    *,
    val_size: int | None = None,
    canvas: int = 32,
    digits: int = 2,
    seed: int = 0,
    root: PathLike | None = None,
    cache_dir: PathLike | None = None,
) -> DenseData:
    """Dense MultiMNIST (synthetic geometry; see the module docstring): ``size`` scenes drawn
    from the MNIST training file, ``val_size`` of them (default a tenth) for validation, and
    ``test_size`` test scenes from the test file.

    MNIST is read as :func:`taskbalance.bench.data.multimnist.load_raw_images` reads it
    (``root``: a folder with the IDX files; else the cached registry copy).

    >>> data = load_dense_multi_mnist(200, 50)  # doctest: +SKIP
    >>> data.task_names  # doctest: +SKIP
    ('segmentation', 'depth', 'normal')
    """
    n_val = size // 10 if val_size is None else val_size
    if size - n_val < 1 or n_val < 1 or test_size < 1 or digits < 1 or canvas < 8:
        raise ValueError(f"dense_multi_mnist: size={size}, val_size={n_val}, test_size="
                         f"{test_size}, digits={digits}, canvas={canvas} leave an empty split "
                         "or scene (canvas >= 8)")  # fmt: skip
    raw = load_raw_images("mnist", root=root, cache_dir=cache_dir)
    n_train_images = len(raw["train"][1])
    kept, held = split_indices(n_train_images, (n_train_images - n_train_images // 10,
                                                n_train_images // 10), seed)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    splits = [
        _scenes(raw["train"], kept, size - n_val, digits, canvas, g),
        _scenes(raw["train"], held, n_val, digits, canvas, g),
        _scenes(raw["test"], torch.arange(len(raw["test"][1])), test_size, digits, canvas, g),
    ]
    mean, std = float(splits[0][0].mean()), float(splits[0][0].std())
    train, val, test = (TensorData((x - mean) / std, y) for x, y in splits)
    description = (
        f"dense MultiMNIST, SYNTHETIC GEOMETRY: {digits} real MNIST digits at random depths on "
        f"a {canvas}x{canvas} floor scene, 11-class segmentation, depth, normals; "
        f"{size - n_val} / {n_val} / {test_size} train / val / test scenes, seed {seed}; "
        f"image normalised with train mean {mean:.4f}, std {std:.4f}"
    )
    return DenseData("dense_multi_mnist", TARGETS, train, val, test, description,
                     "MNIST: CC BY-SA 3.0 (scenes generated by taskbalance)")  # fmt: skip
