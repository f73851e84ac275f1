"""NYUv2, Cityscapes and dense MultiMNIST as problems: trained end to end by the harness's
runner on tiny files in the real layouts, with feature- and parameter-level methods."""

import pickle

import pytest
import torch

from support.dense_files import write_scenes
from taskbalance.bench.dense.metrics import DepthMetric, SegmentationMetric
from taskbalance.bench.dense.problems import cityscapes, dense_tasks, nyuv2
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
    assert set(result.test_metrics) == {"segmentation", "depth", "normal"}
    assert 0 <= result.test_metrics["segmentation"] <= 1
    assert result.test_metrics["depth"] > 0 and 0 < result.test_metrics["normal"] < 180


def test_cityscapes_trains_a_deeplab_model_at_feature_level(tmp_path):
    root = write_scenes(tmp_path, "cityscapes", (8, 3), shape=(16, 32), classes=7)
    runner, result = run(cityscapes(str(root), arch="deeplab", **TINY_DEEPLAB), "imtl")
    assert result.status == "ok" and set(result.test_metrics) == {"segmentation", "depth"}
    # The reported test metrics are the whole split's, whatever the evaluation batches: the same
    # numbers from one batch of every test image.
    x, y = runner.problem.test.batch(torch.arange(3))
    runner.model.eval()
    with torch.no_grad():
        _, out = runner.model(x)
    seg, depth = SegmentationMetric(7), DepthMetric()
    seg.update(out["segmentation"], y["segmentation"])
    depth.update(out["depth"], y["depth"])
    assert result.test_metrics["segmentation"] == pytest.approx(seg.compute()["miou"], rel=1e-6)
    assert result.test_metrics["depth"] == pytest.approx(depth.compute()["abs_err"], rel=1e-6)


def test_a_single_task_baseline_builds_one_head(tmp_path):
    problem = nyuv2(str(write_scenes(tmp_path, "nyuv2", (6, 2))), **TINY_SEGNET)
    runner, result = run(problem, tasks=("depth",))
    assert list(runner.model.heads) == ["depth"] and list(result.test_metrics) == ["depth"]


def test_a_problem_pickles_for_worker_processes(tmp_path):
    problem = nyuv2(str(write_scenes(tmp_path, "nyuv2", (6, 2))), **TINY_SEGNET)
    again = pickle.loads(pickle.dumps(problem))
    assert again.key == problem.key and again.task_names == problem.task_names
    assert sum(p.numel() for p in again.model(("depth",)).parameters()) > 0


def test_the_fingerprint_follows_the_data(tmp_path):
    root = str(write_scenes(tmp_path, "nyuv2", (10, 2)))
    a, b = nyuv2(root, **TINY_SEGNET), nyuv2(root, seed=1, **TINY_SEGNET)
    assert a.key == nyuv2(root, **TINY_SEGNET).key and a.key != b.key


def test_headline_metrics_and_their_directions():
    tasks = dense_tasks((DenseTarget("s", "segmentation", 3), DenseTarget("d", "depth", 1),
                         DenseTarget("n", "normal", 3)))  # fmt: skip
    assert [(t.metric_name, t.higher_is_better) for t in tasks] == [
        ("miou", True), ("abs_err", False), ("mean", False)
    ]  # fmt: skip
    accumulator = tasks[1].accumulator()
    accumulator.update(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]))
    assert accumulator.compute() == 1.0 and tasks[1].accumulator() is not accumulator


@pytest.mark.parametrize("options, message", [
    ({"widths": "4,x"}, "widths=4,x: expected integers separated by commas"),
    ({"arch": "unet"}, "unknown dense architecture 'unet'"),
    ({"depth": 3}, "bad segnet option"),
])  # fmt: skip
def test_bad_model_options_fail_before_training(tmp_path, options, message):
    root = str(write_scenes(tmp_path, "nyuv2", (4, 2)))
    with pytest.raises(ValueError, match=message):
        nyuv2(root, **options)
