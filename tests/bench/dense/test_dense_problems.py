"""NYUv2, Cityscapes and dense MultiMNIST as problems: trained end to end by the harness's
runner on tiny files in the real layouts, with feature- and parameter-level methods."""

import pickle

import pytest
import torch

from support.dense_files import write_scenes
from taskbalance.bench.dense.metrics import METRICS, DepthMetric, SegmentationMetric
from taskbalance.bench.dense.problems import cityscapes, dense_tasks, full_metric, nyuv2
from taskbalance.bench.dense.scenes import DenseTarget
from taskbalance.bench.runner import MethodSpec, RunConfig, Runner

TINY_SEGNET = {"widths": "4,8", "convs": "1,1"}
TINY_DEEPLAB = {"block": "basic", "layers": "1,1,1,1", "width": 4, "channels": 8, "rates": "1,2"}


def run(problem, method="ew", epochs=1, tasks=None):
    config = RunConfig(method=MethodSpec(method), tasks=tasks, epochs=epochs, batch_size=4)
    runner = Runner(problem, config, progress=False)
    return runner, runner.run()


@pytest.mark.parametrize("method", ["ew", "imtl", "mgda"])  # loss, feature and parameter level
def test_nyuv2_trains_end_to_end_on_files_in_the_mtan_layout(tmp_path, method):
    problem = nyuv2(str(write_scenes(tmp_path, "nyuv2", (8, 3))), **TINY_SEGNET)
    _, result = run(problem, method)
    assert result.status == "ok" and result.best_epoch == 1
    assert list(result.test_metrics) == [f"{task}/{m}" for task in ("segmentation", "depth",
                                         "normal") for m in METRICS[task]]  # fmt: skip
    m = result.test_metrics
    assert 0 <= m["segmentation/miou"] <= m["segmentation/pixel_acc"] <= 1
    assert m["depth/abs_err"] > 0 and 0 <= m["normal/median"] < 180
    assert m["normal/within_11.25"] <= m["normal/within_22.5"] <= m["normal/within_30"] <= 1


def test_cityscapes_trains_a_deeplab_model_at_feature_level(tmp_path):
    root = write_scenes(tmp_path, "cityscapes", (8, 3), shape=(16, 32), classes=7)
    runner, result = run(cityscapes(str(root), arch="deeplab", **TINY_DEEPLAB), "imtl")
    assert result.status == "ok" and len(result.test_metrics) == 4
    # The reported test metrics are the whole split's, whatever the evaluation batches: the same
    # numbers from one batch of every test image.
    x, y = runner.problem.test.batch(torch.arange(3))
    runner.model.eval()
    with torch.no_grad():
        _, out = runner.model(x)
    seg, depth = SegmentationMetric(7), DepthMetric()
    seg.update(out["segmentation"], y["segmentation"])
    depth.update(out["depth"], y["depth"])
    expected = {f"{task}/{k}": v for task, metric in (("segmentation", seg), ("depth", depth))
                for k, v in metric.compute().items()}  # fmt: skip
    assert result.test_metrics == pytest.approx(expected, rel=1e-6)


def test_a_single_task_baseline_builds_one_head(tmp_path):
    problem = nyuv2(str(write_scenes(tmp_path, "nyuv2", (6, 2))), **TINY_SEGNET)
    runner, result = run(problem, tasks=("depth",))
    assert list(runner.model.heads) == ["depth"]
    assert list(result.test_metrics) == ["depth/abs_err", "depth/rel_err"]


def test_a_problem_pickles_for_worker_processes(tmp_path):
    problem = nyuv2(str(write_scenes(tmp_path, "nyuv2", (6, 2))), **TINY_SEGNET)
    again = pickle.loads(pickle.dumps(problem))
    assert again.key == problem.key and again.task_names == problem.task_names
    assert sum(p.numel() for p in again.model(("depth",)).parameters()) > 0


def test_the_fingerprint_follows_the_data(tmp_path):
    root = str(write_scenes(tmp_path, "nyuv2", (10, 2)))
    a, b = nyuv2(root, **TINY_SEGNET), nyuv2(root, seed=1, **TINY_SEGNET)
    assert a.key == nyuv2(root, **TINY_SEGNET).key and a.key != b.key


def test_every_standard_metric_is_reported_with_its_direction():
    tasks = dense_tasks((DenseTarget("s", "segmentation", 3), DenseTarget("d", "depth", 1),
                         DenseTarget("n", "normal", 3)))  # fmt: skip
    higher = {k for t in tasks for k, up in t.directions.items() if up}
    assert higher == {"s/miou", "s/pixel_acc", "n/within_11.25", "n/within_22.5", "n/within_30"}
    assert sum(len(t.metric_keys) for t in tasks) == 9
    accumulator = tasks[1].accumulator()
    accumulator.update(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]))
    assert tasks[1].values(accumulator.compute()) == {"d/abs_err": 1.0, "d/rel_err": 0.5}
    assert tasks[1].accumulator() is not accumulator


def test_each_accumulator_computes_exactly_the_names_its_kind_declares():
    kinds = (("segmentation", 2), ("depth", 1), ("normal", 3))
    seg, depth, normal = (full_metric(DenseTarget("x", kind, c)) for kind, c in kinds)
    seg.update(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))
    depth.update(torch.ones(1, 1, 1), torch.ones(1, 1, 1))
    normal.update(torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    for kind, metric in (("segmentation", seg), ("depth", depth), ("normal", normal)):
        assert tuple(metric.compute()) == METRICS[kind]


@pytest.mark.parametrize("options, message", [
    ({"widths": "4,x"}, "widths=4,x: expected integers separated by commas"),
    ({"arch": "unet"}, "unknown dense architecture 'unet'"),
    ({"depth": 3}, "bad segnet option"),
])  # fmt: skip
def test_bad_model_options_fail_before_training(tmp_path, options, message):
    root = str(write_scenes(tmp_path, "nyuv2", (4, 2)))
    with pytest.raises(ValueError, match=message):
        nyuv2(root, **options)
