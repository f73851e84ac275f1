"""The accelerator path: a step whose tensors live off the CPU reads nothing back to the host,
and its device solvers give the host solvers' answers.

No value read: the step runs on the meta device, which holds no values, so any read (``.item()``,
``bool(tensor)``, ``.cpu()``, ``.numpy()``, ``.tolist()``) raises; a dispatch mode also counts
``aten._local_scalar_dense`` (what every scalar read dispatches to) and copies to the CPU, so a
failure names what read. Same answers: the solvers run on CPU tensors inside
:func:`taskbalance.engine.placement.device_resident` against the host solvers, and whole steps
are compared ``.grad`` for ``.grad``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import taskbalance
from taskbalance.engine.placement import device_resident, on_accelerator
from taskbalance.errors import InvalidLossError
from taskbalance.methods import _device_solvers
from taskbalance.methods._simplex import nonnegative_qp, power_equation, simplex_qp
from taskbalance.methods.cagrad import cagrad_weights
from taskbalance.methods.imtl_g import imtl_g_weights
from taskbalance.methods.mgda import mgda_weights
from taskbalance.methods.upgrad import upgrad_weights

GRADIENT_METHODS = ["imtl_g", "imtl", "mgda", "emtl", "cagrad", "upgrad", "nash_mtl"]
LOSS_METHODS = [
    name
    for name in taskbalance.list_methods()
    if taskbalance.get_method(name, tasks=2).requires is taskbalance.Requirement.LOSSES
    and name != "famo"  # its update reminder reads a flag: documented as one read per step
]


class HostReads(TorchDispatchMode):
    """Records every operator that brings a value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_cpu = func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device(
            "cpu"
        )
        if func is torch.ops.aten._local_scalar_dense.default or to_cpu:
            self.reads.append(str(func))
        return func(*args, **kwargs)


def _meta_step(method: taskbalance.Method) -> taskbalance.StepInfo:
    trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16)).to("meta")
    heads = [nn.Linear(16, 1).to("meta") for _ in range(3)]
    z = trunk(torch.empty(4, 8, device="meta"))
    losses = {f"t{i}": head(z).pow(2).mean() for i, head in enumerate(heads)}
    return method.backward(losses, shared=trunk, features=z, on_nonfinite="propagate")


@pytest.mark.parametrize("level", ["feature", "parameter"])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_read_nothing_back(name, level):
    method = taskbalance.get_method(name, tasks=3, level=level).to("meta")
    with HostReads() as mode:
        for _ in range(2):  # the second step runs with the state the first one left
            info = _meta_step(method)
    assert mode.reads == []
    assert info.gradient_weights.device.type == "meta"  # the record stays on the device
    assert info.cosines.device.type == "meta"


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_loss_methods_read_nothing_back(name):
    method = taskbalance.get_method(name, tasks=3).to("meta")
    with HostReads() as mode:
        for _ in range(3):
            _meta_step(method)
    assert mode.reads == []


def test_the_finiteness_check_is_the_one_read():
    """``on_nonfinite="raise"`` (the default) reads the losses back, and the detector records
    it before the meta device refuses: a passing no-read test means something."""
    method = taskbalance.IMTLG().to("meta")
    trunk = nn.Linear(4, 4).to("meta")
    z = trunk(torch.empty(2, 4, device="meta"))
    with HostReads() as mode, pytest.raises((RuntimeError, NotImplementedError)):
        method.backward([z.sum(), z.mean()], features=z)
    assert mode.reads == ["aten._to_copy.default"]


def _gramians(num: int, count: int, seed: int) -> list[torch.Tensor]:
    """Full-rank Gramians with gradient norms up to 100 apart (float64)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        g = torch.randn(num, 3 * num, generator=gen, dtype=torch.float64)
        g = g * torch.logspace(0, i % 3, num, dtype=torch.float64)[:, None]
        out.append(g @ g.T)
    return out


SOLVERS = {
    "imtl_g": imtl_g_weights,
    "mgda": mgda_weights,
    "upgrad": upgrad_weights,
    "cagrad": lambda k: cagrad_weights(k, c=0.5),
    "nash_mtl": lambda k: power_equation(k, 1.0),
}


@pytest.mark.parametrize("num", [2, 3, 5, 8])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_device_solvers_give_the_host_answers(name, num):
    solve = SOLVERS[name]
    for k in _gramians(num, 6, seed=num):
        host = solve(k)
        with device_resident():
            device = solve(k)
        torch.testing.assert_close(device, host, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", ["imtl_g", "mgda", "upgrad", "cagrad"])
def test_device_solvers_on_singular_gramians(name):
    """Identical gradients, more tasks than dimensions, a zero gradient: where the weights are
    not unique, the combined update ``G^T a`` is; identical gradients get the host's equal
    split."""
    gen = torch.Generator().manual_seed(3)
    cases = []
    g = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    cases.append(torch.stack([g[0], g[0], g[1]]))  # identical
    cases.append(torch.randn(6, 3, generator=gen, dtype=torch.float64))  # rank 3 of 6
    cases.append(torch.stack([g[0], torch.zeros(5, dtype=torch.float64), g[1]]))  # zero
    for g in cases:
        k = g @ g.T
        host = SOLVERS[name](k)
        with device_resident():
            device = SOLVERS[name](k)
        gap = g.T @ (device - host)
        assert gap.norm() <= 1e-8 * k.diagonal().sum().sqrt()
    same = torch.ones(2, 2, dtype=torch.float64)
    with device_resident():
        torch.testing.assert_close(SOLVERS[name](same), SOLVERS[name](same.clone()))


def test_qps_against_their_optimality_conditions():
    """Every face at once, checked on its own terms: the KKT conditions of both QPs."""
    for k in _gramians(5, 4, seed=11):
        with device_resident():
            a = simplex_qp(k)
            x = nonnegative_qp(k, k / 5)
        gradient = k @ a
        level = a @ gradient
        assert torch.all(a >= 0) and torch.isclose(a.sum(), torch.tensor(1.0, dtype=k.dtype))
        assert torch.all(gradient >= level - 1e-9 * level.abs())
        torch.testing.assert_close(gradient[a > 1e-12], level.expand(int((a > 1e-12).sum())))
        residual = x @ k + k / 5  # (P, T) gradients of the P problems
        assert torch.all(x >= 0) and torch.all(residual >= -1e-9)
        assert (x * residual).abs().max() <= 1e-9


def test_symmetric_eigh_reconstructs():
    gen = torch.Generator().manual_seed(5)
    for num in (1, 2, 5, 12):
        m = torch.randn(num, num, generator=gen, dtype=torch.float64)
        m = m + m.T
        values, vectors = _device_solvers.symmetric_eigh(m)
        torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, m)
        torch.testing.assert_close(vectors.T @ vectors, torch.eye(num, dtype=torch.float64))
        torch.testing.assert_close(values.sort().values, torch.linalg.eigvalsh(m))


def test_face_solvers_refuse_too_many_tasks():
    k = torch.eye(_device_solvers.FACE_LIMIT + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="up to 12 tasks; got 13"):
        _device_solvers.simplex_qp(k)


def test_many_tasks_solve_on_the_host():
    """Above the face limit the methods fall back to the host solvers (one read)."""
    k = torch.eye(_device_solvers.FACE_LIMIT + 1, dtype=torch.float64)
    with device_resident():
        weights = mgda_weights(k)
    torch.testing.assert_close(weights, torch.full_like(weights, 1.0 / k.shape[0]))


def _net(seed: int) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8)).double()
    heads = [nn.Linear(8, 1).double() for _ in range(3)]
    return trunk, heads


def _grads_after(name: str, level: str, resident: bool) -> list[torch.Tensor]:
    trunk, heads = _net(0)
    method = taskbalance.get_method(name, tasks=3, level=level).double()
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
        z = trunk(x)
        losses = [(head(z) - t).pow(2).mean() for t, head in enumerate(heads)]
        with device_resident(resident):
            method.backward(losses, shared=trunk, features=z)
    return [p.grad for p in trunk.parameters()]


@pytest.mark.parametrize("level", ["feature", "parameter"])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_whole_step_agrees_with_the_host_path(name, level):
    host = _grads_after(name, level, resident=False)
    device = _grads_after(name, level, resident=True)
    for h, d in zip(host, device, strict=True):
        torch.testing.assert_close(d, h, rtol=1e-7, atol=1e-10)


def test_propagate_lets_a_nan_through_like_a_plain_backward():
    trunk = nn.Linear(3, 3)
    z = trunk(torch.ones(2, 3))
    losses = [z.sum() * float("nan"), z.pow(2).mean()]
    info = taskbalance.EW().backward(losses, shared=trunk, on_nonfinite="propagate")
    assert not info.skipped
    assert torch.isnan(trunk.weight.grad).all()


def test_placement():
    assert not on_accelerator(torch.zeros(1))
    assert on_accelerator(torch.zeros(1, device="meta"))
    with device_resident():
        assert on_accelerator(torch.zeros(1))
    assert not on_accelerator(torch.zeros(1))


def test_a_task_off_the_shared_part_is_named_without_reading_its_norm():
    """On the accelerator path the zero norm is not read; the graph names the task."""
    trunk, head = nn.Linear(3, 3), nn.Linear(3, 1)
    x = torch.ones(2, 3)
    losses = {"on": head(trunk(x)).sum(), "off": head(x).sum()}
    with device_resident(), pytest.raises(InvalidLossError, match="task 'off' does not depend"):
        taskbalance.IMTLG(level="parameter").backward(losses, shared=trunk)
