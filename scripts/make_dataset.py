"""Turn NIfTI scans into clean/noisy slice pairs in data/mri_denoising.npz, split by slice position
(by scan when there are 3 or more). Only one scan is in memory at a time."""
import glob
import json
import os
import tempfile

import numpy as np

from common import (BUNDLED_SCAN, MAX_NOISE_SIGMA, InputError, add_noise, apply_overrides, check_output_path,
                    check_seed, estimate_noise_sigma, file_sha256, foreground_mask, is_magnitude_image, load_nifti,
                    normalise, package_versions, percentile_range, run_main, save_npz)

# --- settings: edit here, or override on the command line: --noise_sigma=0.09 --input_paths=a.nii.gz,b.nii.gz
input_paths = [BUNDLED_SCAN]      # 3D or 4D NIfTI files; globs ("scans/*.nii.gz") are expanded
output_path = "data/mri_denoising.npz"
n_timepoints = 100                # keep the first n volumes of a 4D scan (all if fewer)
low_percentile = 1.0              # intensities at these global percentiles become 0 and 1
high_percentile = 99.0
clip_to_unit_range = False        # True clips the scaled intensities to [0, 1], as datasets made before this
                                  # setting were; the tool never clips, and a network trained on clipped slices
                                  # learns to pull a scan's brightest voxels down towards 1
min_foreground_fraction = 0.15    # keep axial slices whose head mask covers at least this much
slice_range = []                  # [first, last) axial slices to keep instead, e.g. --slice_range=10,14
noise_model = "gaussian"          # "gaussian" or "rician"
noise_sigma = 0.06                # on the [0, 1] scale
target_n_images = 1000            # draw several noise realisations per clean slice to reach about this many pairs
val_fraction = 0.15               # of slice positions (of scans, when there are 3 or more)
test_fraction = 0.15
pairing = "none"                  # "time": pair each image with the same slice at a neighbouring time point,
                                  # for Noise2Noise training (train_autoencoder --training_target=time_partner)
max_pair_difference = 3.0         # drop time pairs whose mean squared difference exceeds this many times the
                                  # 2 sigma^2 that noise alone gives (motion, signal change)
seed = 0
# ---

MIN_SLICE_SIZE = 8  # pixels: the training's smallest patch, and more than scikit-image's 7-pixel SSIM window


def expand_paths(paths):
    expanded = []
    for path in paths:
        # a file whose name holds glob characters ("scan[1].nii.gz") is that file, not a pattern
        matches = sorted(glob.glob(path)) if any(c in path for c in "*?[") and not os.path.isfile(path) else [path]
        if not matches:
            raise InputError(f"{path}: no file matches this pattern")
        expanded += matches
    if not expanded:
        raise InputError("input_paths is empty; give at least one NIfTI file")
    real_paths = [os.path.realpath(path) for path in expanded]
    repeated = sorted({path for path, real in zip(expanded, real_paths) if real_paths.count(real) > 1})
    if repeated:  # the same scan in two splits would leak it from training into validation or test
        raise InputError(f"input_paths name the same file more than once: {', '.join(repeated)}")
    return expanded


def load_scan(path):
    """Normalised first n_timepoints volumes of one scan: (X, Y, Z, T) float32, the low and high percentiles
    at 0 and 1 (unclipped: the brightest voxels lie above 1, as use_trained_autoencoder.py gives them to the
    network), (low, high) and the noise the scan holds itself on that scale, measured only without
    synthetic noise (0 otherwise; own_noise_sigma)."""
    _, data = load_nifti(path)
    volumes = data[..., None] if data.ndim == 3 else data[..., :n_timepoints]
    if min(volumes.shape[:2]) < MIN_SLICE_SIZE:
        raise InputError(f"{path}: slices of {volumes.shape[0]}x{volumes.shape[1]} are too small to train and score on "
                         f"(at least {MIN_SLICE_SIZE}x{MIN_SLICE_SIZE})")
    if volumes.min() == volumes.max():
        raise InputError(f"{path} is constant (every voxel {volumes.flat[0]:g}): nothing to denoise")
    low, high = percentile_range(volumes, low_percentile, high_percentile)
    own_sigma = own_noise_sigma(volumes, low, high) if noise_sigma == 0 else 0.0
    return normalise(volumes, low, high, clip=clip_to_unit_range), (low, high), own_sigma


def own_noise_sigma(volumes, low, high):
    """The noise sigma of a scan's first volume, on the scale where low and high are 0 and 1: what a network
    with a noise-level input is told in training on a real series (noise_sigma 0), as use_trained_autoencoder.py
    tells it the same estimate of a scan it denoises. Measured in the scan's own units, where a background
    the scanner set to 0 is still exactly 0 (the estimate leaves it out)."""
    first_volume = np.moveaxis(volumes[:, :, :, 0], 2, 0)
    return estimate_noise_sigma(first_volume, is_magnitude_image(volumes)) / (high - low)


def select_slices(head_mask, path, constant):
    """Axial slice positions to keep: an explicit slice_range, or slices with enough foreground that are not
    constant (`constant`: per position; the head mask, dilated in 3D, reaches one slice into an empty one)."""
    n_slices = head_mask.shape[2]
    if slice_range:
        first, last = slice_range
        if not 0 <= first < last <= n_slices:
            raise InputError(f"slice_range={slice_range} does not fit {path}, which has {n_slices} slices")
        empty = [z for z in range(first, last) if constant[z] or not head_mask[:, :, z].any()]
        if empty:  # nothing to denoise there, and no head to score the denoising in
            raise InputError(f"slice_range={slice_range}: {path} is constant or holds no head at slice(s) "
                             f"{', '.join(map(str, empty))}; choose a range without them")
        return list(range(first, last))
    fractions = head_mask.mean(axis=(0, 1))
    positions = [z for z in range(n_slices) if fractions[z] >= min_foreground_fraction and not constant[z]]
    if not positions:
        raise InputError(f"{path}: no slice has a foreground fraction of {min_foreground_fraction} or more")
    return positions


def split_sizes(n_groups, what):
    """(n_val, n_test) groups for n_groups slice positions or scans; an error if train, val or test would be empty."""
    n_test = max(1, round(test_fraction * n_groups))
    n_val = max(1, round(val_fraction * n_groups))
    if n_test + n_val >= n_groups:
        raise InputError(f"{n_groups} {what} cannot be split into non-empty train, val and test sets "
                         f"(val_fraction={val_fraction}, test_fraction={test_fraction}); give more "
                         + ("scans" if what == "scans" else "slices (slice_range, min_foreground_fraction) or 3 or more scans"))
    return n_val, n_test


def split_groups(groups, rng, what):
    """Assign each group (a slice position, or a whole scan) to 'train', 'val' or 'test'."""
    groups = list(groups)
    n_val, n_test = split_sizes(len(groups), what)
    order = rng.permutation(len(groups))
    split = {}
    for rank, index in enumerate(order):
        split[groups[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def check_settings():
    check_seed(seed)
    if n_timepoints < 1:
        raise InputError(f"n_timepoints={n_timepoints}; expected 1 or more")
    if not 0 <= noise_sigma < MAX_NOISE_SIGMA:
        raise InputError(f"noise_sigma={noise_sigma}; expected 0 or more and below {MAX_NOISE_SIGMA}, on the [0, 1] "
                         "scale of the scan's 1st-99th percentile range (0.06 is strong noise), not the scan's units")
    if not 0 <= low_percentile < high_percentile <= 100:
        raise InputError(f"low_percentile={low_percentile}, high_percentile={high_percentile}; expected 0 <= low < high <= 100")
    if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise InputError(f"val_fraction={val_fraction}, test_fraction={test_fraction}; each must be above 0 and together below 1")
    if slice_range and (len(slice_range) != 2 or not all(isinstance(z, int) for z in slice_range)
                        or not 0 <= slice_range[0] < slice_range[1]):
        raise InputError(f"slice_range={slice_range}; expected two whole numbers first,last with 0 <= first < last")
    if target_n_images < 1:
        raise InputError(f"target_n_images={target_n_images}; expected 1 or more")
    if noise_model not in ("gaussian", "rician"):
        raise InputError(f"noise_model={noise_model!r}; expected 'gaussian' or 'rician'")
    if pairing not in ("none", "time"):
        raise InputError(f"pairing={pairing!r}; expected 'none' or 'time'")
    if pairing == "time" and n_timepoints < 2:
        raise InputError(f"pairing=time needs 2 or more volumes of a 4D scan, and n_timepoints={n_timepoints} keeps one")
    if max_pair_difference <= 0:
        raise InputError(f"max_pair_difference={max_pair_difference}; expected above 0")


def check_split_before_loading(paths):
    """Fail before reading any voxel when the number of scans, or of slices in slice_range, is already too few."""
    if len(paths) >= 3:
        split_sizes(len(paths), "scans")
    elif slice_range:
        split_sizes(slice_range[1] - slice_range[0], "slice positions")


def pad_to_shape(slices, shape):
    """Zero-pad (n, h, w) slices at the bottom and right to (n, *shape), so scans of different sizes stack."""
    pad = ((0, 0), (0, shape[0] - slices.shape[1]), (0, shape[1] - slices.shape[2]))
    return np.pad(slices, pad)


def describe_scan(path, scan_index):
    """What the split and the layout of the output need from one scan. Its voxels are not kept, so
    that only one scan is in memory at a time; write_dataset reads it again."""
    volumes, (low, high), own_sigma = load_scan(path)
    head_mask = foreground_mask(volumes.mean(axis=3))
    constant = volumes.min(axis=(0, 1, 3)) == volumes.max(axis=(0, 1, 3))  # per slice position
    return {"path": path, "index": scan_index, "mask": head_mask, "positions": select_slices(head_mask, path, constant),
            "n_time": volumes.shape[3], "low": low, "high": high, "own_noise_sigma": own_sigma}


def assign_splits(scans):
    """{(scan index, slice position): 'train', 'val' or 'test'}: whole scans go to one split when there
    are 3 or more, otherwise slice positions do, the same for both scans of two (two runs of one subject
    hold nearly the same image at a position), so no scan or position is in two splits."""
    rng = np.random.default_rng(seed)
    if len(scans) >= 3:
        scan_split = split_groups([s["index"] for s in scans], rng, "scans")
        return {(s["index"], z): scan_split[s["index"]] for s in scans for z in s["positions"]}
    positions = sorted({z for s in scans for z in s["positions"]})
    position_split = split_groups(positions, rng, "slice positions")
    return {(s["index"], z): position_split[z] for s in scans for z in s["positions"]}


def time_partners(noisy, head_mask, n_time, n_realisations, start):
    """For a block of images of one slice position, ordered (time, realisation): the row of the same
    slice and realisation at the next time point (the previous one for the last), or -1 when there is
    no other time point or the pair differs by far more than noise does (motion, signal change)."""
    if pairing != "time" or n_time < 2:
        return np.full(len(noisy), -1)
    rows = np.arange(len(noisy))
    time_index = rows // n_realisations
    partners = np.where(time_index + 1 < n_time, rows + n_realisations, rows - n_realisations)
    noise_variance = estimate_noise_sigma(noisy) ** 2
    difference = np.mean((noisy - noisy[partners])[:, head_mask] ** 2, axis=1)
    return np.where(difference <= max_pair_difference * 2 * noise_variance, start + partners, -1)


def write_dataset(path, scans, split_of, n_realisations, extra_arrays):
    """Cut the kept slices of every scan into clean/noisy pairs and save them, with extra_arrays, to path.

    The image arrays are filled in memory-mapped files next to the output, one scan at a time, then
    streamed into the .npz: the dataset need not fit in memory. The noise of each slice position comes
    from its own stream, default_rng([seed, scan index, slice position]), drawn at the scan's own size
    before zero-padding to the largest scan's, so it does not depend on the other scans.
    Returns the per-image columns (scan_index, slice_index, time_index, split) and the shape (X, Y)."""
    shape = tuple(max(s["mask"].shape[i] for s in scans) for i in (0, 1))
    n_images = n_realisations * sum(len(s["positions"]) * s["n_time"] for s in scans)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=folder) as scratch:
        images = {name: np.lib.format.open_memmap(os.path.join(scratch, f"{name}.npy"), "w+", dtype, (n_images, *shape))
                  for name, dtype in (("clean", np.float32), ("noisy", np.float32), ("mask", bool))}  # (n_images, X, Y)
        columns = {k: [] for k in ("scan_index", "slice_index", "time_index", "split", "partner_index", "image_shape")}
        start = 0
        for scan in scans:
            volumes, _, _ = load_scan(scan["path"])
            for z in scan["positions"]:
                clean = np.repeat(np.moveaxis(volumes[:, :, z, :], 2, 0), n_realisations, axis=0)  # (T * R, x, y)
                draws = np.random.default_rng([seed, scan["index"], z]).standard_normal((2, *clean.shape), dtype=np.float32)
                rows = slice(start, start + len(clean))
                images["clean"][rows] = pad_to_shape(clean, shape)
                noisy = add_noise(clean, noise_sigma, noise_model, draws)
                images["noisy"][rows] = pad_to_shape(noisy, shape)
                columns["partner_index"].append(time_partners(noisy, scan["mask"][:, :, z], scan["n_time"],
                                                              n_realisations, start))
                images["mask"][rows] = pad_to_shape(scan["mask"][None, :, :, z], shape)
                columns["scan_index"].append(np.full(len(clean), scan["index"]))
                columns["slice_index"].append(np.full(len(clean), z))
                columns["time_index"].append(np.repeat(np.arange(scan["n_time"]), n_realisations))
                columns["split"].append(np.full(len(clean), split_of[(scan["index"], z)], dtype="<U5"))
                columns["image_shape"].append(np.tile(clean.shape[1:], (len(clean), 1)))  # before the padding
                start += len(clean)
        columns = {k: np.concatenate(v) for k, v in columns.items()}
        save_npz(path, {**images, **columns, **extra_arrays})
    return columns, shape


def main():
    settings = apply_overrides(globals(), aliases={"input": "input_paths", "output": "output_path"})
    check_settings()
    paths = expand_paths(input_paths)
    if any(os.path.abspath(output_path) == os.path.abspath(p) for p in paths):
        raise InputError(f"{output_path}: the output would overwrite an input")
    if not output_path.endswith(".npz"):
        raise InputError(f"output_path={output_path}: expected a file name ending in .npz")
    check_output_path(output_path, "file name ending in .npz")
    check_split_before_loading(paths)
    scans = [describe_scan(path, scan_index) for scan_index, path in enumerate(paths)]
    if pairing == "time" and all(scan["n_time"] < 2 for scan in scans):
        raise InputError(f"pairing=time needs a 4D scan of 2 or more volumes; {', '.join(paths)} "
                         f"{'has one volume' if len(paths) == 1 else 'have one volume each'}")
    split_of = assign_splits(scans)
    n_clean = sum(len(s["positions"]) * s["n_time"] for s in scans)
    # without noise every realisation would be the same image
    n_realisations = max(1, round(target_n_images / n_clean)) if noise_sigma > 0 else 1
    settings.update(input_paths=paths, input_sha256=[file_sha256(path) for path in paths],
                    n_noise_realisations=n_realisations, versions=package_versions())
    if noise_sigma == 0:  # a real series: its own noise is the noise, and a network with a noise-level input is told it
        settings["own_noise_sigma"] = float(np.median([s["own_noise_sigma"] for s in scans]))
    extra_arrays = {"scan_paths": np.array(paths),
                    "norm_low": np.array([s["low"] for s in scans], dtype=np.float64),
                    "norm_high": np.array([s["high"] for s in scans], dtype=np.float64),
                    "settings_json": np.array(json.dumps(settings, sort_keys=True))}
    columns, shape = write_dataset(output_path, scans, split_of, n_realisations, extra_arrays)
    print(f"{len(columns['split'])} image pairs of {shape[0]}x{shape[1]} from {len(paths)} scan(s), "
          + (f"{n_realisations} noise realisation(s) per clean slice" if noise_sigma else
             f"no noise added: the scans' own noise, sigma {settings['own_noise_sigma']:.4f} (median over scans), is "
             "the noise"))
    for name in ("train", "val", "test"):
        chosen = columns["split"] == name
        groups = (f"scans {sorted(set(columns['scan_index'][chosen].tolist()))}" if len(paths) >= 3 else
                  f"slice positions {sorted(set(columns['slice_index'][chosen].tolist()))}")
        print(f"  {name}: {int(chosen.sum())} images, {groups}")
    if pairing == "time":
        kept = columns["partner_index"] >= 0
        print(f"  time pairs: {int(kept.sum())} of {len(kept)} images have a partner at a neighbouring time point")
    print(f"dataset written to {output_path}")


if __name__ == "__main__":
    run_main(main)
