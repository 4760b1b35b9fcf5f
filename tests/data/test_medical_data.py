"""The datasets of 2-D slices of 3-D volumes: Synapse in TransUNet's layout (generated files) and the procedural
CT-like volumes; their volume tags through the collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import SYNAPSE_SHAPE, SYNAPSE_TEST, SYNAPSE_TRAIN, synapse_folder, synapse_slice
from mal.data import (
    DATASETS,
    IMAGENET_MEAN,
    SYNAPSE_CLASSES,
    VOLUME_CLASSES,
    ProceduralVolumesDataset,
    build_dataset,
    collate,
    heldout_split,
)

pytest.importorskip("h5py")

# ---------------------------------------------------------------------------------------------------- Synapse


def test_synapse_is_registered_with_transunets_organ_order():
    assert DATASETS["synapse"].__name__ == "SynapseDataset" and heldout_split("synapse") == "test"
    assert SYNAPSE_CLASSES[1:] == ("aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas",
                                   "spleen", "stomach")  # fmt: skip


def test_synapse_train_slices_come_as_stored(tmp_path):
    root = synapse_folder(tmp_path / "Synapse")
    ds = build_dataset("synapse", "train", root=root, load_size=SYNAPSE_SHAPE)
    assert len(ds) == sum(SYNAPSE_TRAIN.values()) and ds.volumes == [] and ds.channels == 1
    image, target = ds[4]  # the list's 5th name: case0006_slice001
    want_image, want_label = synapse_slice(6, 1)
    assert image.dtype == torch.float32 and image.shape == (1, *SYNAPSE_SHAPE)
    torch.testing.assert_close(image[0], torch.from_numpy(want_image))
    assert target["mask"].dtype == torch.int64 and torch.equal(target["mask"], torch.from_numpy(want_label).long())
    assert not target["depth"].any() and "volume" not in target


def test_synapse_test_volumes_are_slices_in_order_with_tags(tmp_path):
    root = synapse_folder(tmp_path / "Synapse")
    ds = build_dataset("synapse", "test", root=root, load_size=SYNAPSE_SHAPE, spacing=[3.0, 0.8, 0.7])
    # the list's order (case0002 first), one sample per slice
    assert [(v.name, v.start, v.stop) for v in ds.volumes] == [("case0002", 0, 3), ("case0001", 3, 7)]
    assert len(ds) == sum(SYNAPSE_TEST.values())
    image, target = ds[5]  # case0001, slice 2
    torch.testing.assert_close(image[0], torch.from_numpy(synapse_slice(1, 2)[0]))
    assert torch.equal(target["mask"], torch.from_numpy(synapse_slice(1, 2)[1]).long())
    assert int(target["volume"]) == 1 and int(target["slice"]) == 2
    assert target["spacing"].tolist() == [3.0, 0.8, 0.7]


def test_synapse_resizes_image_bilinear_mask_nearest_and_rescales_the_spacing(tmp_path):
    root = synapse_folder(tmp_path / "Synapse")
    ds = build_dataset("synapse", "test", root=root, load_size=(48, 10), channels=3)
    image, target = ds[0]
    assert image.shape == (3, 48, 10) and torch.equal(image[0], image[2])
    assert set(target["mask"].unique().tolist()) <= set(np.unique(synapse_slice(2, 0)[1]).tolist())
    # 24 x 20 native rows and columns: twice as many rows (half the spacing), half as many columns (twice)
    assert target["spacing"].tolist() == [1.0, 0.5, 2.0]
    assert ds.mean == IMAGENET_MEAN


def test_synapse_without_lists_takes_every_file_sorted(tmp_path):
    root = synapse_folder(tmp_path / "Synapse", lists=False)
    ds = build_dataset("synapse", "test", root=root, load_size=SYNAPSE_SHAPE)
    assert [v.name for v in ds.volumes] == ["case0001", "case0002"]


def test_synapse_uses_a_volume_files_own_spacing(tmp_path):
    import h5py

    root = synapse_folder(tmp_path / "Synapse")
    with h5py.File(root / "test_vol_h5" / "case0001.npy.h5", "a") as f:
        f.attrs["spacing"] = [5.0, 0.5, 0.5]
    ds = build_dataset("synapse", "test", root=root, load_size=SYNAPSE_SHAPE, spacing=[3.0, 1.0, 1.0])
    assert [v.spacing for v in ds.volumes] == [(3.0, 1.0, 1.0), (5.0, 0.5, 0.5)]


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        ("no_root", "data.root is the folder"),
        ("missing_slice", r"Synapse file not found: .*case0005_slice001\.npz"),
        ("missing_volume", r"Synapse file not found: .*case0002\.npy\.h5"),
        ("bad_labels", r"case0005_slice000\.npz: labels must be ids 0\.\.8"),
        ("no_label_array", r"needs arrays 'image' and 'label'"),
    ],
)
def test_synapse_layout_errors_name_the_path(tmp_path, breakage, match):
    root = synapse_folder(tmp_path / "Synapse")
    split = "test" if breakage == "missing_volume" else "train"
    if breakage == "no_root":
        root = tmp_path / "nowhere"
    elif breakage == "missing_slice":
        (root / "train_npz" / "case0005_slice001.npz").unlink()
    elif breakage == "missing_volume":
        (root / "test_vol_h5" / "case0002.npy.h5").unlink()
    elif breakage == "bad_labels":
        np.savez(root / "train_npz" / "case0005_slice000.npz", image=np.zeros((4, 4)), label=np.full((4, 4), 13))
    else:
        np.savez(root / "train_npz" / "case0005_slice000.npz", image=np.zeros((4, 4)))
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        ds = build_dataset("synapse", split, root=root)
        ds[0]


def test_synapse_needs_a_root_and_a_known_split(tmp_path):
    with pytest.raises(ValueError, match="needs data.root"):
        build_dataset("synapse", "train")
    with pytest.raises(ValueError, match="valid splits: train, test"):
        build_dataset("synapse", "val", root=synapse_folder(tmp_path / "S"))


def test_synapse_corrupt_slice_is_skipped_with_a_warning(tmp_path):
    root = synapse_folder(tmp_path / "Synapse")
    (root / "train_npz" / "case0005_slice002.npz").write_bytes(b"PK\x03\x04 not really a zip")
    ds = build_dataset("synapse", "train", root=root, load_size=SYNAPSE_SHAPE)
    with pytest.warns(UserWarning, match="could not read Synapse slice"):
        assert ds[2] == (None, None)


# -------------------------------------------------------------------------------------------------- volumes


def test_procedural_volumes_are_deterministic_and_ct_like():
    a = ProceduralVolumesDataset("train", num_volumes=2)
    b = ProceduralVolumesDataset("train", num_volumes=2)
    assert len(a) == 2 * 16 and [v.stop for v in a.volumes] == [16, 32]
    image, mask = a.volume(1)
    torch.testing.assert_close(b.volume(1)[0], image, rtol=0, atol=0)
    assert image.shape == (16, 64, 64) and image.min() >= 0.0 and image.max() <= 1.0
    assert not torch.equal(ProceduralVolumesDataset("test", num_volumes=2).volume(1)[0], image)
    assert not torch.equal(ProceduralVolumesDataset("train", num_volumes=2, volume_seed=1).volume(1)[0], image)
    # every organ in every volume, large and small ones; organs are brighter than the soft tissue around them
    for v in range(2):
        counts = torch.bincount(a.volume(v)[1].flatten(), minlength=len(VOLUME_CLASSES))
        assert (counts[1:] > 30).all(), counts
        assert counts[1] > 4 * counts[2] and counts[1] > 4 * counts[4]  # liver >> kidneys, aorta
    soft = image[(mask == 0) & (image > 0.35) & (image < 0.5)].mean()
    for c in (1, 3, 4):
        assert image[mask == c].mean() > soft, VOLUME_CLASSES[c]


def test_procedural_volumes_are_consistent_across_slices():
    """An organ in one slice mostly overlaps itself in the next: volume metrics measure 3-D shapes."""
    _, mask = ProceduralVolumesDataset("val").volume(0)
    liver = mask == 1
    both, either = (liver[1:] & liver[:-1]).sum(), (liver[1:] | liver[:-1]).sum()
    assert both / either > 0.6


def test_procedural_volume_samples_carry_their_place_and_spacing():
    ds = build_dataset("volumes", "test", load_size=32, num_slices=8, num_volumes=2, channels=3)
    image, target = ds[11]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert (int(target["volume"]), int(target["slice"])) == (1, 3)
    assert target["spacing"].tolist() == [10.0, 10.0, 10.0]  # 80 mm / 8 slices, 320 mm / 32 px
    torch.testing.assert_close(image[0], ds.volume(1)[0][3])
    assert heldout_split("volumes") == "test" and len(ds.mean) == 3


def test_label_fraction_keeps_slices_and_drops_the_volumes():
    ds = build_dataset("volumes", "train", num_volumes=2, label_fraction=0.25, seed=1)
    assert len(ds) == 8 and ds.volumes == [] and "volume" not in ds[0][1]


def test_collate_stacks_volume_tags_only_when_every_sample_has_them():
    vol = build_dataset("volumes", "test", load_size=16, num_volumes=1, num_slices=4)
    scenes = build_dataset("scenes", "test", load_size=16, num_samples=2)
    batch = collate([vol[i] for i in range(4)])
    assert batch["volume"].tolist() == [0, 0, 0, 0] and batch["slice"].tolist() == [0, 1, 2, 3]
    assert batch["spacing"].shape == (4, 3) and batch["spacing"].dtype == torch.float64
    mixed = collate([vol[0], (scenes[0][0].float()[:1] / 255, scenes[0][1])])
    assert "volume" not in mixed and mixed["mask"].shape == (2, 16, 16)
