"""make_dataset.py end to end on tiny NIfTIs, and the noise models it draws from."""
import json

import numpy as np
import pytest

from common import add_noise
from conftest import assert_one_line_error, phantom_volume, run_script, write_nifti


def make_dataset(tmp_path, scan, name="dataset.npz", *overrides):
    output = tmp_path / name
    run_script("make_dataset", f"--input_paths={scan}", f"--output={output}", "--target_n_images=60", *overrides)
    with np.load(output, allow_pickle=False) as archive:
        return output, {k: archive[k] for k in archive.files}


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    """(scan path, .npz path, arrays) of a dataset made with the default settings from a 4D 40x36x12x3 scan."""
    folder = tmp_path_factory.mktemp("dataset")
    scan = write_nifti(folder / "tiny.nii.gz", phantom_volume((40, 36, 12, 3)))
    return (scan, *make_dataset(folder, scan))


def test_shapes_and_ranges(default_dataset):
    tiny_scan, _, arrays = default_dataset
    n = len(arrays["clean"])
    assert n > 0
    assert arrays["clean"].shape == arrays["noisy"].shape == arrays["mask"].shape == (n, 40, 36)
    assert arrays["clean"].dtype == arrays["noisy"].dtype == np.float32
    assert arrays["mask"].dtype == bool and arrays["mask"].any()
    # the 1st and 99th percentiles at 0 and 1, unclipped, as use_trained_autoencoder.py scales a scan
    assert arrays["clean"].min() < 0 < 1 < arrays["clean"].max() < 1.5
    assert 0.005 < np.mean(arrays["clean"][arrays["mask"]] > 1) < 0.05
    assert arrays["split"].shape == arrays["slice_index"].shape == arrays["time_index"].shape == (n,)
    noise_std = float(np.std(arrays["noisy"] - arrays["clean"]))
    assert abs(noise_std - 0.06) < 0.01
    settings = json.loads(str(arrays["settings_json"]))
    assert settings["noise_sigma"] == 0.06 and settings["input_paths"] == [tiny_scan]


def test_clipping_to_the_unit_range_is_a_setting(default_dataset, tmp_path):
    scan, _, arrays = default_dataset
    _, clipped = make_dataset(tmp_path, scan, "clipped.npz", "--clip_to_unit_range=true")
    assert clipped["clean"].min() == 0 and clipped["clean"].max() == 1
    np.testing.assert_array_equal(clipped["clean"], np.clip(arrays["clean"], 0, 1))
    np.testing.assert_array_equal(clipped["mask"], arrays["mask"])  # the head mask reads clipped intensities


def test_split_shares_no_slice_position(default_dataset):
    _, _, arrays = default_dataset
    positions = {name: set(arrays["slice_index"][arrays["split"] == name].tolist()) for name in ("train", "val", "test")}
    assert all(positions.values()), positions
    assert not positions["train"] & positions["val"]
    assert not positions["train"] & positions["test"]
    assert not positions["val"] & positions["test"]
    # every time point of a kept position lands in the same split
    assert set(arrays["time_index"][arrays["split"] == "val"].tolist()) == {0, 1, 2}


def test_same_seed_gives_a_byte_identical_file(default_dataset, tmp_path):
    scan, path, arrays = default_dataset
    first = path.read_bytes()
    make_dataset(path.parent, scan, path.name)  # the same output name: the settings saved in the file name it
    assert path.read_bytes() == first
    _, other_seed = make_dataset(tmp_path, scan, "seed1.npz", "--seed=1")
    assert not np.array_equal(other_seed["noisy"], arrays["noisy"])


def test_explicit_slice_range(tmp_path, tiny_scan):
    _, arrays = make_dataset(tmp_path, tiny_scan, "range.npz", "--slice_range=3,9")
    assert sorted(set(arrays["slice_index"].tolist())) == [3, 4, 5, 6, 7, 8]


def test_slice_range_outside_the_scan_is_an_error(tmp_path, tiny_scan):
    result = run_script("make_dataset", f"--input_paths={tiny_scan}", f"--output={tmp_path / 'x.npz'}",
                        "--slice_range=5,40", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: slice_range=[5, 40] does not fit")
    assert not (tmp_path / "x.npz").exists()


def test_an_output_that_is_a_folder_is_refused_before_any_work(tmp_path, tiny_scan):
    (tmp_path / "x.npz").mkdir()
    result = run_script("make_dataset", f"--input_paths={tiny_scan}", f"--output={tmp_path / 'x.npz'}", check=False)
    assert_one_line_error(result, "x.npz is a folder; expected a file name ending in .npz")
    assert not list((tmp_path / "x.npz").iterdir())


@pytest.mark.parametrize("override, fragment", [
    ("--output_path=OUT/x.txt", "output_path=OUT/x.txt: expected a file name ending in .npz"),
    ("--noise_sigma=nan", "--noise_sigma=nan: expected finite numbers"),
    ("--val_fraction=nan", "--val_fraction=nan: expected finite numbers"),
])
def test_an_output_that_is_no_npz_and_settings_that_are_no_number_are_refused(tmp_path, tiny_scan, override,
                                                                              fragment):
    override = override.replace("OUT", str(tmp_path))
    result = run_script("make_dataset", f"--input_paths={tiny_scan}", f"--output={tmp_path / 'x.npz'}", override,
                        check=False)
    assert_one_line_error(result, fragment.replace("OUT", str(tmp_path)))
    assert not list(tmp_path.glob("x.*"))


def test_the_same_scan_named_twice_is_refused_rather_than_split_into_train_and_val(tmp_path, tiny_scan):
    """Three names make a split by scan; two of them being one file would put it in two splits."""
    other = write_nifti(tmp_path / "other.nii.gz", phantom_volume((40, 36, 12, 3), seed=5))
    result = run_script("make_dataset", f"--input_paths={tiny_scan},{other},{tiny_scan}",
                        f"--output={tmp_path / 'x.npz'}", check=False)
    assert_one_line_error(result, "input_paths name the same file more than once", str(tiny_scan))
    assert not (tmp_path / "x.npz").exists()


def test_time_pairs_from_a_3d_scan_are_refused_before_any_work(tmp_path):
    scan = write_nifti(tmp_path / "t1.nii.gz", phantom_volume((40, 36, 12)))
    result = run_script("make_dataset", f"--input_paths={scan}", f"--output={tmp_path / 'x.npz'}",
                        "--pairing=time", check=False)
    assert_one_line_error(result, "pairing=time needs a 4D scan of 2 or more volumes", "t1.nii.gz has one volume")
    assert not (tmp_path / "x.npz").exists()


def test_a_3d_input_works(tmp_path):
    scan = write_nifti(tmp_path / "volume.nii.gz", phantom_volume((24, 20, 10)), dtype=np.int16)
    _, arrays = make_dataset(tmp_path, scan)
    assert arrays["clean"].shape[1:] == (24, 20)
    assert set(arrays["time_index"].tolist()) == {0}
    assert {"train", "val", "test"} <= set(arrays["split"].tolist())


def test_rician_noise_is_biased_upwards_at_zero_signal():
    sigma = 0.05
    rng = np.random.default_rng(0)
    zero_signal = np.zeros(200_000, dtype=np.float32)
    noisy = add_noise(zero_signal, sigma, "rician", rng.standard_normal((2, zero_signal.size)))
    assert abs(noisy.mean() - sigma * np.sqrt(np.pi / 2)) < 0.01 * sigma
    assert noisy.min() >= 0
    # far above the noise it is close to Gaussian: unbiased, standard deviation sigma
    bright = add_noise(np.ones(200_000), sigma, "rician", rng.standard_normal((2, 200_000)))
    assert abs(bright.mean() - 1 - sigma ** 2 / 2) < 4e-4  # the bias, 1.25e-3, is 11 standard errors of the mean
    assert abs(bright.std() - sigma) < 0.02 * sigma


def test_rician_dataset(tmp_path, tiny_scan):
    _, arrays = make_dataset(tmp_path, tiny_scan, "rician.npz", "--noise_model=rician", "--noise_sigma=0.1")
    background = np.abs(arrays["clean"]) < 0.02  # the phantom's background: 0 with a little noise of its own
    assert background.mean() > 0.2
    assert abs(arrays["noisy"][background].mean() - 0.1 * np.sqrt(np.pi / 2)) < 0.01  # Rayleigh: sigma sqrt(pi/2)
    assert json.loads(str(arrays["settings_json"]))["noise_model"] == "rician"


@pytest.mark.parametrize("kind, fragment", [
    ("constant", "is constant (every voxel 7): nothing to denoise"),
    ("tiny", "slices of 5x5 are too small to train and score on (at least 8x8)"),
])
def test_a_scan_with_nothing_to_learn_from_is_one_clear_error(tmp_path, kind, fragment):
    volume = np.full((20, 20, 8), 7.0) if kind == "constant" else phantom_volume((5, 5, 12))
    scan = write_nifti(tmp_path / f"{kind}.nii.gz", volume)
    result = run_script("make_dataset", f"--input_paths={scan}", f"--output={tmp_path / 'out.npz'}", check=False)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out.npz").exists()


def test_constant_slices_are_not_kept_though_the_head_mask_reaches_into_them(tmp_path):
    """The head mask is dilated in 3D, so an empty or constant slice next to the head had 40% 'foreground'."""
    volume = phantom_volume((40, 36, 12))
    volume[:, :, 3], volume[:, :, 5] = 0, 42.0
    scan = write_nifti(tmp_path / "holes.nii.gz", volume)
    _, arrays = make_dataset(tmp_path, scan)
    kept = set(arrays["slice_index"].tolist())
    assert 3 not in kept and 5 not in kept and {2, 4, 6} <= kept
    # named in slice_range they are refused, not kept: they would be scored on an empty head (PSNR nan)
    result = run_script("make_dataset", f"--input_paths={scan}", f"--output={tmp_path / 'range.npz'}",
                        "--slice_range=1,9", check=False)
    assert_one_line_error(result, "slice_range=[1, 9]", "constant or holds no head at slice(s) 3, 5")
    assert not (tmp_path / "range.npz").exists()


def test_without_noise_each_clean_slice_is_stored_once(tmp_path, tiny_scan):
    _, arrays = make_dataset(tmp_path, tiny_scan, "dataset.npz", "--noise_sigma=0")
    keys = np.stack([arrays["slice_index"], arrays["time_index"]], axis=1)
    assert len(np.unique(keys, axis=0)) == len(keys)


def test_a_file_named_with_glob_characters_is_that_file(tmp_path, tiny_scan):
    scan = tmp_path / "scan[1].nii.gz"
    scan.write_bytes(open(tiny_scan, "rb").read())
    _, arrays = make_dataset(tmp_path, scan)
    assert len(arrays["clean"]) > 0
