"""What a noisy reference does to a benchmark: the T1 check, with the truth known.

The out-of-domain T1 (anatomical.nii) holds noise of its own (sigma about 0.045 on the [0, 1] scale), and
benchmark_denoisers.py scores denoisers of T1 + synthetic noise against that noisy T1, so a method scores
higher the more of the T1's own noise it leaves in. This script builds the same situation where the truth is
known: the test split's clean slices get noise of their own (`reference_sigma`) to make a noisy "reference",
synthetic noise (`noise_sigma`) on top is the input, and every method is scored against both the noisy
reference (as the T1 is scored) and the clean slices (the truth). BM3D is given the synthetic sigma (as in
benchmark_denoisers.py) and the total sigma; networks get the sigma estimated from their input.
Writes denoising_examples/benchmark_noisy_reference.json, and the table into README.md with --update_readme=true.

    python scripts/benchmark_noisy_reference.py [--model_paths=a.pt,b.pt] [--reference_sigma=0.045]"""
import numpy as np

from common import (DEFAULT_MODEL, InputError, add_noise, apply_overrides, bm3d_slices, check_file_exists,
                    check_output_path, check_seed, denoise_slices, denoise_with_adaptation, estimate_noise_sigma,
                    keep_freed_memory, load_checkpoint, mean_psnr_in_mask, native_bfloat16, network_name,
                    package_versions, pick_device, run_main, save_json, unique_clean_slices, use_bfloat16,
                    write_into_readme)

# --- settings: edit here, or override on the command line: --reference_sigma=0.03
dataset_path = "data/mri_denoising.npz"
split = "test"
model_paths = [DEFAULT_MODEL]
reference_sigma = 0.045           # the reference's own noise: the T1's, as benchmark_denoisers.py estimates it
noise_sigma = 0.06                # the synthetic noise added to the reference
n_realisations = 3                # noisy inputs per reference slice
adapt_steps = 300                 # each network is also scored after adaptation (use_trained_autoencoder --adapt_steps)
adapt_seconds = 900.0             # quality is measured here, not speed: room for all the steps on a busy machine
precision = "auto"                # of the networks: "auto", "float32" or "bfloat16" (see use_trained_autoencoder.py)
seed = 0
results_path = "denoising_examples/benchmark_noisy_reference.json"
update_readme = False             # true: write the table into README.md between the benchmark_noisy_reference markers
# ---


def network_outputs(path, noisy, bfloat16):
    """{row name: denoised slices} of one network, without and with adaptation, and what the adaptation did."""
    model, _ = load_checkpoint(path)
    name = network_name(path)
    sigma = estimate_noise_sigma(noisy)
    adapted_output, adaptation = denoise_with_adaptation(model, noisy, sigma, adapt_steps, adapt_seconds,
                                                         bfloat16=bfloat16)
    verdict = "kept" if adaptation["kept"] else "not kept"
    return {name: denoise_slices(model, noisy, sigma, bfloat16=bfloat16),
            f"{name} + adaptation ({adaptation['steps']} steps, {verdict})": adapted_output}, adaptation


def markdown_table(rows, n_slices):
    lines = [f"Test slices with noise of their own (sigma {reference_sigma}) as the reference, synthetic noise of "
             f"sigma {noise_sigma} on top as the input, {n_slices} noisy slices; in-mask PSNR (dB):", "",
             "| method | against the noisy reference (as the T1 is scored) | against the clean slices (the truth) |",
             "| --- | --- | --- |"]
    lines += [f"| {name} | {row['psnr_vs_reference']:.2f} | {row['psnr_vs_clean']:.2f} |" for name, row in rows.items()]
    return "\n".join(lines)


def main():
    keep_freed_memory()
    apply_overrides(globals())
    if split not in ("test", "val") or n_realisations < 1 or not (reference_sigma >= 0 and noise_sigma > 0):
        raise InputError(f"split={split!r}, n_realisations={n_realisations}, reference_sigma={reference_sigma}, "
                         f"noise_sigma={noise_sigma}; expected 'test' or 'val', 1 or more, 0 or more and above 0")
    for path in model_paths:  # before BM3D's minutes, not after
        check_file_exists(path, "checkpoint")
    check_output_path(results_path)
    check_seed(seed)
    rng = np.random.default_rng(seed)
    clean, masks, _, _ = unique_clean_slices(dataset_path, split)
    reference = add_noise(clean, reference_sigma, "gaussian", rng.standard_normal((2, *clean.shape), dtype=np.float32))
    clean, reference, masks = (np.repeat(a, n_realisations, axis=0) for a in (clean, reference, masks))
    noisy = add_noise(reference, noise_sigma, "gaussian", rng.standard_normal((2, *reference.shape), dtype=np.float32))
    total_sigma = float(np.hypot(reference_sigma, noise_sigma))
    bfloat16 = use_bfloat16(precision, pick_device())
    outputs = {"noisy input": noisy, f"BM3D (synthetic sigma {noise_sigma})": bm3d_slices(noisy, noise_sigma),
               f"BM3D (total sigma {total_sigma:.3f})": bm3d_slices(noisy, total_sigma)}
    adaptations = {}
    for path in model_paths:
        network_rows, adaptations[path] = network_outputs(path, noisy, bfloat16)
        outputs.update(network_rows)
    rows = {name: {"psnr_vs_reference": mean_psnr_in_mask(reference, out, masks),
                   "psnr_vs_clean": mean_psnr_in_mask(clean, out, masks)} for name, out in outputs.items()}
    markdown = markdown_table(rows, len(noisy))
    print(markdown)
    save_json({"dataset": dataset_path, "split": split, "reference_sigma": reference_sigma, "noise_sigma": noise_sigma,
               "n_slices": len(noisy), "estimated_sigma": estimate_noise_sigma(noisy), "rows": rows,
               "adaptation": adaptations, "adapt_steps": adapt_steps, "adapt_seconds": adapt_seconds,
               "precision": "bfloat16" if bfloat16 else "float32", "native_bfloat16": native_bfloat16(pick_device()),
               "seed": seed, "versions": package_versions()}, results_path)
    print(f"results written to {results_path}")
    if update_readme:
        write_into_readme(markdown, "benchmark_noisy_reference")


if __name__ == "__main__":
    run_main(main)
