"""Benchmark the trained networks against classical denoisers on slices never used for training or tuning.

For every noise sigma, each clean test slice gets fresh synthetic noise (seeded); the Gaussian filter's
width and non-local means' strength are tuned on validation slices; BM3D is given the true sigma;
networks with a noise-level input get the sigma estimated from the noisy slices, as users get it.
Writes a JSON and a markdown table (into README.md too with --update_readme=true), a comparison
figure in denoising_examples/ and plots/psnr_vs_sigma_*.png (examples_dir and plots_dir)."""
import os
import time

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from skimage.restoration import denoise_nl_means

from common import (BUNDLED_SCAN, DEFAULT_MODEL, InputError, add_noise, apply_overrides, bm3d_slices, check_bm3d_fits,
                    check_file_exists, check_output_path, check_seed, check_self_ensemble, denoise_slices,
                    denoise_with_adaptation, denormalise, estimate_noise_sigma, foreground_mask, image_metrics,
                    keep_freed_memory, keeps_rician_floor, load_checkpoint, mean_psnr_in_mask, network_name,
                    normalise, percentile_range, remove_rician_floor, run_main, save_figure, save_json,
                    summarise_metrics, tsnr_map, unique_clean_slices, usable_cores, use_bfloat16, write_into_readme)

# --- settings: edit here, or override on the command line: --noise_model=rician --sigmas=0.06
dataset_path = "data/mri_denoising.npz"     # its val split tunes the classical methods, its test split scores all
model_paths = [DEFAULT_MODEL,
               "trained_models/autoencoder_seed_100epochs_672images.pt"]
noise_model = ""                            # "gaussian" or "rician"; "" = the dataset's
sigmas = [0.02, 0.04, 0.06, 0.09, 0.12]    # noise levels of the sweep, on the [0, 1] scale
main_sigma = 0.06                           # the level of the main table and figure
n_realisations = 3                          # noise draws per clean test slice
n_tuning_slices = 6                         # validation slices used to tune Gaussian and NLM
gaussian_widths = [0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.25, 1.5]   # candidate sigmas of the Gaussian filter, in pixels
nlm_strengths = [0.6, 0.8, 1.0, 1.2]        # candidate h / sigma of non-local means
seed = 1234
batch_size = 16                             # slices per forward pass at most, as use_trained_autoencoder.py runs them
                                            # (larger batches outgrow the CPU's caches and run slower)
ood_scans = ["anatomical.nii", "functional.nii", "phantom_EPI_asc_CLEAR_2_1.PAR",
             "test_split:coarse", "test_split:fine", "test_split:gamma"]
# out-of-domain test sets, scored at main_sigma: files (in nibabel's test data folder, or any path; every volume of
# a 4D file), or the scored split's clean slices resampled to 2x coarser or 1.5x finer voxels, or with another
# contrast (gamma 0.6)
tsnr_scans = ["functional.nii"]             # real 4D series scored without synthetic noise: temporal SNR
adapt_model_paths = []                      # these networks also get a "+ adaptation" row: fine-tuned on each
                                            # test set's own noisy slices first (use_trained_autoencoder --adapt_steps)
adapt_steps = 300
true_sigma_model_paths = []                 # these noise-map networks also get a row "given the true sigma", the
                                            # information BM3D gets, instead of the sigma estimated from the slices
                                            # (and one "+ adaptation given the true sigma" if also in adapt_model_paths)
self_ensemble_model_paths = []              # these networks also get a "x8 self-ensemble" row: the mean of
                                            # their outputs over the 8 flips and rotations of each slice
                                            # (use_trained_autoencoder.py --self_ensemble)
float32_model_paths = []                    # these networks also get an "in float32" row, when precision picks
                                            # bfloat16 for the others
precision = "auto"                          # of the networks, as in use_trained_autoencoder.py: "auto" (bfloat16 on
                                            # a CPU that computes it natively), "float32" or "bfloat16"
adapt_seconds = 45.0                        # time budget of one adaptation
adapt_loss = "recorrupted"                  # "recorrupted" or "neighbor2neighbor" (see use_trained_autoencoder.py)
adapt_heldout_fraction = 0.1                # pixels held out of the adaptation's loss to check it (the same there)
split = "test"                              # the slices scored: "test"; "val" to choose between networks
                                            # (its outputs and README markers end in _val)
results_name = ""                           # output names: benchmark{results_name}_{noise_model}.*
update_readme = False                       # true: write the main table into README.md between the markers
                                            # (off by default: a try-out run must not replace the measured tables)
examples_dir = "denoising_examples"         # where the JSON and the comparison figure go
plots_dir = "plots"                         # where the PSNR-over-sigma plot goes
# ---


def noisy_versions(clean, sigma, model, rng, n_draws):
    """n_draws noisy copies of each clean slice: (n * n_draws, H, W), with the matching clean slices."""
    repeated = np.repeat(clean, n_draws, axis=0)
    draws = rng.standard_normal((2, *repeated.shape), dtype=np.float32)
    return add_noise(repeated, sigma, model, draws).astype(np.float32), repeated


def gaussian_filter_slices(noisy, width):
    return np.stack([ndimage.gaussian_filter(s, width) for s in noisy])


def nlm_slices(noisy, sigma, strength):
    return np.stack([denoise_nl_means(s, h=strength * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                                      fast_mode=True) for s in noisy]).astype(np.float32)


def tune(method, candidates, val_noisy, val_clean, val_masks):
    """The candidate parameter with the best in-mask PSNR on the validation slices."""
    scores = [mean_psnr_in_mask(val_clean, method(val_noisy, c), val_masks) for c in candidates]
    return candidates[int(np.argmax(scores))]


def run_timed(method, noisy, n_warm_up):
    """(denoised, seconds per slice); the first n_warm_up slices are denoised once before the clock starts."""
    if n_warm_up:
        method(noisy[:n_warm_up])
    started = time.perf_counter()
    denoised = method(noisy)
    return denoised, (time.perf_counter() - started) / len(noisy)


def network_method(model, metadata, bfloat16, adapt=False, given_sigma=None, self_ensemble=False, rician=False):
    """A function noisy -> denoised for one network, in bfloat16 or float32; noise-map networks get the estimated
    sigma, or given_sigma; self_ensemble averages its outputs over the 8 orientations of each slice. With adapt, the
    network is first fine-tuned on the noisy slices themselves (self-supervised) and, when the guard keeps it,
    denoises their object while the trained network denoises the background. With rician (Rician noise), the
    noise floor is taken out of the output of a network trained on Gaussian noise, as use_trained_autoencoder.py
    does for a magnitude image."""
    remove_floor = rician and keeps_rician_floor(metadata)
    def denoise(noisy):
        sigma = given_sigma or (estimate_noise_sigma(noisy) if metadata["noise_map"] or adapt or remove_floor else 0.0)
        if not adapt:
            denoised = denoise_slices(model, noisy, sigma, batch_size, self_ensemble=self_ensemble, bfloat16=bfloat16)
        else:
            denoised, denoise.adaptation = denoise_with_adaptation(  # .adaptation is read by score()
                model, noisy, sigma, adapt_steps, adapt_seconds, batch_size, self_ensemble, bfloat16, loss=adapt_loss,
                heldout_fraction=adapt_heldout_fraction, magnitude=rician)
        return remove_rician_floor(denoised, sigma) if remove_floor else denoised
    return denoise


BM3D_TRUE = "BM3D (true sigma)"  # the reference of every "gain over BM3D"
CLASSICAL_METHODS = ("noisy input", "Gaussian filter (width tuned on val)", "non-local means (h tuned on val)",
                     BM3D_TRUE)
BM3D_ESTIMATED = "BM3D (estimated sigma)"  # told what the networks are told: the sigma estimated from the noisy slices
BM3D_WITHOUT_FLOOR = "BM3D (true sigma), noise floor taken out"  # with Rician noise, as the networks get it
BM3D_VARIANTS = (BM3D_ESTIMATED, BM3D_WITHOUT_FLOOR)


def all_methods(sigma, width, strength, networks, bfloat16, rician):
    noisy, gaussian, nlm, bm3d = CLASSICAL_METHODS
    methods = {noisy: lambda n: n,
               gaussian: lambda n: gaussian_filter_slices(n, width),
               nlm: lambda n: nlm_slices(n, sigma, strength),
               bm3d: lambda n: bm3d_slices(n, sigma),
               BM3D_ESTIMATED: lambda n: bm3d_slices(n, estimate_noise_sigma(n))}
    if rician:
        methods[BM3D_WITHOUT_FLOOR] = lambda n: remove_rician_floor(bm3d_slices(n, sigma), sigma)
    def network(model, metadata, precision_bfloat16=bfloat16, **options):
        return network_method(model, metadata, precision_bfloat16, rician=rician, **options)
    for name, (model, metadata, path) in networks.items():
        methods[name] = network(model, metadata)
        short = name.split(" (")[0]
        if path in float32_model_paths and bfloat16:
            methods[short + " in float32"] = network(model, metadata, False)
        if path in self_ensemble_model_paths:
            methods[short + " x8 self-ensemble"] = network(model, metadata, self_ensemble=True)
        if path in true_sigma_model_paths:
            methods[short + " given the true sigma"] = network(model, metadata, given_sigma=sigma)
        if path in adapt_model_paths:
            methods[short + " + adaptation"] = network(model, metadata, adapt=True)
        if path in adapt_model_paths and path in true_sigma_model_paths:
            methods[short + " + adaptation given the true sigma"] = network(model, metadata, adapt=True,
                                                                            given_sigma=sigma)
    return methods


def gain_statistics(gains, positions=None):
    """Mean of per-slice gains (the same noisy slices for both methods, so the noise draws mostly cancel), their
    standard error as independent samples, and, given each slice's anatomical position, the standard error of
    the per-position means: the draws and time points of one position are no independent samples of anatomy,
    and a claim about other slices rests on the few positions."""
    stats = {"mean": float(np.mean(gains)),
             "standard_error": float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else float("nan")}
    if positions is not None:
        means = np.array([np.mean(gains[positions == p]) for p in np.unique(positions)])
        stats["n_positions"] = len(means)
        stats["standard_error_by_position"] = (float(np.std(means, ddof=1) / np.sqrt(len(means))) if len(means) > 1
                                               else float("nan"))
    return stats


def score(methods, noisy, clean, masks, positions=None):
    """Metrics and seconds per slice of every method, and each method's in-mask PSNR gain over BM3D
    (gain_statistics; positions: each slice's anatomical position); also the denoised slices."""
    rows, outputs, psnr_per_slice = {}, {}, {}
    for name, method in methods.items():
        # a network's first call with each batch shape pays for memory and for building its kernels (about 50 ms
        # in bfloat16): it is warmed up on all the slices, BM3D and the other classical methods on 2
        classical = name in (*CLASSICAL_METHODS, *BM3D_VARIANTS)
        n_warm_up = 0 if "adaptation" in name else 2 if classical else len(noisy)
        denoised, seconds = run_timed(method, noisy, n_warm_up)
        per_slice = [image_metrics(c, d, m) for c, d, m in zip(clean, denoised, masks)]
        rows[name] = {**summarise_metrics(per_slice), "seconds_per_slice": seconds}
        psnr_per_slice[name] = np.array([m["psnr_mask"] for m in per_slice])
        if hasattr(method, "adaptation"):
            rows[name]["adaptation"] = method.adaptation  # kept or not, and its two checks' gains
        outputs[name] = denoised
    for name, row in rows.items():
        row["psnr_mask_gain_over_bm3d"] = gain_statistics(psnr_per_slice[name] - psnr_per_slice[BM3D_TRUE],
                                                          positions)
    return rows, outputs


def tuned_parameters(sigma, model_noise, val, rng):
    """Gaussian filter width and NLM strength with the best in-mask PSNR on validation slices."""
    val_noisy, val_clean = noisy_versions(val["clean"], sigma, model_noise, rng, 1)
    width = tune(gaussian_filter_slices, gaussian_widths, val_noisy, val_clean, val["mask"])
    strength = tune(lambda n, k: nlm_slices(n, sigma, k), nlm_strengths, val_noisy, val_clean, val["mask"])
    return width, strength


def scan_path(name):
    """A scan given by path, or by its name in nibabel's test data folder (where the bundled scan lives), that
    nibabel can read (NIfTI, or other formats such as the phantom's PAR/REC)."""
    path = name if os.path.exists(name) else os.path.join(os.path.dirname(BUNDLED_SCAN), name)
    check_file_exists(path)
    try:
        nib.load(path)  # reads only the header
    except Exception as error:  # nibabel raises many types for a file that is not an image
        raise InputError(f"{path} is not an image nibabel can read ({type(error).__name__})") from None
    return path


TEST_SPLIT_CHANGES = {"coarse": 0.5, "fine": 1.5, "gamma": None}  # zoom factors of test_split:NAME; gamma: contrast


def scan_volumes(name):
    """The voxels of a scan of ood_scans or tsnr_scans as float32 (X, Y, Z, T), checked as use_trained_autoencoder.py
    checks a NIfTI (the phantom is a PAR/REC file, which load_nifti refuses), and its path."""
    path = scan_path(name)
    volumes = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    volumes = volumes.reshape(volumes.shape[:4]) if volumes.ndim == 5 and volumes.shape[4] == 1 else volumes
    if volumes.ndim not in (3, 4):
        raise InputError(f"{path} has shape {volumes.shape}; expected a 3D or 4D scan")
    if not np.all(np.isfinite(volumes)):
        raise InputError(f"{path} contains {int(np.sum(~np.isfinite(volumes)))} NaN or Inf values")
    if volumes.min() == volumes.max():
        raise InputError(f"{path} is constant: nothing to denoise")
    check_bm3d_fits(volumes.shape[:2], path)
    return path, volumes


def check_bm3d_fits_every_set(test_shape):
    """The test slices, and the resampled ones among ood_scans, before minutes of BM3D on the others."""
    check_bm3d_fits(test_shape, dataset_path)
    for name in ood_scans:
        factor = TEST_SPLIT_CHANGES.get(name.split(":", 1)[1]) if name.startswith("test_split:") else None
        if factor:
            check_bm3d_fits([round(side * factor) for side in test_shape], name)  # ndimage.zoom's output size


def run_tag(model_noise):
    return f"{results_name}_{model_noise}" + ("_val" if split == "val" else "")


def output_paths(tag):
    """Where a run's JSON, PSNR-over-sigma plot and comparison figure go."""
    return {"json": os.path.join(examples_dir, f"benchmark{tag}.json"),
            "plot": os.path.join(plots_dir, f"psnr_vs_sigma{tag}.png"),
            "comparison": os.path.join(examples_dir, f"comparison{tag}.png")}


def check_settings():
    """Every setting checked before minutes of BM3D, and every scan named found and readable."""
    check_seed(seed)
    if split not in ("test", "val"):
        raise InputError(f"split={split!r}; expected 'test' or 'val'")
    if main_sigma not in sigmas:
        raise InputError(f"main_sigma={main_sigma} is not one of sigmas={sigmas}")
    if not all(sigma > 0 for sigma in sigmas) or n_realisations < 1 or n_tuning_slices < 1:
        raise InputError(f"sigmas={sigmas}, n_realisations={n_realisations}, n_tuning_slices={n_tuning_slices}; "
                         "expected sigmas above 0 and counts of 1 or more")
    for name in ood_scans:
        if name.startswith("test_split:") and name.split(":", 1)[1] not in TEST_SPLIT_CHANGES:
            raise InputError(f"ood_scans: {name!r}; expected test_split:" + ", test_split:".join(TEST_SPLIT_CHANGES)
                             + " or a scan")
        if not name.startswith("test_split:"):
            scan_volumes(name)
    for name in tsnr_scans:
        path, series = scan_volumes(name)
        if series.ndim != 4 or series.shape[3] < 3:
            raise InputError(f"{path}: tsnr_scans need a 4D series of 3 or more volumes, this has shape {series.shape}")
    for model_noise in [noise_model] if noise_model else ["gaussian", "rician"]:  # the dataset's is read later
        for path in output_paths(run_tag(model_noise)).values():
            check_output_path(path)


def ood_clean_slices(name, bundled_test, min_foreground_fraction):
    """Clean slices and head masks of one out-of-domain test set (see ood_scans); of a scan, the slices whose
    head covers min_foreground_fraction of them, as make_dataset.py keeps the bundled scan's."""
    if name.startswith("test_split:"):
        change = name.split(":", 1)[1]
        if change == "gamma":
            return np.maximum(bundled_test["clean"], 0) ** 0.6, bundled_test["mask"]
        factor = TEST_SPLIT_CHANGES[change]
        # cut at 0 only (the cubic spline undershoots at edges), not at 1: make_dataset does not clip the scan
        clean = np.stack([np.maximum(ndimage.zoom(c, factor, order=3), 0) for c in bundled_test["clean"]])
        masks = np.stack([ndimage.zoom(m.astype(np.float32), factor, order=1) > 0.5 for m in bundled_test["mask"]])
        return clean.astype(np.float32), masks
    _, volumes = scan_volumes(name)
    volumes = volumes if volumes.ndim == 4 else volumes[..., None]  # every volume, as the tool denoises them
    volumes = normalise(volumes, *percentile_range(volumes))  # as the tool and make_dataset scale a scan
    head = foreground_mask(volumes.mean(axis=3))
    keep = [z for z in range(head.shape[2]) if head[:, :, z].mean() >= min_foreground_fraction]
    slices = np.moveaxis(volumes[:, :, keep, :], (3, 2), (0, 1)).reshape(-1, *head.shape[:2])  # (t * z, X, Y)
    masks = np.tile(np.moveaxis(head[:, :, keep], 2, 0), (volumes.shape[3], 1, 1))
    return slices, masks


def real_series_slices(name):
    """A real 4D series (no synthetic noise), normalised: its slices (z * t, X, Y), its shape, head mask and
    normalisation range."""
    _, series = scan_volumes(name)  # a 4D series of 3 or more volumes (check_settings)
    low, high = percentile_range(series)
    series = normalise(series, low, high)  # clipping would flatten the brightest voxels' time course
    slices = np.moveaxis(series, (2, 3), (0, 1)).reshape(-1, *series.shape[:2])
    return slices, series.shape, foreground_mask(series.mean(axis=3)), (low, high)


def median_tsnr(slices, shape, head, intensity_range):
    """Median temporal SNR in the head of a series given as its normalised (z * t, X, Y) slices, computed in
    the scan's own intensities (tSNR depends on the offset that normalisation removes)."""
    series = np.moveaxis(slices.reshape(shape[2], shape[3], *shape[:2]), (0, 1), (2, 3))
    return float(np.median(tsnr_map(denormalise(series, *intensity_range))[head]))


def tsnr_table(tsnr_rows):
    scans = list(tsnr_rows)
    lines = ["| method | " + " | ".join(f"{s} {'x'.join(map(str, tsnr_rows[s]['shape']))}" for s in scans) + " |",
             "| --- |" + " --- |" * len(scans)]
    for method_name in tsnr_rows[scans[0]]["median_tsnr"]:
        cells = []
        for s in scans:
            value, before = tsnr_rows[s]["median_tsnr"][method_name], tsnr_rows[s]["median_tsnr"]["noisy input"]
            cells.append(f"{value:.1f}" + ("" if method_name == "noisy input" else f" ({value / before:.2f}x)"))
        shown = method_name.replace("noisy input", "the scan as it is").replace("true sigma", "estimated sigma")
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    sigmas = ", ".join(f"{s} {tsnr_rows[s]['estimated_sigma']:.3f}" for s in scans)
    return ("Real 4D series, no synthetic noise: median temporal SNR (mean / standard deviation over time) in the "
            f"head, before and after denoising each slice of each volume; every method is given the sigma estimated "
            f"from the series ({sigmas}), the Gaussian filter and non-local means keep their settings tuned for sigma "
            f"{main_sigma}. A higher tSNR is only good if the anatomy survives: blurring raises it too.\n\n"
            + "\n".join(lines))


def ood_table(ood_rows, reference_sigmas, estimated_sigmas):
    names = list(next(iter(ood_rows.values())))
    sets = list(ood_rows)
    lines = ["| method | " + " | ".join(sets) + " |", "| --- |" + " --- |" * len(sets),
             "| *noise sigma of the reference itself (estimated)* | "
             + " | ".join(f"*{reference_sigmas[s]:.3f}*" for s in sets) + " |",
             f"| *noise sigma estimated from the noisy input ({main_sigma} added)* | "
             + " | ".join(f"*{estimated_sigmas[s]:.3f}*" for s in sets) + " |"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(psnr_cell(ood_rows[s][name]) for s in sets) + " |")
    return (f"Out-of-domain test sets, noise sigma {main_sigma}, in-mask PSNR (dB); classical methods tuned on "
            "the bundled scan's validation slices; an adaptation the guard did not keep is marked:\n\n"
            + "\n".join(lines))


def psnr_cell(row):
    """Mean in-mask PSNR, marked when it belongs to an adaptation that was not kept."""
    rejected = "adaptation" in row and not row["adaptation"]["kept"]
    return f"{row['psnr_mask']['mean']:.2f}" + (" (not kept)" if rejected else "")


def markdown_table(rows, sigma, model_noise, n_slices, tuned, bfloat16):
    bm3d_row = rows[BM3D_TRUE]
    lines = [f"{model_noise.capitalize()} noise, sigma {sigma}, {n_slices} {split} slices (mean +- std over slices; "
             f"gain over BM3D: mean +- standard error of the per-slice differences"
             + (f" / of the means of the {rows[BM3D_TRUE]['psnr_mask_gain_over_bm3d']['n_positions']} slice "
                "positions" if "n_positions" in rows[BM3D_TRUE]["psnr_mask_gain_over_bm3d"] else "") + "; "
             f"PSNR with data range 1; Gaussian filter width {tuned['gaussian_width']} pixels, non-local means "
             f"h = {tuned['nlm_strength']} sigma; networks in {'bfloat16' if bfloat16 else 'float32'}):", "",
             "| method | PSNR in mask (dB) | gain over BM3D in mask (dB) | SSIM in mask | PSNR whole image (dB) "
             "| SSIM whole image | ms per slice | speed vs BM3D |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        speed = bm3d_row["seconds_per_slice"] / row["seconds_per_slice"] if name != "noisy input" else float("nan")
        gain = row["psnr_mask_gain_over_bm3d"]
        lines.append(f"| {name} | {row['psnr_mask']['mean']:.2f} +- {row['psnr_mask']['std']:.2f} | "
                     + ("-" if name == BM3D_TRUE else f"{gain['mean']:+.3f} +- {gain['standard_error']:.3f}"
                        + (f" / {gain['standard_error_by_position']:.3f}" if "n_positions" in gain else ""))
                     + " | "
                     f"{row['ssim_mask']['mean']:.3f} +- {row['ssim_mask']['std']:.3f} | "
                     f"{row['psnr_image']['mean']:.2f} | {row['ssim_image']['mean']:.3f} | "
                     f"{1000 * row['seconds_per_slice']:.1f} | "
                     + ("-" if name == "noisy input" else f"{speed:.0f}x" if speed >= 10 else f"{speed:.2g}x") + " |")
    return "\n".join(lines)


def sweep_table(sweep):
    names = list(next(iter(sweep.values())))
    lines = ["| method | " + " | ".join(f"sigma {s}" for s in sweep) + " |",
             "| --- |" + " --- |" * len(sweep)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(psnr_cell(sweep[s][name]) for s in sweep) + " |")
    return "In-mask PSNR (dB) over noise levels:\n\n" + "\n".join(lines)


def plot_psnr_vs_sigma(sweep, title):
    """In-mask PSNR of every method over the noise levels (left) and its gain over BM3D (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    levels = list(sweep)
    bm3d = np.array([sweep[s][BM3D_TRUE]["psnr_mask"]["mean"] for s in levels])
    names = list(next(iter(sweep.values())))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for number, name in enumerate(names):
        psnr = np.array([sweep[s][name]["psnr_mask"]["mean"] for s in levels])
        style = dict(marker="o", color=colours(number), linestyle="--" if name.endswith("given the true sigma") else "-")
        left.plot(levels, psnr, label=name.split(" (")[0] if "parameters" in name else name, **style)
        if name != "noisy input":  # 7-12 dB below: it would squash the rest
            right.plot(levels, psnr - bm3d, **style)
    right.axhline(0, color="black", linewidth=0.8)
    left.set_ylabel("PSNR in the head mask (dB)")
    right.set_ylabel("PSNR - BM3D's (dB)")
    for axis in (left, right):
        axis.set_xlabel("noise sigma ([0, 1] scale)")
        axis.grid(alpha=0.3)
    figure.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.16, 1, 1))
    return figure


def compared_methods(rows):
    """The methods the comparison figure shows: the classical ones, the original (seed) network, the first network
    of model_paths and the best-scoring one as a user can run it (with the sigma it estimates)."""
    networks = [name for name in rows if name not in (*CLASSICAL_METHODS, *BM3D_VARIANTS)]
    seed_networks = [name for name in networks if name.startswith("seed")]
    runnable = [name for name in networks if "given the true sigma" not in name]
    best = [max(runnable, key=lambda name: rows[name]["psnr_mask"]["mean"])] if runnable else []
    classical = [name for name in CLASSICAL_METHODS if name in rows]
    return list(dict.fromkeys(classical + seed_networks[:1] + networks[:1] + best))


def plot_comparison(outputs, noisy_clean_masks, rows, title):
    """One test slice through the compared methods: whole slice, a zoomed detail, and the error map."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _, clean, masks = noisy_clean_masks
    index = int(np.argmax([m.sum() for m in masks]))
    panels = [(name, outputs[name][index]) for name in compared_methods(rows)] + [("clean", clean[index])]
    height, width = clean[index].shape
    top, left, size = height // 3, width // 3, max(8, min(height, width) // 3)
    figure, axes = plt.subplots(3, len(panels), figsize=(2.2 * len(panels), 7), squeeze=False)
    for column, (name, image) in enumerate(panels):
        psnr = f"\n{rows[name]['psnr_mask']['mean']:.2f} dB" if name in rows else ""
        axes[0, column].imshow(image.T, cmap="gray", vmin=0, vmax=1, origin="lower")
        axes[0, column].add_patch(plt.Rectangle((top, left), size, size, fill=False, color="yellow"))
        # wrapped at underscores and spaces, not inside a word
        label = textwrap.fill(name.split(" (")[0].replace("_", "_ "), 26, break_long_words=False).replace("_ ", "_")
        axes[0, column].set_title(label + psnr, fontsize=8)
        axes[1, column].imshow(image[top:top + size, left:left + size].T, cmap="gray", vmin=0, vmax=1, origin="lower")
        axes[2, column].imshow(np.abs(image - clean[index]).T, cmap="magma", vmin=0, vmax=0.15, origin="lower")
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    axes[1, 0].set_ylabel("zoomed detail")
    axes[2, 0].set_ylabel("|error|")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def load_networks():
    networks = {}
    for path in model_paths:
        model, metadata = load_checkpoint(path)
        networks[f"{network_name(path)} ({metadata['n_parameters']:,} parameters)"] = (model, metadata, path)
    for setting, paths in (("adapt_model_paths", adapt_model_paths), ("true_sigma_model_paths", true_sigma_model_paths),
                           ("self_ensemble_model_paths", self_ensemble_model_paths),
                           ("float32_model_paths", float32_model_paths)):
        unknown = set(paths) - set(model_paths)
        if unknown:
            raise InputError(f"{setting} {sorted(unknown)} are not in model_paths")
    for model, metadata, path in networks.values():
        if path in true_sigma_model_paths and not metadata["noise_map"]:
            raise InputError(f"{path} has no noise-level input: true_sigma_model_paths cannot give it a sigma")
        if path in self_ensemble_model_paths:
            check_self_ensemble(metadata, path)
    return networks


def main():
    apply_overrides(globals())
    check_settings()
    torch.set_num_threads(usable_cores())
    keep_freed_memory()
    test_clean, test_masks, test_positions, dataset_settings = unique_clean_slices(dataset_path, split)
    val_clean, val_masks, _, _ = unique_clean_slices(dataset_path, "val")
    check_bm3d_fits_every_set(test_clean.shape[1:])
    pick = np.linspace(0, len(val_clean) - 1, min(n_tuning_slices, len(val_clean))).astype(int)
    test = {"clean": test_clean, "mask": test_masks}
    val = {"clean": val_clean[pick], "mask": val_masks[pick]}
    model_noise = noise_model or dataset_settings["noise_model"]
    networks = load_networks()
    bfloat16 = use_bfloat16(precision, torch.device("cpu"))
    if float32_model_paths and not bfloat16:
        print("every network runs in float32 here, so there are no separate 'in float32' rows")
    rng = np.random.default_rng(seed)
    sweep, main_outputs, ood_rows, tuned, estimated_sigmas = {}, None, {}, {}, {}
    reference_sigmas = {split: estimate_noise_sigma(test["clean"])}
    for sigma in sigmas:
        width, strength = tuned_parameters(sigma, model_noise, val, rng)
        tuned[sigma] = {"gaussian_width": width, "nlm_strength": strength}
        methods = all_methods(sigma, width, strength, networks, bfloat16, rician=model_noise == "rician")
        noisy, clean = noisy_versions(test["clean"], sigma, model_noise, rng, n_realisations)
        masks = np.repeat(test["mask"], n_realisations, axis=0)
        rows, outputs = score(methods, noisy, clean, masks, np.repeat(test_positions, n_realisations))
        sweep[sigma] = rows
        estimated_sigmas[sigma] = estimate_noise_sigma(noisy)  # what the networks without a given sigma were told
                                                               # (and, by name, on each out-of-domain set)
        print(f"\n{markdown_table(rows, sigma, model_noise, len(noisy), tuned[sigma], bfloat16)}", flush=True)
        if sigma != main_sigma:
            continue
        main_outputs = (rows, outputs, (noisy, clean, masks))
        for name in ood_scans:
            ood_clean, ood_masks = ood_clean_slices(name, test, dataset_settings["min_foreground_fraction"])
            reference_sigmas[name] = estimate_noise_sigma(ood_clean)  # noise the "clean" reference has itself
            ood_noisy, ood_clean = noisy_versions(ood_clean, sigma, model_noise, rng, 1)
            estimated_sigmas[name] = estimate_noise_sigma(ood_noisy)
            ood_rows[name] = score(methods, ood_noisy, ood_clean, ood_masks)[0]
            print(f"{name}: " + ", ".join(f"{k.split(' (')[0]} {v['psnr_mask']['mean']:.2f}"
                                          for k, v in ood_rows[name].items()), flush=True)
    tsnr_rows = {}
    for name in tsnr_scans:
        slices, shape, head, intensity_range = real_series_slices(name)
        estimated = estimate_noise_sigma(slices)
        tuned_main = tuned[main_sigma]
        methods = all_methods(estimated, tuned_main["gaussian_width"], tuned_main["nlm_strength"], networks, bfloat16,
                              rician=False)  # use_trained_autoencoder.py would take out the Rician floor of a
                                             # real magnitude series; not here: these slices are on their
                                             # percentile scale, whose 0 is not zero signal
        # every method gets the estimated sigma here, so these would repeat other rows
        repeats = [n for n in methods if n == BM3D_ESTIMATED or "given the true sigma" in n]
        medians = {method_name: median_tsnr(method(slices), shape, head, intensity_range)
                   for method_name, method in methods.items() if method_name not in repeats}
        tsnr_rows[name] = {"median_tsnr": medians, "shape": list(shape), "estimated_sigma": estimated}
        print(f"{name} tSNR: " + ", ".join(f"{k.split(' (')[0]} {v:.1f}" for k, v in medians.items()), flush=True)
    tag = run_tag(model_noise)
    rows, outputs, data = main_outputs
    results = {"dataset": dataset_path, "noise_model": model_noise, "split": split, "n_slices": len(data[0]),
               "main_sigma": main_sigma, "sweep": {str(s): r for s, r in sweep.items()}, "ood": ood_rows, "tsnr": tsnr_rows,
               "tuned_on_val": {str(s): t for s, t in tuned.items()},
               "estimated_sigma": {str(s): e for s, e in estimated_sigmas.items()},
               "reference_sigma": reference_sigmas,
               "models": model_paths, "adapted_models": adapt_model_paths, "true_sigma_models": true_sigma_model_paths,
               "self_ensemble_models": self_ensemble_model_paths, "float32_models": float32_model_paths,
               "precision": "bfloat16" if bfloat16 else "float32",
               "adapt_steps": adapt_steps, "adapt_seconds": adapt_seconds, "adapt_loss": adapt_loss,
               "adapt_heldout_fraction": adapt_heldout_fraction,
               "torch_threads": torch.get_num_threads()}
    destinations = output_paths(tag)
    paths = [save_json(results, destinations["json"]),
             save_figure(plot_psnr_vs_sigma(sweep, f"{model_noise} noise, {split} slices"), destinations["plot"]),
             save_figure(plot_comparison(outputs, data, rows,
                                         f"{model_noise} noise, sigma {main_sigma}, a {split} slice"),
                         destinations["comparison"], dpi=90)]
    markdown = markdown_table(rows, main_sigma, model_noise, len(data[0]), tuned[main_sigma], bfloat16)
    if len(sweep) > 1:
        markdown += "\n\n" + sweep_table(sweep)
    if ood_rows:
        markdown += "\n\n" + ood_table(ood_rows, reference_sigmas, estimated_sigmas)
    if tsnr_rows:
        markdown += "\n\n" + tsnr_table(tsnr_rows)
    if update_readme:  # a validation run has its own markers (..._val): it never replaces a test table
        write_into_readme(markdown, f"benchmark{tag}")
    print("\n" + markdown)
    for path in paths:
        print(f"written to {path}")


if __name__ == "__main__":
    run_main(main)
