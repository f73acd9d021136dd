"""benchmark_inference.py end to end on a tiny series, a tiny volume and a network trained for one epoch."""
import json

from conftest import phantom_volume, run_script, write_nifti


def test_a_tiny_inference_benchmark_measures_time_memory_and_adaptation(tmp_path):
    scan = write_nifti(tmp_path / "scan.nii.gz", phantom_volume((32, 28, 10, 2)))
    dataset = tmp_path / "data.npz"
    run_script("make_dataset", f"--input_paths={scan}", f"--output={dataset}", "--target_n_images=100")
    run_script("train_autoencoder", f"--dataset_path={dataset}", f"--models_dir={tmp_path}", f"--plots_dir={tmp_path}",
               f"--examples_dir={tmp_path}", "--arch=dncnn", '--arch_args={"depth": 3, "width": 8, "noise_map": true}',
               "--n_epochs=1", "--batch_size=8")
    model = next(p for p in tmp_path.glob("autoencoder_dncnn_*.pt") if not p.name.endswith(".resume.pt"))
    results_path = tmp_path / "inference.json"
    readme = "<!-- benchmark_inference:start -->\nold table\n<!-- benchmark_inference:end -->\n"
    (tmp_path / "README.md").write_text(readme)
    work_dir = tmp_path / "kept"
    work_dir.mkdir()
    (work_dir / "series.nii.gz").write_text("the user's own file")
    result = run_script("benchmark_inference", f"--model={model}", "--shape=24,20,3,4", "--adapt_shape=24,24,3",
                        "--adapt_steps=2", "--n_bm3d_slices=2", f"--results_path={results_path}",
                        "--precision=float32", f"--work_dir={work_dir}", cwd=tmp_path)
    assert (work_dir / "series.nii.gz").read_text() == "the user's own file"  # the run's files go in a new folder
    (kept,) = work_dir.glob("benchmark_inference_*")
    assert (kept / "series.nii.gz").stat().st_size > 0 and (kept / "denoised.nii.gz").stat().st_size > 0
    results = json.loads(results_path.read_text())
    assert results["n_slices"] == 12
    assert results["precision"] == "float32" and "(convolutions in float32)" in result.stdout  # passed to the tool
    assert results["network"]["seconds"] > 0 and results["memory"]["peak_rss_mb"] > 50
    assert results["psnr_mask_db"]["bm3d"] > results["psnr_mask_db"]["noisy"]
    adaptation = results["adaptation"]
    assert adaptation["tool_said"].startswith("adaptation: 2 steps")
    assert adaptation["psnr_mask_without"] > 0 and adaptation["psnr_mask_with"] > 0
    assert "--adapt_steps=2" in result.stdout
    assert (tmp_path / "README.md").read_text() == readme  # only --update_readme=true writes the measured tables
