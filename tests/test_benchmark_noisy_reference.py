"""benchmark_noisy_reference.py end to end on the tiny dataset and a network trained for one epoch."""
import json

import numpy as np
import pytest

from conftest import run_script


def test_each_method_is_scored_against_the_noisy_reference_and_the_clean_slices(tmp_path, tiny_dataset):
    run_script("train_autoencoder", f"--dataset_path={tiny_dataset}", f"--models_dir={tmp_path}",
               f"--plots_dir={tmp_path}", f"--examples_dir={tmp_path}", "--arch=dncnn",
               '--arch_args={"depth": 3, "width": 8, "noise_map": true}', "--n_epochs=1", "--batch_size=4")
    model = next(p for p in tmp_path.glob("autoencoder_dncnn_*.pt") if not p.name.endswith(".resume.pt"))
    results_path = tmp_path / "noisy_reference.json"
    readme = "before\n<!-- benchmark_noisy_reference:start -->\nold table\n<!-- benchmark_noisy_reference:end -->\n"
    (tmp_path / "README.md").write_text(readme)
    run_script("benchmark_noisy_reference", f"--dataset_path={tiny_dataset}", f"--model_paths={model}",
               "--reference_sigma=0.05", "--noise_sigma=0.1", "--n_realisations=6", "--adapt_steps=2",
               "--precision=float32", f"--results_path={results_path}", cwd=tmp_path)
    results = json.loads(results_path.read_text())
    rows = results["rows"]
    name = model.name.removeprefix("autoencoder_").removesuffix(".pt")
    assert list(rows)[:4] == ["noisy input", "BM3D (synthetic sigma 0.1)", "BM3D (total sigma 0.112)", name]
    assert len(rows) == 5 and list(rows)[4].startswith(f"{name} + adaptation (2 steps, ")
    # the input holds the synthetic noise against the reference, and both noises against the clean slices
    assert rows["noisy input"]["psnr_vs_reference"] == pytest.approx(-20 * np.log10(0.1), abs=0.5)
    assert rows["noisy input"]["psnr_vs_clean"] == pytest.approx(-10 * np.log10(0.1 ** 2 + 0.05 ** 2), abs=0.5)
    assert rows["BM3D (total sigma 0.112)"]["psnr_vs_clean"] > rows["noisy input"]["psnr_vs_clean"] + 2
    assert results["adaptation"][str(model)]["steps"] == 2
    assert 0.09 < results["estimated_sigma"] < 0.13
    assert (tmp_path / "README.md").read_text() == readme  # only --update_readme=true writes the measured tables
    run_script("benchmark_noisy_reference", f"--dataset_path={tiny_dataset}", f"--model_paths={model}",
               "--n_realisations=1", "--adapt_steps=1", f"--results_path={results_path}", "--update_readme=true",
               cwd=tmp_path)
    written = (tmp_path / "README.md").read_text()
    assert "old table" not in written and "| noisy input |" in written
