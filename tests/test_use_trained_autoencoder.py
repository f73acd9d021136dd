"""use_trained_autoencoder.py end to end: evaluation on a test split, and denoising NIfTI files back into
NIfTI files with the input's geometry, header and intensity units; bad inputs give one clear error."""
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import DEFAULT_MODEL, assert_one_line_error, phantom_volume, run_script, write_nifti
from models import CHECKPOINT_FORMAT, build_model

SIGMA = 0.06  # the noise sigma of the tiny training set, on the [0, 1] scale


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model path, dataset path) of a seed network trained for a few epochs on a tiny phantom."""
    folder = tmp_path_factory.mktemp("trained")
    scan = write_nifti(folder / "tiny.nii.gz", phantom_volume((40, 36, 12, 3)))
    dataset = folder / "dataset.npz"
    run_script("make_dataset", f"--input_paths={scan}", f"--output={dataset}", "--target_n_images=600",
               f"--noise_sigma={SIGMA}")
    run_script("train_autoencoder", f"--dataset_path={dataset}", "--n_epochs=4", "--batch_size=4",
               f"--models_dir={folder}", f"--plots_dir={folder}", f"--examples_dir={folder}")
    (model,) = folder.glob("autoencoder_seed_4epochs_*images.pt")
    return model, dataset


def denoise(model, input_path, output_path, *overrides, check=True):
    return run_script("use_trained_autoencoder", f"--model={model}", f"--input={input_path}",
                      f"--output={output_path}", *overrides, check=check)


def noisy_phantom(shape, seed=1):
    """(clean, noisy) float32 phantoms with Gaussian noise of SIGMA times the 1st-99th percentile range."""
    clean = phantom_volume(shape, seed=seed)
    low, high = np.percentile(clean, [1, 99])
    noise = np.random.default_rng(seed + 100).normal(0, SIGMA * (high - low), clean.shape)
    return clean, (clean + noise).astype(np.float32)


# --- evaluation mode -----------------------------------------------------------------------------

def test_evaluation_writes_metrics_and_figures(trained, tmp_path):
    model, dataset = trained
    run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={dataset}",
               f"--examples_dir={tmp_path}")
    name = f"{model.stem}_on_dataset"  # not the default dataset: its files keep the default's name for it
    metrics = json.loads((tmp_path / f"metrics_{name}.json").read_text())
    assert metrics["n_test_slices"] > 0 and metrics["noise_sigma"] == SIGMA
    assert metrics["denoised"]["psnr_mask"]["mean"] > metrics["noisy"]["psnr_mask"]["mean"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"denoising_2x3_{name}_test.png",
                                                              f"denoising_5x3_{name}_test.png"]


def test_evaluation_warns_when_the_network_was_trained_on_test_positions(trained, tmp_path):
    model, dataset = trained
    held_out = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={dataset}",
                          f"--examples_dir={tmp_path}")
    assert "not held out" not in held_out.stdout
    scan = dataset.parent / "tiny.nii.gz"
    resplit = tmp_path / "resplit.npz"  # the same scan, split by another seed
    run_script("make_dataset", f"--input_paths={scan}", f"--output={resplit}", "--target_n_images=60",
               f"--noise_sigma={SIGMA}", "--seed=3")
    result = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={resplit}",
                        f"--examples_dir={tmp_path}")
    assert "their scores are not held out" in result.stdout
    metrics = json.loads((tmp_path / f"metrics_{model.stem}_on_resplit.json").read_text())
    assert metrics["test_positions_trained_on"] and all(name == "tiny.nii.gz"
                                                        for name, _ in metrics["test_positions_trained_on"])
    # another scan of the same file name (subject folders) split the same way is no leak: told apart by its bytes
    (tmp_path / "other").mkdir()
    other = write_nifti(tmp_path / "other" / "tiny.nii.gz", phantom_volume((40, 36, 12, 3), seed=7))
    other_split = tmp_path / "other_split.npz"
    run_script("make_dataset", f"--input_paths={other}", f"--output={other_split}", "--target_n_images=60",
               f"--noise_sigma={SIGMA}", "--seed=3")
    result = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={other_split}",
                        f"--examples_dir={tmp_path}")
    assert "not held out" not in result.stdout


def test_evaluation_checks_its_outputs_and_its_dataset_before_any_work(trained, tmp_path):
    model, dataset = trained
    (tmp_path / "a_file").write_text("not a folder")
    result = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={dataset}",
                        f"--examples_dir={tmp_path / 'a_file'}", check=False)
    assert_one_line_error(result, "a_file is a file, not a folder")
    # noise too weak to change a float32 voxel: PSNR would be inf (and "Infinity" in the JSON)
    scan = dataset.parent / "tiny.nii.gz"
    silent = tmp_path / "silent.npz"
    run_script("make_dataset", f"--input_paths={scan}", f"--output={silent}", "--noise_sigma=1e-46",
               "--target_n_images=1")
    result = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={silent}",
                        f"--examples_dir={tmp_path}", check=False)
    assert_one_line_error(result, "holds no added noise on its test slices")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "silent.npz"]


def test_evaluation_warns_of_noise_outside_what_the_network_was_trained_for(trained, tmp_path):
    model, dataset = trained
    scan = dataset.parent / "tiny.nii.gz"
    strong = tmp_path / "strong.npz"
    run_script("make_dataset", f"--input_paths={scan}", f"--output={strong}", "--noise_sigma=0.2", "--target_n_images=1")
    result = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={strong}",
                        f"--examples_dir={tmp_path}")
    assert f"holds noise of sigma 0.2, outside what {model.name} was trained for (0.06-0.06)" in result.stdout


def test_the_default_dataset_is_found_from_any_folder(trained, tmp_path, monkeypatch):
    """A relative --dataset_path that is not in the current folder is looked up in the repo, as the model is."""
    import shutil

    import use_trained_autoencoder
    from conftest import run_in_process
    model, dataset = trained
    (tmp_path / "repo" / "data").mkdir(parents=True)
    shutil.copy(dataset, tmp_path / "repo" / "data" / "mri_denoising.npz")
    monkeypatch.setattr(use_trained_autoencoder, "REPO", str(tmp_path / "repo"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_in_process(use_trained_autoencoder, f"--model={model}", "--dataset_path=data/mri_denoising.npz",
                   f"--examples_dir={tmp_path / 'out'}")
    metrics = json.loads((tmp_path / "out" / f"metrics_{model.stem}.json").read_text())
    assert metrics["dataset"] == str(tmp_path / "repo" / "data" / "mri_denoising.npz")


def test_evaluation_in_float32_and_bfloat16_agree(trained, tmp_path):
    model, dataset = trained
    psnr = {}
    for precision in ("float32", "bfloat16"):
        result = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={dataset}",
                            f"--examples_dir={tmp_path / precision}", f"--precision={precision}")
        assert f"runs in {precision}" in result.stdout
        metrics = json.loads((tmp_path / precision / f"metrics_{model.stem}_on_dataset.json").read_text())
        assert metrics["precision"] == precision
        psnr[precision] = metrics["denoised"]["psnr_mask"]["mean"]
    assert psnr["bfloat16"] == pytest.approx(psnr["float32"], abs=0.05) and psnr["bfloat16"] != psnr["float32"]


def test_an_unknown_precision_is_one_clear_error(trained, tmp_path):
    model, dataset = trained
    result = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={dataset}",
                        f"--examples_dir={tmp_path}", "--precision=half", check=False)
    assert_one_line_error(result, "precision='half'")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("overrides, fragment", [
    (["--output=out.nii.gz"], "--output need --input"),
    (["--adapt_steps=5", "--report"], "--report, --adapt_steps need --input"),
    (["--adapt_seconds=5", "--adapt_loss=neighbor2neighbor"], "--adapt_seconds, --adapt_loss need --input"),
])
def test_file_settings_without_an_input_are_refused_not_ignored(trained, tmp_path, overrides, fragment):
    model, dataset = trained
    result = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={dataset}",
                        f"--examples_dir={tmp_path}", *overrides, check=False, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"not a zip", b""])
def test_a_dataset_that_make_dataset_did_not_write_is_one_clear_error(trained, tmp_path, content):
    model, _ = trained
    dataset = tmp_path / "other.npz"
    dataset.write_bytes(content)
    result = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={dataset}",
                        f"--examples_dir={tmp_path / 'out'}", check=False)
    assert_one_line_error(result, str(dataset), "is not a dataset made by make_dataset.py")
    assert not (tmp_path / "out").exists()


def test_a_dataset_without_the_expected_arrays_is_one_clear_error(trained, tmp_path):
    model, _ = trained
    dataset = tmp_path / "other.npz"
    np.savez(dataset, clean=np.zeros((2, 4, 4), np.float32))
    result = run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={dataset}",
                        f"--examples_dir={tmp_path / 'out'}", check=False)
    assert_one_line_error(result, str(dataset), "is not a dataset made by make_dataset.py")


# --- denoising a NIfTI ---------------------------------------------------------------------------

def header_fields(image):
    header = image.header
    return {"shape": image.shape, "affine": image.affine.tolist(), "sform_code": int(header["sform_code"]),
            "qform_code": int(header["qform_code"]), "zooms": header.get_zooms(),
            "xyzt_units": header.get_xyzt_units(), "tr": float(header["pixdim"][4])}


def write_oblique_nifti(path, data, dtype):
    """A NIfTI with an oblique affine, distinct sform and qform codes, mm/s units and a TR of 2.5 s."""
    affine = np.array([[1.9, 0.3, 0.0, -60.0], [-0.3, 1.9, 0.2, -70.0], [0.0, -0.1, 3.0, -20.0], [0, 0, 0, 1]])
    image = nib.Nifti1Image(data.astype(dtype), affine)
    image.set_sform(affine, code=4)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    if data.ndim == 4:
        image.header.set_zooms(image.header.get_zooms()[:3] + (2.5,))
    nib.save(image, str(path))
    return nib.load(str(path))


@pytest.mark.parametrize("shape", [(61, 73, 11), (61, 73, 11, 3)], ids=["3d", "4d"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32], ids=["int16", "float32"])
def test_round_trip_keeps_geometry_and_header(trained, tmp_path, shape, dtype):
    model, _ = trained
    _, noisy = noisy_phantom(shape)
    original = write_oblique_nifti(tmp_path / "scan.nii.gz", noisy, dtype)
    denoise(model, tmp_path / "scan.nii.gz", tmp_path / "denoised.nii.gz")
    result = nib.load(tmp_path / "denoised.nii.gz")
    expected = header_fields(original)
    assert header_fields(result) == expected
    assert result.get_data_dtype() == np.float32  # the default, whatever the input type
    assert np.isfinite(result.get_fdata()).all()
    if len(shape) == 4:
        assert expected["tr"] == 2.5


def test_dtype_input_writes_the_input_type(trained, tmp_path):
    model, _ = trained
    clean, noisy = noisy_phantom((40, 36, 12, 2))
    write_oblique_nifti(tmp_path / "scan.nii.gz", noisy, np.int16)
    denoise(model, tmp_path / "scan.nii.gz", tmp_path / "denoised.nii.gz", "--dtype=input", "--report")
    result = nib.load(tmp_path / "denoised.nii.gz")
    assert result.get_data_dtype() == np.int16
    head = clean > 0.3 * clean.max()
    assert abs(result.get_fdata()[head].mean() / clean[head].mean() - 1) < 0.03
    assert (tmp_path / "denoised_report.png").stat().st_size > 10_000


def test_the_report_draws_voxels_in_their_proportions(monkeypatch):
    """Slices across axis 0 of a scan with 1 x 1 x 5 mm voxels: each pixel drawn 5 times as tall as wide."""
    import use_trained_autoencoder as tool
    monkeypatch.setattr(tool, "axis", 0)
    monkeypatch.setattr(tool, "input_path", "scan.nii.gz")
    volume = phantom_volume((12, 20, 8))
    figure = tool.plot_report(volume, 0.9 * volume, 0.0, 800.0, 0.05, (1.0, 1.0, 5.0))
    assert [axes.get_aspect() for axes in figure.axes] == [5.0] * 9


def test_the_report_shows_what_was_removed_when_told_sigma_0_and_each_slice_of_a_thin_stack_once(monkeypatch):
    """Told sigma 0, a noise-map network still changes the image: its removed panel once had an empty colour
    scale (-0 to 0) and showed one flat colour. A stack of 2 slices has 2 rows, not the first drawn 3 times."""
    import use_trained_autoencoder as tool
    monkeypatch.setattr(tool, "input_path", "scan.nii.gz")
    volume = phantom_volume((12, 20, 2))
    figure = tool.plot_report(volume, 0.9 * volume, 0.0, 800.0, 0.0, (1.0, 1.0, 1.0))
    removed_panels = [axes for axes in figure.axes if axes.get_title().startswith("removed")]
    assert len(removed_panels) == 2
    assert all(axes.images[0].get_clim()[1] > 0 for axes in removed_panels)


def test_dtype_input_keeps_the_precision_of_scaled_integers(trained, tmp_path):
    """An int16 input stored with scl_slope (intensities 0..8 here) must not be rounded to whole units."""
    model, _ = trained
    _, noisy = noisy_phantom((40, 36, 12))
    image = nib.Nifti1Image(noisy / 100, np.eye(4))
    image.header.set_data_dtype(np.int16)  # nibabel stores it scaled, with a slope far below 1
    nib.save(image, str(tmp_path / "scaled.nii.gz"))
    assert nib.load(tmp_path / "scaled.nii.gz").dataobj.slope < 0.01
    denoise(model, tmp_path / "scaled.nii.gz", tmp_path / "denoised.nii.gz", "--dtype=input")
    result = nib.load(tmp_path / "denoised.nii.gz")
    assert result.get_data_dtype() == np.int16
    assert len(np.unique(result.get_fdata())) > 100


def test_denoising_removes_noise_in_input_units(trained, tmp_path):
    model, _ = trained
    clean, noisy = noisy_phantom((40, 36, 12, 3))
    write_nifti(tmp_path / "scan.nii.gz", noisy)
    result = denoise(model, tmp_path / "scan.nii.gz", tmp_path / "denoised.nii.gz")
    denoised = nib.load(tmp_path / "denoised.nii.gz")
    values = denoised.get_fdata()
    head = clean > 0.3 * clean.max()
    assert abs(values[head].mean() / clean[head].mean() - 1) < 0.03  # intensities in the input's units
    rmse_noisy = np.sqrt(np.mean((noisy[head] - clean[head]) ** 2))
    rmse_denoised = np.sqrt(np.mean((values[head] - clean[head]) ** 2))
    assert rmse_denoised < 0.8 * rmse_noisy
    assert model.name in denoised.header["descrip"].tobytes().decode()
    (comment,) = [e.get_content().decode() for e in denoised.header.extensions if e.get_code() == 6]
    assert comment.startswith(f"denoised by mri-denoise with {model.name};")  # the whole name, past descrip's 80 bytes
    assert "(estimated)" in comment and "adaptation: none" in comment
    assert "estimated noise sigma" in result.stdout


def test_the_self_ensemble_averages_a_network_trained_on_rotated_patches(trained, tmp_path):
    _, dataset = trained
    run_script("train_autoencoder", f"--dataset_path={dataset}", "--arch=dncnn", '--arch_args={"depth": 4, "width": 16}',
               "--n_epochs=3", "--batch_size=8", "--augment", "--patch_size=24", "--output_tag=_rotated",
               f"--models_dir={tmp_path}", f"--plots_dir={tmp_path}", f"--examples_dir={tmp_path}")
    (model,) = tmp_path.glob("autoencoder_dncnn_rotated_3epochs_*images.pt")
    clean, noisy = noisy_phantom((40, 36, 6, 2))
    write_nifti(tmp_path / "scan.nii.gz", noisy)
    denoise(model, tmp_path / "scan.nii.gz", tmp_path / "plain.nii.gz")
    result = denoise(model, tmp_path / "scan.nii.gz", tmp_path / "ensembled.nii.gz", "--self_ensemble")
    plain, ensembled = (nib.load(tmp_path / f"{name}.nii.gz") for name in ("plain", "ensembled"))
    head = clean > 0.3 * clean.max()
    plain_error = np.mean((plain.get_fdata()[head] - clean[head]) ** 2)
    ensembled_error = np.mean((ensembled.get_fdata()[head] - clean[head]) ** 2)
    assert np.abs(plain.get_fdata() - ensembled.get_fdata()).max() > 1  # in intensity units of a ~1000 scan
    assert ensembled_error < 1.05 * plain_error  # an orientation turned back wrongly would blur the anatomy
    assert f"mri-denoise self-ensemble {model.name}" in ensembled.header["descrip"].tobytes().decode()
    assert "x8 self-ensemble" in result.stdout
    # with adaptation too, and in evaluation mode, where the metrics name and record it
    denoise(model, tmp_path / "scan.nii.gz", tmp_path / "adapted.nii.gz", "--self_ensemble", "--adapt_steps=3")
    adapted = nib.load(tmp_path / "adapted.nii.gz")
    assert adapted.shape == noisy.shape
    (comment,) = [e.get_content().decode() for e in adapted.header.extensions]
    assert ", x8 self-ensemble;" in comment and ("adaptation: kept" in comment or "adaptation: discarded" in comment)
    run_script("use_trained_autoencoder", f"--model={model}", f"--dataset_path={dataset}", f"--examples_dir={tmp_path}",
               "--self_ensemble")
    metrics = json.loads((tmp_path / f"metrics_{model.stem}_self_ensemble_on_dataset.json").read_text())
    assert metrics["self_ensemble"] is True and metrics["denoised"]["psnr_mask"]["mean"] > 0


def test_the_self_ensemble_refuses_a_network_never_shown_rotated_slices(trained, tmp_path):
    model, _ = trained  # trained on whole slices without --augment
    clean, noisy = noisy_phantom((40, 36, 6, 2))
    write_nifti(tmp_path / "scan.nii.gz", noisy)
    result = denoise(model, tmp_path / "scan.nii.gz", tmp_path / "out.nii.gz", "--self_ensemble", check=False)
    assert_one_line_error(result, "was not trained on flipped and rotated")
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("loss", ["recorrupted", "neighbor2neighbor"])
def test_adaptation_runs_on_the_input_and_says_what_it_did(trained, tmp_path, loss):
    model, _ = trained
    write_nifti(tmp_path / "scan.nii.gz", noisy_phantom((40, 36, 8))[1])
    result = denoise(model, tmp_path / "scan.nii.gz", tmp_path / "denoised.nii.gz", "--adapt_steps=5",
                     f"--adapt_loss={loss}")
    assert "adaptation: 5 steps" in result.stdout and "checked in the object" in result.stdout
    adapted = nib.load(tmp_path / "denoised.nii.gz").get_fdata()
    assert adapted.shape == (40, 36, 8)
    denoise(model, tmp_path / "scan.nii.gz", tmp_path / "plain.nii.gz")
    plain = nib.load(tmp_path / "plain.nii.gz").get_fdata()
    corners = np.zeros(plain.shape, dtype=bool)
    corners[:4, :4] = corners[-4:, -4:] = True  # background: the trained network's output, kept or not
    np.testing.assert_array_equal(adapted[corners], plain[corners])


@pytest.mark.parametrize("override, fragment", [("--adapt_loss=noise2void", "adapt_loss='noise2void'"),
                                                ("--adapt_heldout_fraction=0.5", "adapt_heldout_fraction=0.5")])
def test_bad_adaptation_setting_is_one_clear_error(trained, tmp_path, override, fragment):
    model, _ = trained
    write_nifti(tmp_path / "scan.nii.gz", noisy_phantom((20, 18, 6))[1])
    result = denoise(model, tmp_path / "scan.nii.gz", tmp_path / "denoised.nii.gz", "--adapt_steps=5",
                     override, check=False)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "denoised.nii.gz").exists()


def test_refuses_an_existing_output_without_overwrite(trained, tmp_path):
    model, _ = trained
    write_nifti(tmp_path / "scan.nii.gz", noisy_phantom((20, 18, 6))[1])
    (tmp_path / "denoised.nii.gz").write_bytes(b"keep me")
    result = denoise(model, tmp_path / "scan.nii.gz", tmp_path / "denoised.nii.gz", check=False)
    assert_one_line_error(result, "denoised.nii.gz exists", "--overwrite")
    assert (tmp_path / "denoised.nii.gz").read_bytes() == b"keep me"
    denoise(model, tmp_path / "scan.nii.gz", tmp_path / "denoised.nii.gz", "--overwrite")
    assert nib.load(tmp_path / "denoised.nii.gz").shape == (20, 18, 6)


def test_refuses_to_overwrite_the_input(trained, tmp_path):
    model, _ = trained
    scan = write_nifti(tmp_path / "scan.nii.gz", noisy_phantom((20, 18, 6))[1])
    before = (tmp_path / "scan.nii.gz").read_bytes()
    result = denoise(model, scan, tmp_path / "." / "scan.nii.gz", "--overwrite", check=False)
    assert_one_line_error(result, "is the input file")
    assert (tmp_path / "scan.nii.gz").read_bytes() == before


# --- bad inputs --------------------------------------------------------------------------------



def write_bad_input(kind, folder):
    """Write a bad input of the given kind in `folder`; returns its path."""
    path = folder / f"{kind}.nii.gz"
    volume = noisy_phantom((12, 10, 4))[1]
    if kind == "missing":
        return path
    if kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "2d":
        write_nifti(path, volume[:, :, 0])
    elif kind == "5d":
        write_nifti(path, np.stack([volume[..., None]] * 2, axis=4))
    elif kind in ("nan", "inf"):
        volume[3, 4, 1] = np.nan if kind == "nan" else np.inf
        write_nifti(path, volume)
    elif kind == "zeros":
        write_nifti(path, np.zeros_like(volume))
    elif kind == "complex":
        write_nifti(path, volume * np.exp(0.5j), dtype=np.complex64)
    elif kind == "rgb":
        rgb = np.zeros(volume.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        rgb["G"] = 255 * volume / volume.max()
        nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    elif kind == "truncated":
        write_nifti(path, noisy_phantom((40, 36, 12, 3))[1])
        whole = path.read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
    elif kind in ("damaged_gz", "cut_gz_trailer"):  # nibabel alone reads both without complaint
        write_nifti(path, noisy_phantom((40, 36, 12, 3))[1])
        whole = bytearray(path.read_bytes())
        if kind == "damaged_gz":
            whole[len(whole) // 2] ^= 0xFF
        path.write_bytes(bytes(whole[:-4] if kind == "cut_gz_trailer" else whole))
    elif kind == "underflow":  # float64 values that float32 cannot hold: all read as 0
        write_nifti(path, volume.astype(np.float64) * 1e-60, dtype=np.float64)
    elif kind == "truncated_nii":  # uncompressed: read another way than a .gz
        path = folder / "truncated_nii.nii"
        write_nifti(path, noisy_phantom((40, 36, 12, 3))[1])
        path.write_bytes(path.read_bytes()[:20_000])
    elif kind in ("plain_named_gz", "gz_named_plain"):  # nibabel goes by the name
        written = Path(write_nifti(folder / ("scan.nii" if kind == "plain_named_gz" else "scan.nii.gz"), volume))
        path = written.rename(path if kind == "plain_named_gz" else folder / f"{kind}.nii")
    elif kind == "pair":
        path = folder / "pair.hdr"
        nib.save(nib.Nifti1Pair(volume, np.eye(4)), str(path))
    elif kind == "analyze":
        path = folder / "analyze.hdr"
        nib.save(nib.AnalyzeImage(volume, np.eye(4)), str(path))
    elif kind == "par":
        import importlib.resources
        return importlib.resources.files("nibabel") / "tests" / "data" / "phantom_EPI_asc_CLEAR_2_1.PAR"
    return path


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "no such file"),
    ("text", "is not a NIfTI file"),
    ("2d", "has 2 dimensions"),
    ("5d", "has 5 dimensions"),
    ("nan", "NaN or Inf"),
    ("inf", "NaN or Inf"),
    ("zeros", "every voxel is zero"),
    ("complex", "holds complex voxels"),
    ("rgb", "holds RGB voxels"),
    ("truncated", "truncated"),
    ("truncated_nii", "truncated"),
    ("damaged_gz", "is damaged or truncated"),
    ("cut_gz_trailer", "is damaged or truncated"),
    ("underflow", "below float32's smallest"),
    ("plain_named_gz", "is an uncompressed NIfTI but named .nii.gz; rename it to .nii"),
    ("gz_named_plain", "is gzip-compressed but named .nii; rename it to .nii.gz"),
    ("pair", "is a NIfTI .hdr/.img pair; give a single .nii or .nii.gz"),
    ("analyze", "is an Analyze 7.5 .hdr/.img pair, not a NIfTI file; convert it"),
    ("par", "is a PARRECImage, not a NIfTI file"),
])
def test_bad_input_is_one_clear_error(trained, tmp_path, kind, fragment):
    model, _ = trained
    path = write_bad_input(kind, tmp_path)
    result = denoise(model, path, tmp_path / "out.nii.gz", check=False)
    assert_one_line_error(result, str(path), fragment)
    written = {"missing": [], "par": [], "pair": ["pair.hdr", "pair.img"],
               "analyze": ["analyze.hdr", "analyze.img"]}.get(kind, [path.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == written


@pytest.mark.parametrize("overrides, fragment", [
    (["--noise_sigma=nan"], "noise_sigma=nan"), (["--noise_sigma=inf"], "noise_sigma=inf"),
    (["--noise_sigma=27.5"], "noise_sigma=27.5; expected 0 (estimate it) or a sigma below 1.0 on the network's [0, 1] scale"),
    (["--batch_size=0"], "batch_size=0"), (["--batch_size=-1"], "batch_size=-1"),
    (["--adapt_steps=5", "--adapt_seconds=nan"], "adapt_seconds=nan"),
])
def test_a_setting_that_is_not_a_usable_number_is_one_clear_error(trained, tmp_path, overrides, fragment):
    model, _ = trained
    scan = write_nifti(tmp_path / "scan.nii.gz", noisy_phantom((20, 18, 6))[1])
    result = denoise(model, scan, tmp_path / "out.nii.gz", *overrides, check=False)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("where", ["under_a_file", "a_folder", "report_exists", "report_a_folder"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(trained, tmp_path, where):
    model, _ = trained
    scan = write_nifti(tmp_path / "scan.nii.gz", noisy_phantom((20, 18, 6))[1])
    output, overrides, fragment = {
        "under_a_file": (tmp_path / "scan.nii.gz" / "out.nii.gz", ["--overwrite"], "is a file, not a folder"),
        "a_folder": (tmp_path / "folder.nii.gz", [], "is a folder; expected a file name"),
        "report_exists": (tmp_path / "out.nii.gz", ["--report"], "out_report.png exists"),
        "report_a_folder": (tmp_path / "out.nii.gz", ["--report", "--overwrite"], "out_report.png is a folder"),
    }[where]
    if where == "a_folder":
        output.mkdir()
    if where == "report_a_folder":
        (tmp_path / "out_report.png").mkdir()
    if where == "report_exists":
        (tmp_path / "out_report.png").write_bytes(b"keep me")
    result = denoise(model, scan, output, *overrides, check=False)
    assert_one_line_error(result, fragment)
    assert "denoising" not in result.stdout and "estimated noise sigma" not in result.stdout
    assert not (tmp_path / "out.nii.gz").exists()


def test_slices_one_pixel_wide_are_refused_with_the_axis_to_use(tmp_path):
    """Slices of 12x1 (a single-slice volume cut across axis 1) were once denoised as 1-pixel strips, hardly
    at all; the axis across the thin dimension gives whole slices (the self-ensemble's turns included)."""
    model = DEFAULT_MODEL
    scan = write_nifti(tmp_path / "thin.nii.gz", noisy_phantom((12, 10, 1))[1])
    for overrides in (["--self_ensemble"], ["--adapt_steps=3"]):
        result = denoise(model, scan, tmp_path / "out.nii.gz", "--axis=1", *overrides, check=False)
        assert_one_line_error(result, "slices across axis 1 are 12x1 pixels", "--axis=2 gives 12x10 slices")
        assert not (tmp_path / "out.nii.gz").exists()
    denoise(model, scan, tmp_path / "out.nii.gz", "--axis=2", "--self_ensemble")
    assert nib.load(tmp_path / "out.nii.gz").shape == (12, 10, 1)


def test_the_default_model_is_found_from_any_folder(tmp_path):
    import use_trained_autoencoder
    assert use_trained_autoencoder.model_path == DEFAULT_MODEL  # the one the tests below call the default
    scan = write_nifti(tmp_path / "scan.nii.gz", noisy_phantom((20, 18, 4))[1])
    result = run_script("use_trained_autoencoder", "--input=scan.nii.gz", "--output=out.nii.gz", cwd=tmp_path)
    assert f"{os.path.basename(DEFAULT_MODEL)} runs in" in result.stdout
    assert nib.load(tmp_path / "out.nii.gz").shape == (20, 18, 4)
    assert "note: slices of 20x18 are small" in result.stdout  # the estimate reads anatomy as noise there
    result = run_script("use_trained_autoencoder", "--input=scan.nii.gz", "--output=out.nii.gz", "--overwrite",
                        "--noise_sigma=0.05", cwd=tmp_path)
    assert "note: slices" not in result.stdout


def test_a_spike_stays_where_it_is_and_a_masked_magnitude_background_stays_zero(trained, tmp_path):
    """One voxel at 1e6 times the scan's range goes through unchanged instead of spreading into its
    neighbours; a magnitude image (no negative values) gives no negative output, and its masked background
    (a region of exact zeros) stays 0, while single zeros in the tissue are denoised as any voxel."""
    clean, noisy = noisy_phantom((40, 36, 6))
    magnitude = np.abs(noisy)
    magnitude[:, :8] = 0  # a masked band, 22% of the voxels
    pinholes = (np.arange(10, 30, 4), np.full(5, 20), np.full(5, 2))
    magnitude[pinholes] = 0
    spiky = magnitude.copy()
    spiky[20, 18, 3] = 1e6 * magnitude.max()
    write_nifti(tmp_path / "plain.nii.gz", magnitude)
    write_nifti(tmp_path / "spiky.nii.gz", spiky)
    model = DEFAULT_MODEL
    for name in ("plain", "spiky"):
        denoise(model, tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_out.nii.gz", "--noise_sigma=0.06")
    plain, spiky_out = (nib.load(tmp_path / f"{name}_out.nii.gz").get_fdata() for name in ("plain", "spiky"))
    assert spiky_out[20, 18, 3] == pytest.approx(spiky[20, 18, 3], rel=1e-6)
    near = np.zeros(plain.shape, dtype=bool)
    near[14:27, 12:25, 3] = True
    near[20, 18, 3] = False
    # the neighbours barely notice (0.09% of the range here; clipping the spike alone left 9%, unclipped 5e6 times it)
    assert np.abs(spiky_out[near] - plain[near]).max() < 0.01 * magnitude.max()
    assert plain.min() >= 0 and not plain[:, :8].any()
    assert np.all(plain[pinholes] > 0.05 * magnitude.max())  # the single zeros were denoised, not kept


def test_a_header_that_offsets_the_intensities_changes_only_the_units_of_the_output(tmp_path):
    """The same stored magnitude image, with a masked background of stored zeros, read with scl_inter 100 (and
    scl_slope 2.5): its background is at 100, which is its zero signal, and must come out flat at 100, and its
    object as the unscaled image's, in the new units. The masked background was once recognised at 0 only
    (here it came out textured, 52-178) and the Rician floor counted from 0."""
    _, noisy = noisy_phantom((40, 36, 6))
    stored = np.rint(np.abs(noisy)).astype(np.int16)
    stored[:, :8] = 0  # a masked band
    write_nifti(tmp_path / "raw.nii.gz", stored, dtype=np.int16)
    scaled = nib.Nifti1Image(stored, np.diag([2.0, 2.0, 3.0, 1.0]))
    scaled.header.set_slope_inter(2.5, 100)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    assert nib.load(tmp_path / "scaled.nii.gz").dataobj.inter == 100
    denoise(DEFAULT_MODEL, tmp_path / "raw.nii.gz", tmp_path / "raw_out.nii.gz")
    said = denoise(DEFAULT_MODEL, tmp_path / "scaled.nii.gz", tmp_path / "scaled_out.nii.gz").stdout
    assert "background is masked at 100, taken as zero signal" in said
    raw_out, scaled_out = (nib.load(tmp_path / f"{n}_out.nii.gz").get_fdata() for n in ("raw", "scaled"))
    assert np.all(scaled_out[:, :8] == 100) and np.all(raw_out[:, :8] == 0)
    value_range = 2.5 * stored.max()
    difference = np.abs(scaled_out - (2.5 * raw_out + 100))
    assert difference.mean() < 1e-4 * value_range and difference.max() < 0.01 * value_range


def test_a_small_object_in_a_large_noisy_field_of_view_is_warned_about(tmp_path):
    """When the 1st-99th percentiles both lie in a noisy background, the object sits far above that range and
    would pass through undenoised as spikes do: the tool says so and what to do. A head that fills the image,
    with one spike, gets no such warning."""
    rows, columns = np.mgrid[:96, :96]
    disc = (rows - 48) ** 2 + (columns - 48) ** 2 < 4 ** 2  # 0.5% of the voxels
    clean = np.repeat(np.where(disc, 1000.0, 0.0)[:, :, None], 4, axis=2)
    draws = np.random.default_rng(0).standard_normal((2, *clean.shape))
    small = write_nifti(tmp_path / "small.nii.gz", np.hypot(clean + 30 * draws[0], 30 * draws[1]))
    head = noisy_phantom((40, 36, 4))[1]
    head[20, 18, 2] = 1e6 * head.max()
    head = write_nifti(tmp_path / "head.nii.gz", head)
    warned = denoise(DEFAULT_MODEL, small, tmp_path / "small_out.nii.gz").stdout
    assert "of the voxels" in warned and "crop the scan to the object" in warned
    assert "crop the scan" not in denoise(DEFAULT_MODEL, head, tmp_path / "head_out.nii.gz").stdout


def test_slices_across_a_thin_axis_of_thick_voxels_get_a_note(tmp_path):
    """A scan stored with its thick-slice axis first: the default --axis=2 would denoise stretched anatomy."""
    volume = np.moveaxis(noisy_phantom((40, 36, 6))[1], 2, 0)  # 6 x 40 x 36
    scan = write_nifti(tmp_path / "thick_first.nii.gz", volume, affine=np.diag([5.0, 0.5, 0.5, 1.0]))
    noted = denoise(DEFAULT_MODEL, scan, tmp_path / "out2.nii.gz").stdout
    assert "voxel sizes 5 x 0.5 x 0.5, thickest along axis 0: slices across it (--axis=0)" in noted
    assert "voxel sizes" not in denoise(DEFAULT_MODEL, scan, tmp_path / "out0.nii.gz", "--axis=0").stdout


FAST_MODEL = "trained_models/autoencoder_shufflenet_blind_unclipped_200epochs_672images.pt"  # README's fast choice


def test_the_default_keeps_the_intensity_of_tissue_brighter_than_the_99th_percentile(tmp_path):
    """The tool scales a scan so that its 1st and 99th percentiles are 0 and 1 and does not clip: the brightest
    voxels of a head (vessels, fat, CSF) reach the network above 1. The `_b4` DnCNN (the default until the
    morning of 2026-12-04), trained on slices clipped to [0, 1], pulls such voxels towards 1, and this check
    tells it from the default and from the network the README names as the fast choice."""
    rows, columns = np.mgrid[:96, :96]
    body = (rows - 48) ** 2 / 42 ** 2 + (columns - 48) ** 2 / 36 ** 2 < 1
    clean = np.where(body, 300 + 200 * np.sin(columns / 9) * np.cos(rows / 13), 0)  # texture of 100-500
    disc_columns = {900: 35, 1200: 61}  # discs of radius 3, 0.6% of the voxels: above the 99th percentile
    for level, column in disc_columns.items():
        clean = np.where((rows - 30) ** 2 + (columns - column) ** 2 < 3 ** 2, level, clean)
    clean = np.repeat(clean[:, :, None], 3, axis=2)
    draws = np.random.default_rng(0).standard_normal((2, *clean.shape))
    magnitude = np.hypot(clean + 20 * draws[0], 20 * draws[1]).astype(np.float32)
    scan = write_nifti(tmp_path / "bright.nii.gz", magnitude)
    disc_means = {}
    for name, model in (("default", DEFAULT_MODEL), ("fast", FAST_MODEL),
                        ("clipped", "trained_models/autoencoder_dncnn_blind_bf16_b4_200epochs_672images.pt")):
        denoise(model, scan, tmp_path / f"{name}.nii.gz")
        denoised = nib.load(tmp_path / f"{name}.nii.gz").get_fdata()
        disc_means[name] = [denoised[(rows - 30) ** 2 + (columns - column) ** 2 < 2 ** 2].mean() / level
                            for level, column in disc_columns.items()]  # inside each disc, away from its edge
    assert disc_means["default"] == pytest.approx([1, 1], rel=0.03)
    assert disc_means["fast"] == pytest.approx([1, 1], rel=0.03)
    assert max(disc_means["clipped"]) < 0.9


def test_the_rician_noise_floor_is_taken_out_of_a_magnitude_image(tmp_path):
    """Rician noise lifts a magnitude image's mean (to 1.25 sigma where there is no signal); a network trained
    on Gaussian noise keeps that floor unless it is taken out."""
    clean = phantom_volume((40, 36, 6))
    low, high = np.percentile(clean, [1, 99])
    sigma = SIGMA * (high - low)
    draws = np.random.default_rng(3).standard_normal((2, *clean.shape))
    magnitude = np.hypot(clean + sigma * draws[0], sigma * draws[1]).astype(np.float32)
    scan = write_nifti(tmp_path / "magnitude.nii.gz", magnitude)
    model = DEFAULT_MODEL
    result = denoise(model, scan, tmp_path / "out.nii.gz")
    assert "the Rician noise floor will be taken out" in result.stdout
    denoise(model, scan, tmp_path / "kept.nii.gz", "--rician_floor=false")
    out, kept = (nib.load(tmp_path / f"{name}.nii.gz").get_fdata() for name in ("out", "kept"))
    background, head = clean < 0.1 * high, clean > 0.2 * high  # the phantom: 0 (with noise of its own) or 240-720
    assert np.mean(kept[background]) > 0.5 * sigma and np.mean(out[background]) < 0.5 * np.mean(kept[background])
    assert np.mean(np.abs(out - clean)[head]) <= np.mean(np.abs(kept - clean)[head])


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_a_magnitude_image_of_huge_or_tiny_intensities_is_denoised_as_at_an_ordinary_scale(trained, tmp_path, scale):
    """The Rician floor is taken out on the scan's [0, 1] scale: in the scan's own units the squares of such
    values over- or underflow float32 (NaN or all-zero output before)."""
    model, _ = trained
    _, noisy = noisy_phantom((40, 36, 6))
    magnitude = np.abs(noisy)
    write_nifti(tmp_path / "ordinary.nii.gz", magnitude)
    write_nifti(tmp_path / "scaled.nii.gz", (magnitude * scale).astype(np.float32))
    for name in ("ordinary", "scaled"):
        denoise(model, tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_out.nii.gz")
    ordinary, scaled = (nib.load(tmp_path / f"{name}_out.nii.gz").get_fdata() for name in ("ordinary", "scaled"))
    assert np.all(np.isfinite(scaled))
    np.testing.assert_allclose(scaled / scale, ordinary, rtol=1e-3, atol=1e-4 * ordinary.max())


def test_empty_slices_around_a_scan_do_not_pull_its_noise_estimate_to_zero(trained, tmp_path):
    """A skull-stripped scan padded with empty slices: those show no noise and are left out of the median;
    an image with no noise anywhere is denoised as for sigma 0, with a warning that says so."""
    import re
    model, _ = trained
    _, noisy = noisy_phantom((40, 36, 6))
    magnitude = np.abs(noisy)
    padded = np.concatenate([np.zeros((40, 36, 5)), magnitude, np.zeros((40, 36, 7))], axis=2).astype(np.float32)
    estimates = []
    for name, volume in (("scan", magnitude), ("padded", padded)):
        result = denoise(model, write_nifti(tmp_path / f"{name}.nii.gz", volume), tmp_path / f"{name}_out.nii.gz")
        estimates.append(float(re.search(r"estimated noise sigma ([0-9.]+)", result.stdout).group(1)))
        assert "no noise could be measured" not in result.stdout
    assert estimates[1] == pytest.approx(estimates[0], rel=0.1) and estimates[0] > 0.03
    flat = np.full((40, 36, 6), 5.0, dtype=np.float32)
    result = denoise(model, write_nifti(tmp_path / "flat.nii.gz", flat), tmp_path / "flat_out.nii.gz")
    assert "no noise could be measured in" in result.stdout and "outside what" not in result.stdout


def test_a_noise_free_phantom_or_a_mask_comes_out_finite_and_is_said_to_hold_no_noise(trained, tmp_path):
    """Piecewise constant, no noise: the estimate read rounding error (1e-35), which the Rician floor's inversion
    divided by, writing Inf in every tissue voxel (and a 0/1 mask came back as 0/255 with --dtype=input)."""
    model, _ = trained
    phantom = np.zeros((40, 36, 6), dtype=np.float32)
    phantom[8:32, 6:30], phantom[16:24, 14:22] = 600, 800
    for name, volume, dtype in (("phantom", phantom, np.float32), ("mask", phantom > 0, np.uint8)):
        scan = write_nifti(tmp_path / f"{name}.nii.gz", volume, dtype=dtype)
        result = denoise(model, scan, tmp_path / f"{name}_out.nii.gz", "--dtype=input")
        assert "no noise could be measured" in result.stdout
        output = np.asarray(nib.load(tmp_path / f"{name}_out.nii.gz").dataobj)
        assert np.all(np.isfinite(output)) and output.max() <= 1.05 * volume.max()


def test_a_z_scored_skull_stripped_scan_is_denoised_and_its_masked_background_stays(trained, tmp_path):
    """A signed scan whose background a mask set to 0: the noise estimate once read 0 there (the background is no
    longer 0 once scaled), and the background came out textured."""
    import re
    model, _ = trained
    clean, noisy = noisy_phantom((40, 36, 6))
    head = clean > 0.2 * clean.max()
    scored = np.where(head, (noisy - noisy[head].mean()) / noisy[head].std(), 0).astype(np.float32)
    result = denoise(model, write_nifti(tmp_path / "z.nii.gz", scored), tmp_path / "z_out.nii.gz")
    assert "masked at 0, and stays so" in result.stdout
    assert float(re.search(r"estimated noise sigma ([0-9.]+)", result.stdout).group(1)) > 0.01
    output = nib.load(tmp_path / "z_out.nii.gz").get_fdata()
    assert np.all(output[~head] == 0)


def test_a_statistical_map_loses_its_intent_and_the_input_description_is_kept(trained, tmp_path):
    """Denoised t-values are no t(12) statistic any more; dcm2niix's description (TE, time) is not lost."""
    model, _ = trained
    _, noisy = noisy_phantom((40, 36, 6))
    image = nib.Nifti1Image(noisy, np.eye(4))
    image.header.set_intent("t test", (12,), name="tmap")
    image.header["descrip"] = b"TE=30;Time=101010.000;phase=1"
    nib.save(image, tmp_path / "tmap.nii.gz")
    result = denoise(model, tmp_path / "tmap.nii.gz", tmp_path / "out.nii.gz")
    assert "is a statistical map (t test)" in result.stdout
    output = nib.load(tmp_path / "out.nii.gz").header
    assert output.get_intent()[0] == "none"
    (comment,) = [e.get_content().decode() for e in output.extensions if e.get_code() == 6]
    assert comment.endswith("; the input's description: TE=30;Time=101010.000;phase=1")


def test_a_single_slice_stored_across_the_first_axis_is_refused_with_the_axis_to_use(trained, tmp_path):
    model, _ = trained
    _, noisy = noisy_phantom((40, 36, 1))
    scan = write_nifti(tmp_path / "one.nii.gz", np.transpose(noisy, (2, 0, 1)))  # (1, 40, 36)
    result = denoise(model, scan, tmp_path / "one_out.nii.gz", check=False)
    assert_one_line_error(result, "slices across axis 2 are 1x40 pixels", "--axis=0 gives 40x36 slices")
    assert not (tmp_path / "one_out.nii.gz").exists()
    denoise(model, scan, tmp_path / "one_out.nii.gz", "--axis=0")


def test_remove_rician_floor_recovers_the_signal_under_the_mean_of_rician_noise():
    from common import add_noise, remove_rician_floor
    draws = np.random.default_rng(0).standard_normal((2, 200_000)).astype(np.float32)
    for signal in (0.0, 0.03, 0.2, 0.5, 2.0):  # from pure noise, whose mean is 1.25 sigma, to 33 sigma
        mean = float(np.mean(add_noise(np.full(200_000, signal, np.float32), 0.06, "rician", draws)))
        assert mean - signal > 0.0005
        assert remove_rician_floor(mean, 0.06) == pytest.approx(signal, abs=0.006)  # sqrt(x^2 - sigma^2): 0.045 at 0


def test_remove_rician_floor_inverts_the_exact_mean_inside_and_beyond_its_table():
    from common import remove_rician_floor, rician_mean
    signal_in_sigmas = np.array([0, 0.02, 0.3, 1, 3, 10, 19.9, 20.1, 40])  # its table ends at 20 sigma
    means = (rician_mean(signal_in_sigmas) * 0.05).astype(np.float32)
    np.testing.assert_allclose(remove_rician_floor(means, 0.05), signal_in_sigmas * 0.05, rtol=1e-4, atol=2e-5)


def test_a_spike_does_not_steer_the_adaptation(trained, tmp_path):
    """The adaptation and the noise estimate see the slices as the network does, the spike replaced: with the
    spike, the object (where an adapted network is used) once shrank to 0% of the pixels, above the spike's
    level, so a kept adaptation was used nowhere."""
    noisy = noisy_phantom((40, 36, 6))[1]
    noisy[20, 18, 3] = 1e6 * noisy.max()
    scan = write_nifti(tmp_path / "spiky.nii.gz", noisy)
    result = denoise(DEFAULT_MODEL, scan,
                     tmp_path / "out.nii.gz", "--adapt_steps=10")
    object_percent = int(result.stdout.split("checked in the object: ")[1].split("%")[0])
    assert object_percent > 20
    sigma = float(result.stdout.split("estimated noise sigma ")[1].split()[0])
    assert 0.04 < sigma < 0.09  # the phantom's noise is 0.06 on the tool's scale


def test_a_header_display_range_is_not_copied_onto_the_denoised_values(trained, tmp_path):
    model, _ = trained
    image = nib.Nifti1Image(noisy_phantom((20, 18, 4))[1], np.eye(4))
    image.header["cal_min"], image.header["cal_max"] = 0, 1234
    nib.save(image, str(tmp_path / "scan.nii.gz"))
    denoise(model, tmp_path / "scan.nii.gz", tmp_path / "out.nii.gz")
    header = nib.load(tmp_path / "out.nii.gz").header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0, 0)


def write_bad_checkpoint(kind, path):
    if kind == "plain_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "wrong_arch":
        torch.save({"state_dict": build_model("seed").state_dict(),
                    "metadata": complete_metadata | {"arch": "dncnn"}}, path)
    elif kind == "bad_metadata":
        torch.save({"state_dict": build_model("seed").state_dict(), "metadata": "seed"}, path)
    elif kind == "incomplete_metadata":
        metadata = {key: value for key, value in complete_metadata.items() if key != "normalisation"}
        torch.save({"state_dict": build_model("seed").state_dict(), "metadata": metadata}, path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "resume":
        path = path.with_suffix(".resume.pt")
        torch.save({"state_dict": build_model("seed").state_dict(), "metadata": complete_metadata}, path)
    return path


complete_metadata = {"format_version": CHECKPOINT_FORMAT, "arch": "seed", "arch_args": {}, "noise_map": False,
                     "n_parameters": 9569,
                     "noise_sigma_range": [0.06, 0.06], "normalisation": {"low_percentile": 1, "high_percentile": 99}}


@pytest.mark.parametrize("kind, fragment", [
    ("plain_dict", "not a checkpoint of this repo"),
    ("text", "not a readable PyTorch checkpoint"),
    ("wrong_arch", "Missing key(s) in state_dict"),
    ("bad_metadata", "not a checkpoint of this repo"),
    ("incomplete_metadata", "its metadata lacks normalisation"),
    ("missing", "no such checkpoint"),
    ("folder", "is a folder; expected a checkpoint"),
    ("resume", "use the checkpoint beside it (model.pt)"),
])
def test_bad_checkpoint_is_one_clear_error(tmp_path, kind, fragment):
    scan = write_nifti(tmp_path / "scan.nii.gz", noisy_phantom((20, 18, 6))[1])
    model = write_bad_checkpoint(kind, tmp_path / "model.pt")
    result = denoise(model, scan, tmp_path / "out.nii.gz", check=False)
    assert_one_line_error(result, str(model), fragment)
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("noise", ["gaussian", "rician", "rician, resampled"])
def test_the_noise_sigma_is_estimated_on_the_tool_scale_for_gaussian_and_magnitude_scans(trained, tmp_path, noise):
    """The tool's 1-99 percentile scaling leaves 1% negative values in any scan, so whether a scan is a
    magnitude image (Rayleigh noise in its background) is read from its stored values, not from the scaled ones;
    a few small negative values, as spline or sinc resampling leaves in a magnitude image, do not change that
    (one negative voxel read 35% low before). Taking this Gaussian scan for a magnitude image reads 0.072 for
    0.051; its sharp-edged 64x64 slices still bias the wavelet estimate up by about 16%."""
    import re
    model, _ = trained
    clean = phantom_volume((64, 64, 6))
    sigma = 0.06 * np.percentile(clean, 99)
    draws = np.random.default_rng(0).normal(0, sigma, (2, *clean.shape))
    noisy = clean + draws[0] if noise == "gaussian" else np.hypot(clean + draws[0], draws[1])
    if noise == "rician, resampled":
        noisy.flat[::500] = -0.01 * noisy.max()  # 0.2% of the voxels
    write_nifti(tmp_path / "scan.nii.gz", noisy.astype(np.float32))
    result = denoise(model, tmp_path / "scan.nii.gz", tmp_path / "denoised.nii.gz")
    estimated = float(re.search(r"estimated noise sigma ([0-9.]+)", result.stdout).group(1))
    low, high = np.percentile(noisy, [1, 99])
    assert estimated == pytest.approx(sigma / (high - low), rel=0.2)
    assert ("a magnitude image" in result.stdout) == noise.startswith("rician")


def test_the_evaluation_grids_show_each_slice_position_once_and_name_it(trained, tmp_path, monkeypatch):
    import matplotlib.figure
    import use_trained_autoencoder
    from conftest import run_in_process
    model, dataset = trained
    grids = []

    def record(noisy, denoised, clean, masks, title, row_labels):
        grids.append((noisy, row_labels))
        return matplotlib.figure.Figure()
    monkeypatch.setattr(use_trained_autoencoder, "plot_denoising_grid", record)
    run_in_process(use_trained_autoencoder, f"--model={model}", f"--dataset_path={dataset}",
                   f"--examples_dir={tmp_path}")
    with np.load(dataset) as archive:
        n_positions = len(set(archive["slice_index"][archive["split"] == "test"].tolist()))
    assert [len(labels) for _, labels in grids] == [2, 5]
    for noisy, labels in grids:
        n_distinct = min(len(labels), n_positions)
        assert len(set(labels[:n_distinct])) == n_distinct
        assert all(label.startswith("tiny.nii.gz, slice ") for label in labels)
        assert len({row.tobytes() for row in noisy}) == len(noisy)  # no image twice
