"""Several scans: split by scan, recorded per image; and datasets larger than memory: make_dataset
holds one scan at a time, train_autoencoder memory-maps the images instead of reading them."""
import json
import os
import tracemalloc

import numpy as np
import pytest
import torch

import make_dataset
import train_autoencoder
from common import InputError, load_dataset, load_npz, save_npz, unique_clean_slices
from conftest import phantom_volume, run_in_process, run_script, write_nifti


@pytest.fixture(scope="module")
def three_scans(tmp_path_factory):
    """Three tiny 4D scans, the last of another in-plane size, made into one dataset."""
    folder = tmp_path_factory.mktemp("scans")
    paths = [write_nifti(folder / "a.nii.gz", phantom_volume((24, 20, 6, 2), seed=1)),
             write_nifti(folder / "b.nii.gz", phantom_volume((24, 20, 6, 2), seed=2)),
             write_nifti(folder / "c.nii.gz", phantom_volume((28, 18, 5, 3), seed=3))]
    dataset = folder / "out" / "three.npz"
    run_in_process(make_dataset, f"--input_paths={folder / '*.nii.gz'}", f"--output={dataset}", "--target_n_images=1",
                   "--min_foreground_fraction=0")
    with np.load(dataset) as archive:
        return paths, dataset, {k: archive[k] for k in archive.files}


def test_three_scans_are_split_by_scan(three_scans):
    paths, _, arrays = three_scans
    assert arrays["scan_paths"].tolist() == paths
    assert json.loads(str(arrays["settings_json"]))["input_paths"] == paths
    splits_of_scan = {scan: set(arrays["split"][arrays["scan_index"] == scan].tolist()) for scan in range(3)}
    assert all(len(splits) == 1 for splits in splits_of_scan.values()), splits_of_scan  # no scan in two splits
    assert {splits.pop() for splits in splits_of_scan.values()} == {"train", "val", "test"}
    # every kept slice of every time point of every scan, once
    counts = np.bincount(arrays["scan_index"])
    assert counts.tolist() == [6 * 2, 6 * 2, 5 * 3]


def test_two_scans_are_split_by_slice_position_shared_by_both(three_scans, tmp_path):
    """Two runs of one subject hold nearly the same image at a slice position, so a position goes to one split
    in both: test slices of one run must not be training slices of the other."""
    paths, _, _ = three_scans
    dataset = tmp_path / "two.npz"
    run_in_process(make_dataset, f"--input_paths={paths[0]},{paths[1]}", f"--output={dataset}",
                   "--target_n_images=1", "--min_foreground_fraction=0", "--val_fraction=0.2", "--test_fraction=0.2")
    with np.load(dataset) as archive:
        splits_of_position = {}
        for z, split in zip(archive["slice_index"].tolist(), archive["split"].tolist()):
            splits_of_position.setdefault(z, set()).add(split)
        assert set(archive["scan_index"].tolist()) == {0, 1}
    assert all(len(splits) == 1 for splits in splits_of_position.values()), splits_of_position
    assert set.union(*splits_of_position.values()) == {"train", "val", "test"}


@pytest.mark.parametrize("bad", ["10.5,14", "a,b", "14,10", "3"])
def test_a_bad_slice_range_is_a_one_line_error(tmp_path, bad):
    from conftest import assert_one_line_error, run_script
    scan = write_nifti(tmp_path / "scan.nii.gz", phantom_volume((24, 20, 6, 2)))
    result = run_script("make_dataset", f"--input_paths={scan}", f"--output={tmp_path / 'x.npz'}",
                        f"--slice_range={bad}", check=False)
    assert_one_line_error(result, "slice_range=", "first < last")
    assert not (tmp_path / "x.npz").exists()


def test_scans_of_another_size_are_padded_not_stretched(three_scans):
    _, _, arrays = three_scans
    assert arrays["clean"].shape[1:] == arrays["noisy"].shape[1:] == arrays["mask"].shape[1:] == (28, 20)
    small, large = arrays["scan_index"] < 2, arrays["scan_index"] == 2
    for name in ("clean", "noisy", "mask"):  # zero padding, without noise
        assert not arrays[name][small][:, 24:].any() and not arrays[name][large][:, :, 18:].any()
    assert arrays["clean"][large][:, 24:, :18].any()


def test_no_scratch_files_are_left_behind(three_scans):
    _, dataset, _ = three_scans
    assert os.listdir(dataset.parent) == ["three.npz"]


def test_a_slice_positions_noise_does_not_depend_on_the_other_scans(three_scans, tmp_path):
    paths, _, arrays = three_scans
    alone = tmp_path / "alone.npz"
    run_in_process(make_dataset, f"--input_paths={paths[0]}", f"--output={alone}", "--target_n_images=1",
                   "--min_foreground_fraction=0")
    with np.load(alone) as archive:
        noise_alone = archive["noisy"] - archive["clean"]
    first = arrays["scan_index"] == 0
    assert np.array_equal(noise_alone, (arrays["noisy"] - arrays["clean"])[first][:, :24, :20])


def test_images_are_memory_mapped_not_read(tmp_path):
    n_images, shape = 300, (64, 64)  # 4.9 MB of clean and of noisy images
    rng = np.random.default_rng(0)
    clean = rng.random((n_images, *shape), dtype=np.float32)
    path = save_npz(tmp_path / "big.npz", {"clean": clean, "noisy": clean + 0.1, "mask": clean > 0.5,
                                           "split": np.array(["train", "val", "test"] * 100),
                                           "scan_index": np.zeros(n_images, dtype=int),
                                           "slice_index": np.arange(n_images),
                                           "time_index": np.zeros(n_images, dtype=int),
                                           "settings_json": np.array("{}")})
    tracemalloc.start()
    arrays, _ = load_dataset(path)
    image = np.array(arrays["noisy"][123])
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak_bytes < 200_000
    assert isinstance(arrays["clean"], np.memmap)
    np.testing.assert_array_equal(image, clean[123] + 0.1)
    np.testing.assert_array_equal(arrays["mask"], clean > 0.5)


def test_training_on_the_memory_mapped_file_equals_training_on_arrays_in_memory(three_scans, tmp_path):
    """A compressed .npz cannot be memory-mapped and is read into memory: both ways must train alike."""
    _, dataset, arrays = three_scans
    assert {type(a) for a in load_npz(dataset, mapped=("clean",)).values()} == {np.ndarray, np.memmap}
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, **arrays)
    assert all(type(a) is np.ndarray for a in load_npz(compressed, mapped=("clean", "noisy", "mask")).values())
    results = []
    for name, path in (("mapped", dataset), ("in_memory", compressed)):
        folder = tmp_path / name
        run_in_process(train_autoencoder, f"--dataset_path={path}", "--n_epochs=2", "--batch_size=4",
                       f"--models_dir={folder}", f"--plots_dir={folder}", f"--examples_dir={folder}")
        (model_path,) = folder.glob("*images.pt")
        results.append(torch.load(model_path, weights_only=True))
    mapped, in_memory = results
    assert mapped["metadata"]["history"] == in_memory["metadata"]["history"]
    for name, weights in mapped["state_dict"].items():
        assert torch.equal(weights, in_memory["state_dict"][name]), name
    assert mapped["metadata"]["split_scans"] == {k: [s] for k, s in zip(
        ("train", "val", "test"), [int(arrays["scan_index"][arrays["split"] == k][0]) for k in ("train", "val", "test")])}


class Identity(torch.nn.Module):
    """A stand-in network that changes nothing: its error is the noise itself."""
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # where the denoiser finds the device

    def forward(self, images, noise_sigma):
        return images


def test_the_zero_padding_of_smaller_scans_counts_in_no_validation_mse_nor_metric(tmp_path):
    """Two scans of different sizes (the split by slice position holds both in every split): the smaller one's
    padding holds no noise, and once counted as perfectly denoised pixels (val MSE 2.15e-3 for noise of 3.6e-3)."""
    from common import unpadded
    folder = tmp_path / "scans"
    folder.mkdir()
    write_nifti(folder / "big.nii.gz", phantom_volume((40, 36, 8, 2), seed=1))
    write_nifti(folder / "small.nii.gz", phantom_volume((20, 16, 8, 2), seed=2))
    dataset = tmp_path / "two.npz"
    run_in_process(make_dataset, f"--input_paths={folder / '*.nii.gz'}", f"--output={dataset}", "--noise_sigma=0.1",
                   "--min_foreground_fraction=0")
    arrays, _ = load_dataset(dataset)
    assert {tuple(s) for s in arrays["image_shape"].tolist()} == {(40, 36), (20, 16)}
    val = train_autoencoder.validation_set(arrays, 0.1)
    assert not unpadded(arrays["image_shape"][val["rows"]], arrays["clean"].shape[1:]).all()  # some padding is scored
    assert train_autoencoder.validation_mse(Identity(), val, 0.1) == pytest.approx(0.01, rel=0.05)
    run_script("use_trained_autoencoder", f"--dataset_path={dataset}", f"--examples_dir={tmp_path}")
    (metrics,) = tmp_path.glob("metrics_*.json")
    noisy = json.loads(metrics.read_text())["noisy"]
    assert noisy["psnr_image"]["mean"] == pytest.approx(20.0, abs=0.5)  # noise of sigma 0.1 over the slices' own pixels
    with pytest.raises(InputError, match="20x16, 40x36"):  # the benchmarks score whole slices: refused, not padded
        unique_clean_slices(dataset, "test")
