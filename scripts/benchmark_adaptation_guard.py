"""How well the adaptation's guard decides: over several noise draws of each set, what the adapted network
would have gained had it always been kept, and which draws each rule keeps.

use_trained_autoencoder.py --adapt_steps fine-tunes the network on the scan's own slices and keeps the result
only when two self-supervised checks on held-out pixels agree (common.keeps_adaptation). This script adapts
on each noisy draw, scores the adapted network (kept or not) and the trained one against the clean slices,
and counts the draws that each rule keeps: the current one and the one before 2026-12-05 (both checks had to
show a gain, for any noise). Scored on the validation split (and its resampled and other-contrast versions,
as benchmark_denoisers.py makes them from the test split), so a rule can be chosen without the test slices.
Writes denoising_examples/benchmark_adaptation_guard.json, and the table into README.md with --update_readme=true.

    python scripts/benchmark_adaptation_guard.py [--model_path=a.pt] [--n_draws=4]"""
import numpy as np

from benchmark_denoisers import TEST_SPLIT_CHANGES, noisy_versions, ood_clean_slices
from common import (DEFAULT_MODEL, MAX_NOISE_SIGMA, InputError, adapt_to_slices, apply_overrides, check_file_exists,
                    check_output_path, check_seed, denoise_adapted, denoise_slices, estimate_noise_sigma,
                    keep_freed_memory, keeps_adaptation, load_checkpoint, mean_psnr_in_mask, network_name,
                    remove_rician_floor, run_main, save_json, unique_clean_slices, use_bfloat16, write_into_readme)

# --- settings: edit here, or override on the command line: --n_draws=8
dataset_path = "data/mri_denoising.npz"
split = "val"
model_path = DEFAULT_MODEL
cases = ["gaussian 0.02", "gaussian 0.06", "gaussian 0.12", "rician 0.06", "rician 0.12",
         "gaussian 0.06 coarse", "gaussian 0.06 fine", "gaussian 0.06 gamma", "rician 0.06 coarse"]
# noise model, sigma and, optionally, a change of the split's slices (benchmark_denoisers.TEST_SPLIT_CHANGES)
n_draws = 4                       # noise draws of each case
adapt_steps = 300                 # as in the benchmark and the README's use
adapt_seconds = 900.0             # quality is measured here, not speed: room for all the steps on a busy machine
adapt_loss = "recorrupted"        # "recorrupted" or "neighbor2neighbor" (see use_trained_autoencoder.py)
precision = "auto"                # of the networks: "auto", "float32" or "bfloat16" (see use_trained_autoencoder.py)
seed = 500
results_path = "denoising_examples/benchmark_adaptation_guard.json"
update_readme = False             # true: write the table into README.md between the benchmark_adaptation_guard markers
# ---


def check_case(case):
    """A case reads "NOISE SIGMA [CHANGE]": gaussian or rician, a sigma above 0, a change of TEST_SPLIT_CHANGES."""
    words = case.split()
    valid = 2 <= len(words) <= 3 and words[0] in ("gaussian", "rician") and (
        len(words) == 2 or words[2] in TEST_SPLIT_CHANGES)
    try:
        valid = valid and 0 < float(words[1]) < MAX_NOISE_SIGMA
    except ValueError:
        valid = False
    if not valid:
        raise InputError(f"cases: {case!r}; expected 'gaussian' or 'rician', a sigma above 0 and below "
                         f"{MAX_NOISE_SIGMA}, and optionally one of " + ", ".join(TEST_SPLIT_CHANGES)
                         + ", such as 'rician 0.06 coarse'")


def case_slices(case, split_slices, min_foreground_fraction):
    """(noise model, sigma, clean slices, masks) of one case, such as "gaussian 0.06 coarse"."""
    noise_model, sigma, *change = case.split()
    clean, masks = split_slices["clean"], split_slices["mask"]
    if change:
        clean, masks = ood_clean_slices(f"test_split:{change[0]}", split_slices, min_foreground_fraction)
    return noise_model, float(sigma), clean, masks


def score_draw(model, noise_model, sigma, clean, masks, rng, bfloat16):
    """One noisy draw: PSNR in the head of the trained and the adapted network (always used in the object, as
    the tool uses a kept one), and the checks' gains in standard errors."""
    noisy, clean = noisy_versions(clean, sigma, noise_model, rng, 1)
    rician = noise_model == "rician"
    estimated = estimate_noise_sigma(noisy)
    _, info = adapt_to_slices(model, noisy, estimated, adapt_steps, adapt_seconds, loss=adapt_loss, magnitude=rician)
    outputs = [denoise_slices(model, noisy, estimated, bfloat16=bfloat16),
               denoise_adapted(model, info["candidate"], noisy, estimated, info["object_threshold"], bfloat16=bfloat16)]
    if rician:  # as the tool does for a magnitude image
        outputs = [remove_rician_floor(output, estimated) for output in outputs]
    trained, adapted = (mean_psnr_in_mask(clean, output, masks) for output in outputs)
    masked_z, recorrupted_z = info["heldout_gain_z"], info["recorrupted_gain_z"]
    return {"trained": trained, "adapted": adapted, "gain": adapted - trained, "masked_z": masked_z,
            "recorrupted_z": recorrupted_z, "kept": keeps_adaptation(masked_z, recorrupted_z, rician),
            # the rule until 2026-12-05, for any noise: the one magnitude images still get
            "kept_by_both_checks": keeps_adaptation(masked_z, recorrupted_z, magnitude=True)}


def summary_row(case, draws):
    gains = np.array([d["gain"] for d in draws])
    def counts(rule):
        kept = [d for d in draws if d[rule]]
        return (f"{len(kept)} ({sum(d['gain'] > 0 for d in kept)} / {sum(d['gain'] < 0 for d in kept)})")
    z_range = lambda key: f"{min(d[key] for d in draws):.1f} to {max(d[key] for d in draws):.1f}"
    return (f"| {case} | {gains.mean():+.3f} ({gains.min():+.3f} to {gains.max():+.3f}) | "
            f"{z_range('recorrupted_z')} | {z_range('masked_z')} | {counts('kept')} | "
            f"{counts('kept_by_both_checks')} |")


def markdown_table(results, name):
    lines = [f"The adaptation's guard, {name} ({adapt_loss} loss), {n_draws} noise draws of each case, {split} "
             "slices (coarse, fine, gamma: resampled to 2x coarser or 1.5x finer voxels, or gamma 0.6); gain: in-mask "
             "PSNR of the adapted network, kept or not, minus the trained network's (dB); checks: gains in standard "
             "errors; kept: draws kept (of them, where the adaptation gained / lost):", "",
             "| case | gain of adapting (mean, range) | recorrupted check | masked check | kept (current rule) | "
             "kept (both checks, before 2026-12-05) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [summary_row(case, draws) for case, draws in results.items()]
    return "\n".join(lines)


def main():
    keep_freed_memory()
    apply_overrides(globals())
    if split not in ("test", "val") or n_draws < 1 or adapt_steps < 1 or not adapt_seconds > 0:
        raise InputError(f"split={split!r}, n_draws={n_draws}, adapt_steps={adapt_steps}, "
                         f"adapt_seconds={adapt_seconds}; expected 'test' or 'val', counts of 1 or more and a time "
                         "above 0")
    for case in cases:
        check_case(case)
    check_file_exists(model_path, "checkpoint")
    check_output_path(results_path)
    check_seed(seed)
    import torch
    model, _ = load_checkpoint(model_path)
    bfloat16 = use_bfloat16(precision, torch.device("cpu"))
    clean, masks, _, settings = unique_clean_slices(dataset_path, split)
    split_slices = {"clean": clean, "mask": masks}
    results = {}
    for k, case in enumerate(cases):
        noise_model, sigma, case_clean, case_masks = case_slices(case, split_slices,
                                                                 settings["min_foreground_fraction"])
        rng = np.random.default_rng([seed, k])
        results[case] = [score_draw(model, noise_model, sigma, case_clean, case_masks, rng, bfloat16)
                         for _ in range(n_draws)]
        print(summary_row(case, results[case]), flush=True)
    name = network_name(model_path)
    save_json({"model": model_path, "split": split, "n_draws": n_draws, "adapt_steps": adapt_steps,
               "adapt_loss": adapt_loss, "seed": seed,
               "precision": "bfloat16" if bfloat16 else "float32", "cases": results}, results_path)
    markdown = markdown_table(results, name)
    if update_readme:
        write_into_readme(markdown, "benchmark_adaptation_guard")
    print("\n" + markdown + f"\nwritten to {results_path}")


if __name__ == "__main__":
    run_main(main)
