"""benchmark_denoisers.py end to end on a tiny dataset and a tiny network, in a temporary folder."""
import json
import os

import nibabel as nib
import numpy as np
import pytest

from conftest import DEFAULT_MODEL, REPO, assert_one_line_error, phantom_volume, run_script, write_nifti


def test_the_gain_over_bm3d_is_paired_per_slice_and_clustered_by_position():
    """Draws of one slice position are no independent samples of anatomy: its standard error comes from the
    per-position means. A pairing of the wrong slices would change the per-slice standard error."""
    from benchmark_denoisers import gain_statistics
    network = np.array([30.0, 30.2, 31.0, 31.1, 29.0, 29.3])
    bm3d = np.array([29.6, 29.9, 30.5, 30.7, 28.7, 28.9])
    positions = np.array([0, 0, 1, 1, 2, 2])
    stats = gain_statistics(network - bm3d, positions)
    gains = network - bm3d
    assert stats["mean"] == pytest.approx(gains.mean())
    assert stats["standard_error"] == pytest.approx(np.std(gains, ddof=1) / np.sqrt(6))
    assert stats["n_positions"] == 3
    assert stats["standard_error_by_position"] == pytest.approx(np.std([0.35, 0.45, 0.35], ddof=1) / np.sqrt(3))
    mispaired = gain_statistics(network - bm3d[::-1], positions)
    assert mispaired["standard_error"] > 5 * stats["standard_error"]
    assert "n_positions" not in gain_statistics(gains)


def test_a_tiny_benchmark_scores_every_method(tmp_path):
    scan = write_nifti(tmp_path / "scan.nii.gz", phantom_volume((40, 36, 14, 2)))
    dataset = tmp_path / "data.npz"
    run_script("make_dataset", f"--input_paths={scan}", f"--output={dataset}", "--target_n_images=200")
    run_script("train_autoencoder", f"--dataset_path={dataset}", f"--models_dir={tmp_path}", f"--plots_dir={tmp_path}",
               f"--examples_dir={tmp_path}", "--arch=unet", '--arch_args={"width": 8}', "--n_epochs=2",
               "--batch_size=8", "--noise_sigma_range=0.03,0.12", "--augment", "--patch_size=32")  # for the self-ensemble
    model = next(p for p in tmp_path.glob("autoencoder_unet_*.pt") if not p.name.endswith(".resume.pt"))
    series = phantom_volume((40, 36, 3, 6))
    noisy_series = series + np.random.default_rng(0).normal(0, 0.05 * series.max(), series.shape)
    real = write_nifti(tmp_path / "series.nii.gz", noisy_series.astype(np.float32))
    run_script("benchmark_denoisers", f"--dataset_path={dataset}", f"--model_paths={model}",
               f"--adapt_model_paths={model}", f"--true_sigma_model_paths={model}", f"--self_ensemble_model_paths={model}",
               f"--float32_model_paths={model}", "--precision=bfloat16",
               "--adapt_steps=3", "--sigmas=0.03,0.1", "--main_sigma=0.1",
               "--n_realisations=1", "--n_tuning_slices=2", "--ood_scans=test_split:coarse", f"--tsnr_scans={real}",
               "--gaussian_widths=0.5,1.0", "--nlm_strengths=0.8", "--update_readme=false",
               "--examples_dir=bench_out", "--plots_dir=bench_plots", cwd=tmp_path)
    results = json.loads((tmp_path / "bench_out" / "benchmark_gaussian.json").read_text())
    rows = results["sweep"]["0.1"]
    names = list(rows)
    assert names[0] == "noisy input" and names[3] == "BM3D (true sigma)"
    assert names[1:3] == ["Gaussian filter (width tuned on val)", "non-local means (h tuned on val)"]
    assert results["tuned_on_val"]["0.1"]["nlm_strength"] == 0.8
    bm3d_true, bm3d_estimated = (rows[f"BM3D ({s} sigma)"]["psnr_mask"]["mean"] for s in ("true", "estimated"))
    assert bm3d_estimated != bm3d_true and abs(bm3d_estimated - bm3d_true) < 1  # told 0.08-0.12 for 0.1
    assert 0.08 < results["estimated_sigma"]["0.1"] < 0.12 and results["estimated_sigma"]["0.03"] < 0.05
    assert any(name.startswith("unet") and "adaptation" not in name for name in names)
    assert any(name.endswith("+ adaptation") for name in names)
    assert any(name.endswith("given the true sigma") for name in names)
    plain_name = next(name for name in names if name.startswith("unet") and " (" in name)
    plain_psnr = rows[plain_name]["psnr_mask"]["mean"]
    assert rows[plain_name.split(" (")[0] + " x8 self-ensemble"]["psnr_mask"]["mean"] != plain_psnr
    gain = rows[plain_name]["psnr_mask_gain_over_bm3d"]  # paired per slice, so it is the difference of the means
    assert gain["mean"] == pytest.approx(plain_psnr - rows["BM3D (true sigma)"]["psnr_mask"]["mean"])
    assert gain["standard_error"] > 0 and rows["BM3D (true sigma)"]["psnr_mask_gain_over_bm3d"]["mean"] == 0
    assert gain["n_positions"] == len(set(np.load(dataset)["slice_index"][np.load(dataset)["split"] == "test"]))
    assert results["precision"] == "bfloat16"
    float32_psnr = rows[plain_name.split(" (")[0] + " in float32"]["psnr_mask"]["mean"]
    assert float32_psnr == pytest.approx(plain_psnr, abs=0.05) and float32_psnr != plain_psnr
    adapted_rows = [row for name, row in rows.items() if "adaptation" in name]
    adapted_rows += [row for name, row in results["ood"]["test_split:coarse"].items() if "adaptation" in name]
    assert len(adapted_rows) == 4 and all(row["adaptation"]["steps"] == 3 for row in adapted_rows)
    assert all(isinstance(row["adaptation"]["kept"], bool) for row in adapted_rows)
    assert rows["BM3D (true sigma)"]["psnr_mask"]["mean"] > rows["noisy input"]["psnr_mask"]["mean"] + 3
    assert all(row["seconds_per_slice"] > 0 for name, row in rows.items() if name != "noisy input")
    assert set(results["ood"]) == {"test_split:coarse"}
    assert set(results["reference_sigma"]) == {"test", "test_split:coarse"}
    assert all(0 <= sigma < 0.03 for sigma in results["reference_sigma"].values())  # a noise-free phantom
    # what the networks were told: 20x18 phantom slices, dense with edges, read about 20% high
    assert results["estimated_sigma"]["test_split:coarse"] == pytest.approx(0.1, rel=0.3)
    assert (tmp_path / "bench_plots" / "psnr_vs_sigma_gaussian.png").stat().st_size > 10_000
    assert (tmp_path / "bench_out" / "comparison_gaussian.png").stat().st_size > 10_000
    assert not (tmp_path / "denoising_examples").exists() and not (tmp_path / "plots").exists()
    tsnr = results["tsnr"][str(real)]
    assert tsnr["shape"] == [40, 36, 3, 6] and 0.02 < tsnr["estimated_sigma"] < 0.1
    assert tsnr["median_tsnr"]["BM3D (true sigma)"] > 1.5 * tsnr["median_tsnr"]["noisy input"]
    assert "BM3D (estimated sigma)" not in tsnr["median_tsnr"]  # the true sigma is the estimate here: not run twice


def test_an_out_of_domain_4d_scan_is_scored_on_every_volume(tmp_path):
    """As use_trained_autoencoder.py denoises (and adapts on) every volume of a 4D file."""
    from benchmark_denoisers import ood_clean_slices
    from common import normalise, percentile_range
    series = phantom_volume((20, 18, 5, 3))
    series[:, :, :, 1] *= 0.5  # each volume must come out as itself
    scan = write_nifti(tmp_path / "series.nii.gz", series)
    clean, masks = ood_clean_slices(scan, None, 0.15)
    n_kept = len(clean) // 3
    assert clean.shape == (3 * n_kept, 20, 18) and masks.shape == clean.shape and n_kept >= 3
    expected = normalise(series, *percentile_range(series))  # unclipped, as the tool scales a scan
    for k in range(n_kept):
        z = next(z for z in range(5) if np.allclose(clean[k], expected[:, :, z, 0]))
        assert all(np.allclose(clean[t * n_kept + k], expected[:, :, z, t]) for t in (1, 2))
        assert all(np.array_equal(masks[t * n_kept + k], masks[k]) for t in (1, 2))
    # the slices kept are those whose head covers the dataset's min_foreground_fraction (this phantom's: 49-51%)
    assert len(ood_clean_slices(scan, None, 0.5)[0]) == 3 * 3


def test_an_adaptation_that_was_not_kept_is_marked_in_the_tables():
    from benchmark_denoisers import psnr_cell
    assert psnr_cell({"psnr_mask": {"mean": 27.456}}) == "27.46"
    assert psnr_cell({"psnr_mask": {"mean": 27.456}, "adaptation": {"kept": True}}) == "27.46"
    assert psnr_cell({"psnr_mask": {"mean": 27.456}, "adaptation": {"kept": False}}) == "27.46 (not kept)"


def test_the_comparison_figure_shows_classical_methods_the_seed_the_default_and_the_best():
    from benchmark_denoisers import CLASSICAL_METHODS, compared_methods
    scores = dict(zip(CLASSICAL_METHODS, (24, 26, 27, 27.8)))
    scores.update({"shufflenet (1 parameters)": 28.0, "shufflenet x8 self-ensemble": 28.1, "dncnn (2 parameters)": 28.3,
                   "dncnn given the true sigma": 28.4, "seed_10 (3 parameters)": 25, "seed_100 (3 parameters)": 26.8})
    rows = {name: {"psnr_mask": {"mean": score}} for name, score in scores.items()}
    # the best as a user runs it: not the row told the true sigma
    assert compared_methods(rows) == [*CLASSICAL_METHODS, "seed_10 (3 parameters)", "shufflenet (1 parameters)",
                                      "dncnn (2 parameters)"]
    rows["shufflenet (1 parameters)"]["psnr_mask"]["mean"] = 29  # the default is the best: shown once
    assert compared_methods(rows)[4:] == ["seed_10 (3 parameters)", "shufflenet (1 parameters)"]


def test_the_comparison_figure_keeps_its_title_and_labels_each_panel():
    from benchmark_denoisers import CLASSICAL_METHODS, plot_comparison
    clean = np.random.default_rng(0).random((2, 24, 20), dtype=np.float32)
    names = [*CLASSICAL_METHODS, "shufflenet_blind_200epochs_672images (1 parameters)"]
    outputs = {name: clean + 0.01 * k for k, name in enumerate(names)}
    rows = {name: {"psnr_mask": {"mean": 20.0 + k}} for k, name in enumerate(names)}
    figure = plot_comparison(outputs, (None, clean, clean > 0.5), rows, "gaussian noise, sigma 0.06, a test slice")
    assert figure._suptitle.get_text() == "gaussian noise, sigma 0.06, a test slice"
    titles = [axis.get_title() for axis in figure.axes[:len(names) + 1]]
    assert titles[-2] == "shufflenet_blind_\n200epochs_672images\n24.00 dB" and titles[-1] == "clean"


def test_with_rician_noise_the_floor_comes_out_of_gaussian_trained_networks_and_an_extra_bm3d_row():
    from benchmark_denoisers import BM3D_WITHOUT_FLOOR, all_methods, network_method
    from common import add_noise, load_checkpoint, remove_rician_floor
    model, metadata = load_checkpoint(DEFAULT_MODEL)
    clean = phantom_volume((32, 28, 2)).transpose(2, 0, 1) / 1000
    draws = np.random.default_rng(0).standard_normal((2, *clean.shape))
    noisy = add_noise(clean, 0.06, "rician", draws).astype(np.float32)
    plain = network_method(model, metadata, False, given_sigma=0.06)(noisy)
    floor_out = network_method(model, metadata, False, given_sigma=0.06, rician=True)(noisy)
    np.testing.assert_allclose(floor_out, remove_rician_floor(plain, 0.06), atol=1e-6)
    assert floor_out.mean() < plain.mean() - 0.001
    rician_trained = network_method(model, metadata | {"noise_model": "rician"}, False, given_sigma=0.06, rician=True)
    np.testing.assert_array_equal(rician_trained(noisy), plain)  # it learnt to remove the floor itself
    networks = {"dncnn": (model, metadata, "dncnn.pt")}
    assert BM3D_WITHOUT_FLOOR in all_methods(0.06, 0.5, 0.8, networks, False, rician=True)
    assert BM3D_WITHOUT_FLOOR not in all_methods(0.06, 0.5, 0.8, networks, False, rician=False)


SHIPPED = os.path.join(REPO, DEFAULT_MODEL)


@pytest.mark.parametrize("script, overrides, fragment", [
    ("benchmark_denoisers", ["--ood_scans=test_split:medium"], "expected test_split:coarse, test_split:fine"),
    ("benchmark_denoisers", ["--tsnr_scans=notes.txt"], "notes.txt is not an image nibabel can read"),
    ("benchmark_denoisers", ["--n_realisations=0"], "n_realisations=0"),
    ("benchmark_denoisers", ["--sigmas=-0.06", "--main_sigma=-0.06"], "expected sigmas above 0"),
    ("benchmark_noisy_reference", ["--split=tset"], "split='tset'"),
    ("benchmark_noisy_reference", ["--model_paths=missing.pt"], "missing.pt: no such checkpoint"),
    ("benchmark_inference", ["--n_bm3d_slices=0"], "n_bm3d_slices=0"),
    # scans that failed only after the main sweep, with a traceback (or, 8x8 slices, BM3D's segmentation fault)
    ("benchmark_denoisers", ["--ood_scans=flat.nii.gz"], "flat.nii.gz has shape (12, 12); expected a 3D or 4D scan"),
    ("benchmark_denoisers", ["--ood_scans=nan.nii.gz"], "nan.nii.gz contains 1 NaN or Inf values"),
    ("benchmark_denoisers", ["--ood_scans=small.nii.gz"], "small.nii.gz: slices of 8x8 pixels; BM3D needs"),
    ("benchmark_denoisers", ["--tsnr_scans=small.nii.gz"], "small.nii.gz: slices of 8x8 pixels"),
    ("benchmark_inference", ["--shape=8,8,2,2"], "shape=[8, 8, 2, 2]: slices of 8x8 pixels; BM3D needs at least 8"),
    ("benchmark_denoisers", ["--tsnr_scans=volume.nii.gz"], "need a 4D series of 3 or more volumes, this has shape "
                                                            "(12, 12, 3)"),
    ("benchmark_denoisers", ["--examples_dir=notes.txt"], "notes.txt is a file, not a folder"),
    ("benchmark_denoisers", ["--seed=-1"], "seed=-1"),
    ("benchmark_noisy_reference", ["--results_path=notes", f"--model_paths={SHIPPED}"], "notes is a folder"),
    ("benchmark_adaptation_guard", ["--results_path=notes", f"--model_path={SHIPPED}"], "notes is a folder"),
    ("benchmark_inference", ["--work_dir=notes.txt", f"--model={SHIPPED}"], "work_dir=notes.txt is a file"),
])
def test_bad_benchmark_settings_are_one_line_before_any_work(tmp_path, script, overrides, fragment):
    """Checked before minutes of BM3D, not after them; nothing is written."""
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "notes").mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("flat", (12, 12)), ("nan", (12, 12, 3)), ("small", (8, 8, 3, 4)), ("volume", (12, 12, 3))):
        voxels = rng.random(shape).astype(np.float32)
        voxels.flat[0] = np.nan if name == "nan" else voxels.flat[0]
        nib.save(nib.Nifti1Image(voxels, np.eye(4)), tmp_path / f"{name}.nii.gz")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_script(script, *overrides, check=False, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_test_slices_that_would_resample_too_small_for_bm3d_are_refused_before_any_work(tmp_path):
    """test_split:coarse halves the slices: 16x16 test slices would reach BM3D as 8x8, which crashes the process."""
    scan = write_nifti(tmp_path / "small.nii.gz", phantom_volume((16, 16, 8, 3)))
    run_script("make_dataset", f"--input_paths={scan}", f"--output={tmp_path / 'small.npz'}", "--target_n_images=1")
    result = run_script("benchmark_denoisers", f"--dataset_path={tmp_path / 'small.npz'}", f"--model_paths={SHIPPED}",
                        "--ood_scans=test_split:coarse", "--tsnr_scans=", f"--examples_dir={tmp_path}",
                        f"--plots_dir={tmp_path}", check=False, cwd=tmp_path)
    assert_one_line_error(result, "test_split:coarse: slices of 8x8 pixels")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.nii.gz", "small.npz"]
