"""Turn NIfTI scans into clean/noisy slice pairs in data/mri_denoising.npz, split by slice position."""
import glob
import json
import os

import numpy as np

from common import (BUNDLED_SCAN, InputError, add_noise, apply_overrides, foreground_mask, load_nifti,
                    normalise, package_versions, percentile_range, run_main, save_npz)

# --- settings: edit here, or override on the command line: --noise_sigma=0.09 --input_paths=a.nii.gz,b.nii.gz
input_paths = [BUNDLED_SCAN]      # 3D or 4D NIfTI files; globs ("scans/*.nii.gz") are expanded
output_path = "data/mri_denoising.npz"
n_timepoints = 100                # keep the first n volumes of a 4D scan (all if fewer)
low_percentile = 1.0              # intensities at these global percentiles become 0 and 1
high_percentile = 99.0
min_foreground_fraction = 0.15    # keep axial slices whose head mask covers at least this much
slice_range = []                  # [first, last) axial slices to keep instead, e.g. --slice_range=10,14
noise_model = "gaussian"          # "gaussian" or "rician"
noise_sigma = 0.06                # on the [0, 1] scale
target_n_images = 1000            # draw several noise realisations per clean slice to reach about this many pairs
val_fraction = 0.15               # of slice positions (of scans, when there are 3 or more)
test_fraction = 0.15
seed = 0
# ---


def expand_paths(paths):
    expanded = []
    for path in paths:
        matches = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
        if not matches:
            raise InputError(f"{path}: no file matches this pattern")
        expanded += matches
    if not expanded:
        raise InputError("input_paths is empty; give at least one NIfTI file")
    return expanded


def load_scan(path):
    """Normalised first n_timepoints volumes of one scan: (X, Y, Z, T) float32 in [0, 1], and (low, high)."""
    _, data = load_nifti(path)
    volumes = data[..., None] if data.ndim == 3 else data[..., :n_timepoints]
    low, high = percentile_range(volumes, low_percentile, high_percentile)
    return normalise(volumes, low, high), (low, high)


def select_slices(head_mask, path):
    """Axial slice positions to keep: an explicit slice_range, or slices with enough foreground."""
    n_slices = head_mask.shape[2]
    if slice_range:
        first, last = slice_range
        if not 0 <= first < last <= n_slices:
            raise InputError(f"slice_range={slice_range} does not fit {path}, which has {n_slices} slices")
        return list(range(first, last))
    fractions = head_mask.mean(axis=(0, 1))
    positions = [z for z in range(n_slices) if fractions[z] >= min_foreground_fraction]
    if not positions:
        raise InputError(f"{path}: no slice has a foreground fraction of {min_foreground_fraction} or more")
    return positions


def split_groups(groups, rng):
    """Assign each group (a slice position, or a whole scan) to 'train', 'val' or 'test'."""
    groups = list(groups)
    n_test = max(1, round(test_fraction * len(groups)))
    n_val = max(1, round(val_fraction * len(groups)))
    if len(groups) < 3 or n_test + n_val >= len(groups):
        raise InputError(f"{len(groups)} slice positions or scans cannot be split into non-empty "
                         f"train, val and test sets (val_fraction={val_fraction}, test_fraction={test_fraction})")
    order = rng.permutation(len(groups))
    split = {}
    for rank, index in enumerate(order):
        split[groups[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def check_settings():
    if n_timepoints < 1:
        raise InputError(f"n_timepoints={n_timepoints}; expected 1 or more")
    if noise_sigma < 0:
        raise InputError(f"noise_sigma={noise_sigma}; expected 0 or more")
    if not 0 <= low_percentile < high_percentile <= 100:
        raise InputError(f"low_percentile={low_percentile}, high_percentile={high_percentile}; expected 0 <= low < high <= 100")
    if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise InputError(f"val_fraction={val_fraction}, test_fraction={test_fraction}; each must be above 0 and together below 1")
    if slice_range and len(slice_range) != 2:
        raise InputError(f"slice_range={slice_range}; expected two numbers: first,last")
    if target_n_images < 1:
        raise InputError(f"target_n_images={target_n_images}; expected 1 or more")


def pad_to_shape(slices, shape):
    """Zero-pad (n, h, w) slices at the bottom and right to (n, *shape), so scans of different sizes stack."""
    pad = ((0, 0), (0, shape[0] - slices.shape[1]), (0, shape[1] - slices.shape[2]))
    return np.pad(slices, pad)


def build_dataset(paths):
    rng = np.random.default_rng(seed)
    scans = []
    for scan_index, path in enumerate(paths):
        volumes, (low, high) = load_scan(path)
        head_mask = foreground_mask(volumes.mean(axis=3))
        positions = select_slices(head_mask, path)
        scans.append({"path": path, "volumes": volumes, "mask": head_mask, "positions": positions,
                      "low": low, "high": high, "index": scan_index})
    if len(scans) >= 3:  # no scan in two splits
        scan_split = split_groups(range(len(scans)), rng)
        split_of = lambda scan, z: scan_split[scan["index"]]
    else:  # no slice position in two splits
        position_split = split_groups([(s["index"], z) for s in scans for z in s["positions"]], rng)
        split_of = lambda scan, z: position_split[(scan["index"], z)]

    n_clean = sum(len(s["positions"]) * s["volumes"].shape[3] for s in scans)
    n_realisations = max(1, round(target_n_images / n_clean))
    shape = tuple(max(s["volumes"].shape[i] for s in scans) for i in (0, 1))
    columns = {k: [] for k in ("clean", "mask", "scan_index", "slice_index", "time_index", "split")}
    for scan in scans:
        for z in scan["positions"]:
            n_time = scan["volumes"].shape[3]
            clean = np.moveaxis(scan["volumes"][:, :, z, :], 2, 0)  # (T, X, Y)
            columns["clean"].append(pad_to_shape(np.repeat(clean, n_realisations, axis=0), shape))
            mask = np.broadcast_to(scan["mask"][:, :, z], (n_time * n_realisations, *scan["mask"].shape[:2]))
            columns["mask"].append(pad_to_shape(mask, shape))
            columns["time_index"].append(np.repeat(np.arange(n_time), n_realisations))
            columns["scan_index"].append(np.full(n_time * n_realisations, scan["index"]))
            columns["slice_index"].append(np.full(n_time * n_realisations, z))
            columns["split"].append(np.full(n_time * n_realisations, split_of(scan, z)))
    arrays = {k: np.concatenate(v) for k, v in columns.items()}
    arrays["clean"] = arrays["clean"].astype(np.float32)
    arrays["mask"] = arrays["mask"].astype(bool)
    arrays["split"] = arrays["split"].astype("<U5")
    normal_draws = rng.standard_normal((2, *arrays["clean"].shape), dtype=np.float32)
    arrays["noisy"] = add_noise(arrays["clean"], noise_sigma, noise_model, normal_draws).astype(np.float32)
    arrays["scan_paths"] = np.array([s["path"] for s in scans])
    arrays["norm_low"] = np.array([s["low"] for s in scans], dtype=np.float64)
    arrays["norm_high"] = np.array([s["high"] for s in scans], dtype=np.float64)
    return arrays, n_realisations


def main():
    settings = apply_overrides(globals(), aliases={"input": "input_paths", "output": "output_path"})
    check_settings()
    paths = expand_paths(input_paths)
    if any(os.path.abspath(output_path) == os.path.abspath(p) for p in paths):
        raise InputError(f"{output_path}: the output would overwrite an input")
    arrays, n_realisations = build_dataset(paths)
    settings.update(input_paths=paths, n_noise_realisations=n_realisations, versions=package_versions())
    arrays["settings_json"] = np.array(json.dumps(settings, sort_keys=True))
    save_npz(output_path, arrays)
    counts = {name: int((arrays["split"] == name).sum()) for name in ("train", "val", "test")}
    positions = {name: sorted(set(arrays["slice_index"][arrays["split"] == name].tolist())) for name in counts}
    print(f"{len(arrays['clean'])} image pairs of {arrays['clean'].shape[1]}x{arrays['clean'].shape[2]} "
          f"from {len(paths)} scan(s), {n_realisations} noise realisation(s) per clean slice")
    for name in counts:
        print(f"  {name}: {counts[name]} images, slice positions {positions[name]}")
    print(f"dataset written to {output_path}")


if __name__ == "__main__":
    run_main(main)
