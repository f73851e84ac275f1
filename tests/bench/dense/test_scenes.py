"""NYUv2 and Cityscapes loaders on tiny files written in the preprocessed MTAN/LibMTL layout."""

import shutil

import numpy as np
import pytest
import torch

from support.dense_files import write_scenes
from taskbalance.bench.dense.scenes import LayoutError, load_cityscapes, load_nyuv2


def test_nyuv2_reads_every_file_channels_first_with_void_and_missing_kept(tmp_path):
    root = write_scenes(tmp_path, "nyuv2", sizes=(10, 3))
    data = load_nyuv2(root, seed=0)
    assert data.task_names == ("segmentation", "depth", "normal")
    assert (len(data.train), len(data.val), len(data.test)) == (9, 1, 3)
    x, y = data.test.batch(torch.arange(3))
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 3, 8, 16)
    assert y["segmentation"].dtype == torch.int64 and tuple(y["segmentation"].shape) == (3, 8, 16)
    assert tuple(y["depth"].shape) == (3, 1, 8, 16) and tuple(y["normal"].shape) == (3, 3, 8, 16)
    image = np.load(root / "val" / "image" / "2.npy")  # (H, W, 3)
    np.testing.assert_allclose(x[2].numpy(), np.moveaxis(image, -1, 0).astype(np.float32))
    label = np.load(root / "val" / "label" / "1.npy")
    np.testing.assert_array_equal(y["segmentation"][1].numpy(), label.astype(np.int64))
    assert (y["segmentation"] == -1).any() and (y["depth"] == 0).any()
    normal = np.load(root / "val" / "normal" / "0.npy")
    np.testing.assert_allclose(y["normal"][0].numpy(), np.moveaxis(normal, -1, 0), rtol=1e-6)


def test_validation_is_a_seeded_held_out_part_of_train(tmp_path):
    root = write_scenes(tmp_path, "nyuv2", sizes=(10, 2))
    every = {tuple(np.load(root / "train" / "image" / f"{i}.npy")[0, 0]) for i in range(10)}

    def firsts(split):
        return {tuple(row) for row in split.inputs[:, :, 0, 0].double().numpy().round(6)}

    a, b = load_nyuv2(root, val_size=3, seed=1), load_nyuv2(root, val_size=3, seed=1)
    assert torch.equal(a.val.inputs, b.val.inputs)
    assert not firsts(a.train) & firsts(a.val)
    assert len(firsts(a.train) | firsts(a.val)) == len(every) == 10
    other = load_nyuv2(root, val_size=3, seed=2)
    assert not torch.equal(other.val.inputs, a.val.inputs)


@pytest.mark.parametrize("folder", ["label_7", "label"])  # MTAN's release, LibMTL's copy
def test_cityscapes_reads_seven_classes_from_either_copy(tmp_path, folder):
    layout = {"image": 3, folder: None, "depth": 1}
    root = write_scenes(tmp_path, "cityscapes", (5, 2), (4, 8), classes=7, folders=layout)
    data = load_cityscapes(root)
    assert data.task_names == ("segmentation", "depth")
    assert data.targets[0].channels == 7 and data.in_channels == 3
    assert int(data.test.targets["segmentation"].max()) <= 6


def test_cityscapes_nineteen_classes_come_from_label_19(tmp_path):
    layout = {"image": 3, "label_19": None, "depth": 1}
    root = write_scenes(tmp_path, "cityscapes", (5, 2), (4, 8), classes=19, folders=layout)
    assert load_cityscapes(root, classes=19).targets[0].channels == 19
    with pytest.raises(LayoutError, match="no label_7 or label folder"):
        load_cityscapes(root)


def one_line(error):
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_missing_or_empty_root_is_a_one_line_error(tmp_path):
    with pytest.raises(LayoutError) as error:
        load_nyuv2(tmp_path / "absent")
    assert "is not a folder" in one_line(error)
    with pytest.raises(LayoutError) as error:
        load_nyuv2(tmp_path)
    assert "has no .npy files" in one_line(error) and "docs/dense.md" in one_line(error)


def test_a_missing_target_folder_or_file_is_a_one_line_error(tmp_path):
    root = write_scenes(tmp_path, "nyuv2", sizes=(4, 2))
    (root / "val" / "depth" / "1.npy").unlink()
    with pytest.raises(LayoutError) as error:
        load_nyuv2(root)
    assert "val/depth (task 'depth') does not hold one file per image" in one_line(error)
    shutil.rmtree(root / "val" / "depth")
    with pytest.raises(LayoutError) as error:
        load_nyuv2(root)
    assert "has no depth folder for task 'depth'" in one_line(error)


def test_an_extra_file_or_a_gap_in_the_numbering_is_an_error(tmp_path):
    root = write_scenes(tmp_path, "nyuv2", sizes=(4, 2))
    np.save(root / "train" / "normal" / "4.npy", np.zeros((8, 16, 3)))
    with pytest.raises(LayoutError, match="does not hold one file per image"):
        load_nyuv2(root)
    (root / "train" / "image" / "1.npy").rename(root / "train" / "image" / "7.npy")
    with pytest.raises(LayoutError, match=r"train/image are not numbered 0 \.\. 3"):
        load_nyuv2(root)


def test_a_wrong_shape_or_label_is_a_one_line_error(tmp_path):
    root = write_scenes(tmp_path, "nyuv2", sizes=(4, 2))
    np.save(root / "train" / "normal" / "2.npy", np.zeros((8, 16, 2)))
    with pytest.raises(LayoutError) as error:
        load_nyuv2(root)
    assert "2.npy has shape (8, 16, 2); expected (8, 16, 3)" in one_line(error)
    np.save(root / "train" / "normal" / "2.npy", np.zeros((8, 16, 3)))
    np.save(root / "val" / "label" / "0.npy", np.full((8, 16), 13.0))
    with pytest.raises(LayoutError) as error:
        load_nyuv2(root)
    assert "has label 13 for 13 classes" in one_line(error)
