"""Use a trained denoiser.

Evaluate it on the test split of data/mri_denoising.npz (figures and metrics in denoising_examples/):
    python scripts/use_trained_autoencoder.py [--model=trained_models/....pt]
Denoise your own 3D or 4D NIfTI, slice by slice, back into its own intensity units:
    python scripts/use_trained_autoencoder.py --input scan.nii.gz --output scan_denoised.nii.gz [--report]"""
import math
import os
import time

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from common import (ADAPTATION_LOSSES, DEFAULT_MODEL, MAX_NOISE_SIGMA, InputError, adapt_to_slices, apply_overrides,
                    atomic_write, check_file_exists, check_output_path, check_self_ensemble, denoise_adapted,
                    denoise_at_own_sizes, denoise_slices, estimate_noise_sigma, foreground_mask, image_metrics,
                    is_magnitude_image, keep_freed_memory, keeps_rician_floor, load_checkpoint, load_dataset,
                    load_nifti, normalise, percentile_range, plot_denoising_grid, remove_rician_floor, run_main,
                    save_figure, save_json, scan_identities, summarise_metrics, tsnr_map, usable_cores, use_bfloat16)

# --- settings: edit here, or override on the command line: --model=trained_models/other.pt
model_path = DEFAULT_MODEL        # common.py names the shipped default, for every script
dataset_path = "data/mri_denoising.npz"   # evaluation mode: its test split (outputs of another are named after it)
examples_dir = "denoising_examples"
input_path = ""          # a 3D or 4D NIfTI to denoise (--input); empty = evaluation mode
output_path = ""         # where the denoised NIfTI goes (--output)
axis = 2                 # the slicing axis of the input: slices are taken across it (0, 1 or 2)
dtype = "float32"        # "float32", or "input" for the input's own data type
noise_sigma = 0.0        # noise sigma of the input on the [0, 1] scale; 0 = estimate it from the image
overwrite = False        # allow replacing an existing output file (never the input)
report = False           # also write OUTPUT_report.png: before / after / removed noise, tSNR for 4D (3+ volumes)
adapt_steps = 0          # > 0: first fine-tune the network on this input's own noisy slices (self-supervised)
adapt_seconds = 45.0     # time budget of that adaptation
adapt_heldout_fraction = 0.1  # share of the pixels held out of its loss, on which it must prove a gain to be kept
adapt_loss = "recorrupted"  # its self-supervised loss: "recorrupted" (assumes Gaussian noise of the estimated
                            # sigma, full resolution) or "neighbor2neighbor" (half-resolution sub-images)
self_ensemble = False    # average the network's outputs over the 8 flips and 90-degree rotations of each slice
                         # (for networks trained on them): 0.05-0.10 dB better at sigma 0.06 in the benchmark
                         # (0.02-0.19 on other scans), 8x the time
rician_floor = True      # magnitude images (no negative values): take the Rician noise floor out of the output,
                         # which networks trained on Gaussian noise keep (common.remove_rician_floor)
batch_size = 16          # slices per forward pass, at most (fewer for slices bigger than 128x96: common.MAX_BATCH_PIXELS);
                         # larger batches are no faster on a CPU and cost memory
precision = "auto"       # "auto": the convolutions in bfloat16 on a CPU that computes it natively (about twice as
                         # fast, the output within about 3e-4 RMS of float32), else float32; or "float32", "bfloat16"
# ---


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATASET_NAME = "mri_denoising"  # make_dataset.py's output: evaluations on it keep the model's name alone
OUTLIER_RANGE = (-1.0, 3.0)  # on the [0, 1] scale of the 1st-99th percentiles: beyond it a voxel is no tissue
MASKED_FRACTION = 0.1    # a scan with at least this share of masked_background has one
THICK_AXIS_RATIO = 2.0   # voxels this much thicker along another axis than along --axis get a note
OUTLIER_WARN_FRACTION = 0.001  # more voxels than this beyond OUTLIER_RANGE are no spikes (0 in nibabel's real scans)
MIN_SLICE_SIZE = 4       # pixels: the least width of a slice to denoise (and to measure its noise in)
MIN_MEASURED_SIGMA = 1e-4  # on the [0, 1] scale: a noise estimate below it is rounding error (a noise-free image)
MIN_ADAPT_SIZE = 8       # pixels: the adaptation's patches and held-out checks need slices at least this wide
SMALL_SLICE = 32         # pixels: in slices narrower than this the noise estimate reads much of the anatomy as noise


# --- evaluation on the test split -------------------------------------------------------------

def load_test_split(path):
    """The test split's clean, noisy and mask slices (with each one's scan and slice position), and the dataset's
    settings."""
    arrays, dataset_settings = load_dataset(path)
    test = arrays["split"] == "test"
    return ({k: np.asarray(arrays[k][test]) for k in ("clean", "noisy", "mask", "image_shape", "scan_index",
                                                       "slice_index")}, dataset_settings)


def trained_on_test_slices(metadata, test, dataset_settings):
    """Sorted (scan file name, slice position) of the test slices that the network was trained on: the same scan
    (common.scan_identities) among its training scans, at one of its training positions (a dataset made with
    another seed or slice range splits the same scan differently). Their scores are not held out."""
    trained_settings = metadata.get("dataset_settings", {})
    trained_ids, test_ids = scan_identities(trained_settings, dataset_settings)
    trained_scans = {trained_ids[index] for index in metadata.get("split_scans", {}).get("train", [])
                     if index < len(trained_ids)}
    trained_positions = set(metadata.get("split", {}).get("train", []))
    names = [os.path.basename(path) for path in dataset_settings["input_paths"]]
    return sorted({(names[scan], int(z)) for scan, z in zip(test["scan_index"], test["slice_index"])
                   if test_ids[scan] in trained_scans and z in trained_positions})


def removes_rician_floor(metadata):
    """Whether the Rician noise floor is taken out of this network's output on a magnitude image."""
    return rician_floor and keeps_rician_floor(metadata)


def evaluation_paths():
    """Where the metrics and the two grids go: named after the model, and after the dataset unless it is the
    default one, so that scoring on another dataset does not replace the default's files."""
    name = os.path.splitext(os.path.basename(model_path))[0] + ("_self_ensemble" if self_ensemble else "")
    dataset_name = os.path.splitext(os.path.basename(dataset_path))[0]
    name += "" if dataset_name == DEFAULT_DATASET_NAME else f"_on_{dataset_name}"
    grids = {(n_rows, 3): os.path.join(examples_dir, f"denoising_{n_rows}x3_{name}_test.png") for n_rows in (2, 5)}
    return name, {"metrics": os.path.join(examples_dir, f"metrics_{name}.json"), **grids}


def evaluate_on_test_split(model, metadata, bfloat16):
    name, outputs = evaluation_paths()
    for path in outputs.values():  # before the work, not after it
        check_output_path(path)
    test, dataset_settings = load_test_split(dataset_path)
    dataset_sigma = float(dataset_settings["noise_sigma"])
    if dataset_sigma == 0 or np.array_equal(test["noisy"], test["clean"]):
        raise InputError(f"{dataset_path} holds no added noise on its test slices (made with noise_sigma="
                         f"{dataset_sigma:g}), so they are their own reference and PSNR cannot be measured; denoise "
                         "the scan with --input_path (and --report for a 4D series' temporal SNR), or make a dataset "
                         "with noise to score on")
    sigma_low, sigma_high = trained_sigma_range(metadata)
    if not sigma_low <= dataset_sigma <= sigma_high:
        print(f"warning: {dataset_path} holds noise of sigma {dataset_sigma:g}, outside what "
              f"{os.path.basename(model_path)} was trained for ({metadata['noise_sigma_range'][0]:g}-"
              f"{metadata['noise_sigma_range'][1]:g}); expect under- or over-smoothing")
    leaked = trained_on_test_slices(metadata, test, dataset_settings)
    if leaked:
        shown = ", ".join(f"{scan} {z}" for scan, z in leaked[:6]) + (", ..." if len(leaked) > 6 else "")
        print(f"warning: {os.path.basename(model_path)} was trained on {len(leaked)} of the test slice positions of "
              f"{dataset_path} ({shown}): their scores are not held out; evaluate on the dataset it was trained "
              "with, or one made with the same seed and slices")
    started = time.perf_counter()
    denoised = denoise_at_own_sizes(model, test["noisy"], test["image_shape"], dataset_sigma, batch_size=batch_size,
                                    self_ensemble=self_ensemble, bfloat16=bfloat16)
    floor_removed = dataset_settings["noise_model"] == "rician" and removes_rician_floor(metadata)
    if floor_removed:
        denoised = remove_rician_floor(denoised, dataset_sigma)
    seconds_per_slice = (time.perf_counter() - started) / len(denoised)
    # each slice's own pixels: the zero padding that stacks scans of other sizes holds no noise
    own = [(slice(0, h), slice(0, w)) for h, w in test["image_shape"]]
    noisy_metrics, denoised_metrics = ([image_metrics(c[o], x[o], m[o]) for c, x, m, o in
                                        zip(test["clean"], estimates, test["mask"], own)]
                                       for estimates in (test["noisy"], denoised))
    results = {"model": model_path, "dataset": dataset_path,
               "n_test_slices": len(denoised),  # noisy slices: each clean one with its noise draws, all scored
               "n_clean_test_slices": len(np.unique(test["clean"], axis=0)),
               "test_positions_trained_on": [list(pair) for pair in leaked],
               "noise_model": dataset_settings["noise_model"], "noise_sigma": dataset_sigma,
               "sigma_given_to_network": "the dataset's own (true) sigma", "self_ensemble": self_ensemble,
               "rician_floor_removed": floor_removed,
               "precision": "bfloat16" if bfloat16 else "float32", "seconds_per_slice": seconds_per_slice,
               "noisy": summarise_metrics(noisy_metrics), "denoised": summarise_metrics(denoised_metrics)}
    paths = [save_json(results, outputs["metrics"])]
    # spread over the slice positions (the next time point of a position is nearly the same image); with fewer
    # positions than rows, other noisy images of them fill the rest
    positions = np.stack([test["scan_index"], test["slice_index"]], axis=1)
    firsts = np.sort(np.unique(positions, axis=0, return_index=True)[1])
    scan_names = [os.path.basename(path) for path in dataset_settings["input_paths"]]
    for n_rows, n_columns in ((2, 3), (5, 3)):
        if len(firsts) >= n_rows:
            rows = firsts[np.linspace(0, len(firsts) - 1, n_rows).astype(int)]
        else:
            rows = np.concatenate([firsts, np.setdiff1d(np.arange(len(denoised)), firsts)])[:n_rows]
        labels = [f"{scan_names[test['scan_index'][row]]}, slice {test['slice_index'][row]}" for row in rows]
        figure = plot_denoising_grid(test["noisy"][rows], denoised[rows], test["clean"][rows], test["mask"][rows],
                                     f"{name}: test slices", labels)
        paths.append(save_figure(figure, outputs[(n_rows, n_columns)]))
    for kind in ("noisy", "denoised"):
        m = results[kind]
        print(f"{kind:>9}: PSNR {m['psnr_mask']['mean']:.2f} +- {m['psnr_mask']['std']:.2f} dB, "
              f"SSIM {m['ssim_mask']['mean']:.3f} in the mask; PSNR {m['psnr_image']['mean']:.2f} dB whole image")
    for path in paths:
        print(f"written to {path}")


# --- denoising a NIfTI file ---------------------------------------------------------------------

def check_paths():
    if not output_path:
        raise InputError("--input needs --output, the file to write the denoised image to")
    if not output_path.endswith((".nii", ".nii.gz")):
        raise InputError(f"{output_path}: the output name must end in .nii or .nii.gz")
    check_file_exists(input_path)
    check_output_path(output_path, "file name ending in .nii or .nii.gz")
    if os.path.abspath(output_path) == os.path.abspath(input_path) or (
            os.path.exists(output_path) and os.path.samefile(output_path, input_path)):
        raise InputError(f"{output_path} is the input file; it is never overwritten")
    if os.path.exists(output_path) and not overwrite:
        raise InputError(f"{output_path} exists; choose another name or pass --overwrite")
    if axis not in (0, 1, 2):
        raise InputError(f"axis={axis}; expected 0, 1 or 2")
    if dtype not in ("float32", "input"):
        raise InputError(f"dtype={dtype!r}; expected 'float32' or 'input'")
    if adapt_loss not in ADAPTATION_LOSSES:
        raise InputError(f"adapt_loss={adapt_loss!r}; expected one of {', '.join(ADAPTATION_LOSSES)}")
    if not 0 < adapt_heldout_fraction < 0.5:
        raise InputError(f"adapt_heldout_fraction={adapt_heldout_fraction}; expected above 0 and below 0.5")
    if adapt_steps < 0 or not 0 < adapt_seconds < math.inf:
        raise InputError(f"adapt_steps={adapt_steps}, adapt_seconds={adapt_seconds}; expected 0 or more steps and above 0 seconds")
    if not 0 <= noise_sigma < MAX_NOISE_SIGMA:
        raise InputError(f"noise_sigma={noise_sigma}; expected 0 (estimate it) or a sigma below {MAX_NOISE_SIGMA} on the "
                         "network's [0, 1] scale, the scan's 1st-99th percentile range: a sigma in the scan's own "
                         "units divided by that range")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}; expected 1 or more")
    if report:
        check_output_path(report_path(), "file for the report")
        if os.path.exists(report_path()) and not overwrite:
            raise InputError(f"{report_path()} exists; choose another output name or pass --overwrite")


def report_path():
    return output_path.removesuffix(".gz").removesuffix(".nii") + "_report.png"


def even_subsample(data, max_samples=2_000_000):
    """At most about max_samples values of a large array, evenly spaced, to bound time and memory."""
    step = max(1, data.size // max_samples)
    # ravel in memory order: NIfTI data is Fortran-ordered, and reshape(-1) would copy all of it
    return data.ravel(order="K")[::step]


def slices_view(data):
    """(A, B, n_slices, n_volumes) view of a 3D or 4D array, slicing across `axis`."""
    volumes = data[..., None] if data.ndim == 3 else data
    return np.moveaxis(volumes, axis, 2)


def slices_at(view, ks):
    """Slices number ks of `view` (slice k % n_slices of volume k // n_slices), as stored: (len(ks), A, B)."""
    n_slices = view.shape[2]
    return np.stack([view[:, :, k % n_slices, k // n_slices] for k in ks])


def spread_slices(view, n_samples):
    """Up to n_samples slices spread evenly over the slices and volumes of `view`, as stored: (n, A, B)."""
    n_total = view.shape[2] * view.shape[3]
    return slices_at(view, np.linspace(0, n_total - 1, min(n_samples, n_total)).astype(int))


def outlier_voxels(scaled):
    """Where normalised slices lie outside OUTLIER_RANGE: spikes, no tissue."""
    return (scaled < OUTLIER_RANGE[0]) | (scaled > OUTLIER_RANGE[1])


def without_outliers(scaled):
    """Normalised (n, A, B) slices in which each outlier voxel is replaced by the median of its 3x3
    neighbourhood (of the slices clipped to OUTLIER_RANGE), so the network sees no spike."""
    outliers = outlier_voxels(scaled)
    if not outliers.any():
        return scaled
    local_median = ndimage.median_filter(np.clip(scaled, *OUTLIER_RANGE), size=(1, 3, 3))
    return np.where(outliers, local_median, scaled)


def sample_slices(view, low, high, n_samples):
    """Up to n_samples slices spread evenly over the slices and volumes of `view`, normalised, as the network
    sees them (without_outliers): (n, A, B)."""
    return without_outliers(normalise(spread_slices(view, n_samples), low, high))


def masked_background(batch, value=0.0):
    """Voxels of (n, A, B) slices at exactly `value` that form regions (a background the scanner masked), not
    single voxels at it by noise or rounding: those that survive an opening with a 3x3 square."""
    return ndimage.binary_opening(batch == value, structure=np.ones((1, 3, 3), dtype=bool))


def masked_value(view):
    """The value of a scan's masked background: 0, or else its minimum (the scl_inter of a header that scales
    the stored zeros), when at least MASKED_FRACTION of its voxels form regions at exactly it; None when it has
    none. It stays as it is in the output; in a magnitude image that value is the zero signal."""
    slices = spread_slices(view, 24)
    for value in dict.fromkeys((0.0, float(slices.min()))):
        if np.mean(masked_background(slices, value)) >= MASKED_FRACTION:
            return value
    return None


def adapt_model(model, view, low, high, sigma, magnitude):
    """The network fine-tuned on this input's own slices (or the original when that does not help) and the
    threshold of the object, where the fine-tuned network is used (common.denoise_adapted)."""
    if min(view.shape[:2]) < MIN_ADAPT_SIZE:
        raise InputError(f"{input_path}: slices of {view.shape[0]}x{view.shape[1]} across axis {axis} are too small "
                         f"to adapt on (at least {MIN_ADAPT_SIZE}x{MIN_ADAPT_SIZE}); leave --adapt_steps at 0")
    if magnitude:
        print("note: the adaptation assumes Gaussian noise; in a magnitude image the noise is Rician, far from "
              "Gaussian where the signal is low, which can fool its checks (README, \"The guard's rule\")")
    adapted, info = adapt_to_slices(model, sample_slices(view, low, high, 64), sigma, adapt_steps, adapt_seconds,
                                    loss=adapt_loss, heldout_fraction=adapt_heldout_fraction, magnitude=magnitude)
    needed = "more than 2 needed in a magnitude image" if magnitude else "more than -2 needed"
    verdict = "kept" if info["kept"] else "discarded: no clear gain on held-out pixels, using the trained network"
    print(f"adaptation: {info['steps']} steps in {info['seconds']:.0f} s (and {info['check_seconds']:.0f} s of "
          f"checks), held-out self-supervised error "
          f"{info['heldout_error_before']:.2e} -> {info['heldout_error_before'] - info['heldout_gain']:.2e} "
          f"(a gain of {info['heldout_gain_z']:+.1f} standard errors, {needed}; recorrupted check "
          f"{info['recorrupted_gain_z']:.1f}, more than 2 needed; checked in the object: "
          f"{100 * info['object_fraction']:.0f}% of the pixels); {verdict}")
    return adapted, info["object_threshold"]


def trained_sigma_range(metadata):
    low, high = metadata["noise_sigma_range"]
    return 0.5 * low, 1.5 * high  # a single-sigma model copes with somewhat lower or higher noise


def denoise_volume_slices(model, adapted, object_threshold, view, out_view, low, high, sigma, bfloat16,
                          magnitude, background, floor_sigma):
    """Denoise every slice of `view` into `out_view`, batch_size slices at a time; `adapted` (when it is not
    `model`) denoises the object, above object_threshold. Voxels far outside the scan's range (spikes, see
    outlier_voxels) go through unchanged and the network sees their neighbourhood's median instead, so that
    one does not spread into its neighbours. A magnitude image's output stays >= 0, loses the Rician noise
    floor of sigma floor_sigma (on the [0, 1] scale of low-high; 0: none), counted from its zero signal: the
    value of its masked background, which stays as it is, or 0 when `background` is None."""
    zero = background or 0.0
    n_slices, n_volumes = view.shape[2:]
    total = n_slices * n_volumes
    with tqdm(total=total, desc="denoising", unit="slice") as progress:
        for start in range(0, total, batch_size):
            ks = range(start, min(start + batch_size, total))
            batch = slices_at(view, ks)
            scaled = normalise(batch, low, high)
            denoised = denoise_adapted(model, adapted, without_outliers(scaled), sigma, object_threshold,
                                       batch_size, self_ensemble, bfloat16)
            denoised = np.where(outlier_voxels(scaled), scaled, denoised)
            if magnitude:  # counted from the scan's 0 in units of high - low, not in the scan's own units, whose
                           # squares over- or underflow float32 when they are very large or small
                denoised = np.maximum(denoised + (low - zero) / (high - low), 0)
                denoised = (remove_rician_floor(denoised, floor_sigma) if floor_sigma else denoised) * (high - low)
                denoised += zero
            else:
                denoised = denoised * (high - low) + low
            if background is not None:
                denoised[masked_background(batch, background)] = background
            for k, image in zip(ks, denoised):
                out_view[:, :, k % n_slices, k // n_slices] = image
            progress.update(len(ks))


def is_statistical_map(header):
    """Whether a NIfTI header's intent is a statistic (codes 2-24: t, F, z, p, ...), whose values denoising changes."""
    return 2 <= int(header.get("intent_code", 0)) <= 24


def output_image(image, denoised, model_name, provenance):
    """A NIfTI of the input's class with the input's affine and header, holding `denoised`; its description
    (80 bytes at most) begins with the model's name, a comment extension says in full how it was made."""
    header = image.header.copy()
    out_dtype = denoised.dtype
    if dtype == "input":
        out_dtype = image.get_data_dtype()
        # integers stored with a scale factor (scl_slope, scl_inter) are not whole intensity units: keep the
        # float values and let nibabel choose a new scale factor when it writes them
        scaled = (getattr(image.dataobj, "slope", 1.0), getattr(image.dataobj, "inter", 0.0)) != (1.0, 0.0)
        if np.issubdtype(out_dtype, np.integer) and not scaled:
            info = np.iinfo(out_dtype)
            denoised = np.clip(np.rint(denoised), info.min, info.max).astype(out_dtype)
    header.set_data_dtype(out_dtype)
    header["cal_min"], header["cal_max"] = 0, 0  # the input's display range; 0, 0 = unset
    if dtype != "input":
        header.set_slope_inter(1.0, 0.0)  # the float32 values are the intensities themselves
    method = "mri-denoise self-ensemble" if self_ensemble else "denoised by mri-denoise"  # 80 bytes at most
    input_description = header["descrip"].tobytes().rstrip(b"\0").decode("latin-1")  # dcm2niix: TE, time, ...
    header["descrip"] = f"{method} {model_name}"[:79].encode()
    if input_description:
        provenance += f"; the input's description: {input_description}"
    if is_statistical_map(header):  # its values are no longer distributed as its intent says
        header.set_intent("none")
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", provenance.encode()))
    return type(image)(denoised.reshape(image.shape), image.affine, header)


def plot_report(data, denoised, low, high, sigma, voxel_sizes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    view, out_view = slices_view(data), slices_view(denoised)
    across, up = (float(size) for i, size in enumerate(voxel_sizes) if i != axis)  # mm; slices are shown transposed
    pixel_aspect = up / across if across > 0 and up > 0 else 1.0  # a header without voxel sizes: square pixels
    n_slices = view.shape[2]
    picks = np.unique(np.linspace(n_slices * 0.25, n_slices * 0.75, 3).astype(int))  # 1 or 2 for thin stacks
    is_4d = data.ndim == 4 and data.shape[3] >= 3  # a temporal SNR needs a few volumes
    n_rows = len(picks) + is_4d
    figure, axes = plt.subplots(n_rows, 3, figsize=(10, 3.2 * n_rows), squeeze=False)
    for row, z in enumerate(picks):
        before, after = view[:, :, z, 0], out_view[:, :, z, 0]
        removed = before - after
        # told sigma 0 a noise-map network still changes the image: then the scale is what it removed
        limit = 3 * sigma * (high - low) or float(np.max(np.abs(removed))) or 1.0
        for column, (image, title, kwargs) in enumerate([
                (before, f"input, slice {z}", dict(cmap="gray", vmin=low, vmax=high)),
                (after, "denoised", dict(cmap="gray", vmin=low, vmax=high)),
                (removed, "removed (input - denoised)", dict(cmap="RdBu_r", vmin=-limit, vmax=limit))]):
            axes[row, column].imshow(image.T, origin="lower", aspect=pixel_aspect, **kwargs)
            axes[row, column].set_title(title, fontsize=9)
    if is_4d:
        head = foreground_mask(normalise(data.mean(axis=3), low, high))
        tsnr_before, tsnr_after = tsnr_map(data), tsnr_map(denoised)
        # a robust common scale: a near-constant voxel has an enormous tSNR
        vmax = np.percentile(np.concatenate([tsnr_before[head], tsnr_after[head]]), 98)
        z = picks[len(picks) // 2]
        head_slice = np.moveaxis(head, axis, 2)[:, :, z]
        for column, (tsnr, name) in enumerate([(tsnr_before, "before"), (tsnr_after, "after")]):
            shown = np.where(head_slice, np.moveaxis(tsnr, axis, 2)[:, :, z], np.nan)
            axes[-1, column].imshow(shown.T, origin="lower", aspect=pixel_aspect, cmap="inferno", vmin=0, vmax=vmax)
            axes[-1, column].set_title(f"tSNR {name}: median {np.median(tsnr[head]):.1f} in the head", fontsize=9)
        axes[-1, 2].hist([np.clip(tsnr_before[head], 0, vmax), np.clip(tsnr_after[head], 0, vmax)], bins=60,
                         range=(0, vmax), label=["before", "after"], alpha=0.7)
        n_volumes = data.shape[3]
        axes[-1, 2].set_title(f"tSNR in the head, {n_volumes} volumes"
                              + (" (too few for a reliable tSNR)" if n_volumes < 10 else ""), fontsize=9)
        axes[-1, 2].legend()
    for axis_ in axes.flat:
        if axis_.images:
            axis_.set_xticks([])
            axis_.set_yticks([])
    figure.suptitle(f"{os.path.basename(input_path)}: estimated noise sigma {sigma:.3f} on the [0, 1] scale")
    figure.tight_layout()
    return figure


def note_thick_axis(voxel_sizes):
    """Print a note when the voxels are clearly thickest along an axis other than --axis: the scanner's slices
    (fine in-plane, thick across) are then not the ones being denoised, and the network sees stretched anatomy."""
    thickest = int(np.argmax(voxel_sizes))
    if thickest != axis and voxel_sizes[thickest] > THICK_AXIS_RATIO * voxel_sizes[axis]:
        sizes = " x ".join(f"{size:g}" for size in voxel_sizes)
        print(f"note: voxel sizes {sizes}, thickest along axis {thickest}: slices across it (--axis={thickest}) "
              f"are probably the scanner's, rather than those across axis {axis}")


def check_slices_wide_enough(shape):
    """Slices across --axis must be at least MIN_SLICE_SIZE pixels each way: a single 2D slice stored as
    (1, X, Y) would otherwise be denoised as X strips of 1 x Y pixels, hardly at all."""
    in_plane = [size for i, size in enumerate(shape[:3]) if i != axis]
    if min(in_plane) >= MIN_SLICE_SIZE:
        return
    thinnest = int(np.argmin(shape[:3]))
    other = [size for i, size in enumerate(shape[:3]) if i != thinnest]
    advice = (f"; it is thinnest along axis {thinnest}: --axis={thinnest} gives {other[0]}x{other[1]} slices"
              if min(other) >= MIN_SLICE_SIZE else "")
    raise InputError(f"{input_path}: slices across axis {axis} are {in_plane[0]}x{in_plane[1]} pixels, fewer than "
                     f"{MIN_SLICE_SIZE} each way to denoise{advice}")


def denoise_nifti(model, metadata, bfloat16):
    check_paths()
    image, data = load_nifti(input_path)
    data = data.reshape(data.shape[:4])
    check_slices_wide_enough(data.shape)
    if is_statistical_map(image.header):
        print(f"warning: {input_path} is a statistical map ({image.header.get_intent()[0]}); denoised, its values no "
              "longer follow that distribution, and the output's intent is cleared")
    norm = metadata["normalisation"]
    samples = even_subsample(data)
    low, high = percentile_range(samples, norm["low_percentile"], norm["high_percentile"])
    view = slices_view(data)
    note_thick_axis(image.header.get_zooms()[:3])
    magnitude = is_magnitude_image(samples)
    background = masked_value(view)
    zero = (background or 0.0) if magnitude else 0.0
    estimated = estimate_noise_sigma(sample_slices(view, low, high, 24), magnitude,
                                     zero=float(normalise(zero, low, high)))
    estimated = estimated if estimated >= MIN_MEASURED_SIGMA else 0.0
    sigma = noise_sigma or estimated
    print(f"{input_path}: shape {data.shape}, {view.shape[2] * view.shape[3]} slices across axis {axis}; "
          f"estimated noise sigma {estimated:.4f} on the model's [0, 1] scale "
          f"({'a magnitude image: (almost) no negative values' if magnitude else 'negative values: no magnitude correction'}"
          + ("; the Rician noise floor will be taken out)" if magnitude and removes_rician_floor(metadata) else ")")
          + (f", using {sigma:.4f} as given" if noise_sigma else ""))
    if background is not None and (background or not magnitude):
        print(f"note: its background is masked at {background:g}, "
              + ("taken as zero signal" if magnitude else "and stays so"))
    if not noise_sigma and estimated == 0:
        print(f"warning: no noise could be measured in {input_path} (the slices sampled are empty, constant or "
              "too thin); the network is told sigma 0: give --noise_sigma if you know it")
    elif not noise_sigma and min(view.shape[:2]) < SMALL_SLICE:
        print(f"note: slices of {view.shape[0]}x{view.shape[1]} are small, and the noise estimate reads part of "
              "their anatomy as noise (17x21 slices: up to 20% high in the benchmark); give --noise_sigma if you "
              "know it")
    beyond_range = np.mean(outlier_voxels(normalise(samples, low, high)))
    if beyond_range > OUTLIER_WARN_FRACTION:
        print(f"warning: {100 * beyond_range:.1f}% of the voxels of {input_path} lie beyond its 1st-99th percentile "
              "range (below -1 or above 3 on that scale) and go through unchanged as spikes would: the percentiles "
              "probably lie in a large noisy background around a small object; crop the scan to the object, or "
              "set its background to 0")
    sigma_low, sigma_high = trained_sigma_range(metadata)
    if sigma and not sigma_low <= sigma <= sigma_high:  # sigma 0 was warned about above
        print(f"warning: noise sigma {sigma:.4f} lies outside what {os.path.basename(model_path)} was trained for "
              f"({metadata['noise_sigma_range'][0]:g}-{metadata['noise_sigma_range'][1]:g}); "
              "expect under- or over-smoothing")
    adapted, object_threshold = (adapt_model(model, view, low, high, sigma, magnitude) if adapt_steps > 0
                                 else (model, None))
    floor_sigma = sigma if magnitude and removes_rician_floor(metadata) else 0.0
    denoised = np.empty_like(data) if report else data  # the report needs the input; otherwise reuse its memory
    denoise_volume_slices(model, adapted, object_threshold, view, slices_view(denoised), low, high, sigma, bfloat16,
                          magnitude, background, floor_sigma)
    if not np.isfinite(denoised).all():  # never written: a file of Inf would be refused as input by this very tool
        raise InputError(f"the denoised image of {input_path} holds values that are not finite (noise sigma "
                         f"{sigma:.3g}); nothing was written: please report this with the command")
    model_name = os.path.basename(model_path)
    adaptation = "none" if not adapt_steps else "kept" if adapted is not model else "discarded"
    provenance = (f"denoised by mri-denoise with {model_name}" + (", x8 self-ensemble" if self_ensemble else "")
                  + f"; slices across axis {axis}; noise sigma {sigma:.4f} ({'given' if noise_sigma else 'estimated'})"
                  f" on the [0, 1] scale of the input's percentiles {low:g} to {high:g}; adaptation: {adaptation}; "
                  f"Rician floor taken out: {'yes' if floor_sigma else 'no'}")
    result = output_image(image, denoised, model_name, provenance)
    atomic_write(output_path, lambda tmp: nib.save(result, tmp))
    print(f"denoised image written to {output_path}" + (" (x8 self-ensemble)" if self_ensemble else ""))
    if report:
        save_figure(plot_report(data, denoised, low, high, sigma, image.header.get_zooms()[:3]), report_path())
        print(f"report written to {report_path()}")


FILE_SETTINGS = ("output_path", "report", "adapt_steps", "adapt_seconds", "adapt_heldout_fraction", "adapt_loss",
                 "axis", "dtype", "noise_sigma", "overwrite")  # they only act on a file given with --input


def check_settings_need_input(defaults):
    """Settings for denoising a file are refused without --input, rather than ignored by the evaluation mode."""
    given = [name.removesuffix("_path") for name in FILE_SETTINGS if globals()[name] != defaults[name]]
    if given and not input_path:
        raise InputError(f"--{', --'.join(given)} need --input=SCAN.nii.gz; without --input the script scores "
                         "the network on the test split of --dataset_path")


def repo_file(path):
    """The file as given or, for a relative path that is not there, the repo's own copy: the default model and
    dataset work from any folder."""
    in_repo = os.path.join(REPO, path)
    return in_repo if not os.path.isabs(path) and not os.path.exists(path) and os.path.isfile(in_repo) else path


def main():
    global model_path, dataset_path
    defaults = {name: globals()[name] for name in FILE_SETTINGS}
    apply_overrides(globals(), aliases={"model": "model_path", "input": "input_path", "output": "output_path"})
    model_path, dataset_path = repo_file(model_path), repo_file(dataset_path)
    check_settings_need_input(defaults)
    if "OMP_NUM_THREADS" not in os.environ:  # a limit the user set wins
        torch.set_num_threads(usable_cores())
    keep_freed_memory()
    model, metadata = load_checkpoint(model_path)
    if self_ensemble:
        check_self_ensemble(metadata, model_path)
    bfloat16 = use_bfloat16(precision, next(model.parameters()).device)
    print(f"{os.path.basename(model_path)} runs in " + ("bfloat16 (--precision=float32 for full precision)"
                                                          if bfloat16 else "float32"))
    if input_path:
        denoise_nifti(model, metadata, bfloat16)
    else:
        evaluate_on_test_split(model, metadata, bfloat16)


if __name__ == "__main__":
    run_main(main)
