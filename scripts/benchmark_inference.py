"""Speed and memory of denoising a whole 4D NIfTI with use_trained_autoencoder.py, against BM3D.

Writes a synthetic 64x64x30x300 float32 EPI-like series (the size of the original project's scan: 9,000
slices) to a temporary folder, denoises it with `use_trained_autoencoder.py --input ... --output ...` in a
child process, and measures that process's wall time and peak resident memory (RSS). BM3D is timed on a
few slices of the same series in the same run, and both are scored against the noise-free phantom there.
Then times `--adapt_steps` (self-supervised fine-tuning on the input) on a 128x128x10 volume against its
60-second budget, and scores the result with and without it.
Writes denoising_examples/benchmark_inference.json and prints a markdown table (into README.md too with
--update_readme=true).

    python scripts/benchmark_inference.py [--model=trained_models/....pt] [--shape=64,64,30,300]"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from common import (DEFAULT_MODEL, InputError, add_noise, apply_overrides, bm3d_slices, check_bm3d_fits,
                    check_file_exists, check_output_path, check_seed, mean_psnr_in_mask, normalise, package_versions,
                    percentile_range, run_main, save_json, write_into_readme)

# --- settings: edit here, or override on the command line: --model=trained_models/other.pt
model_path = DEFAULT_MODEL        # common.py names the shipped default, for every script
precision = "auto"                # passed to the tool: "auto" (bfloat16 on a CPU that computes it natively),
                                  # "float32" or "bfloat16"
shape = [64, 64, 30, 300]         # X, Y, Z, T of the synthetic series
voxel_size_mm = 3.5
repetition_time_s = 2.0
noise_model = "gaussian"          # "gaussian" or "rician"
noise_sigma = 0.06                # on the [0, 1] scale of the clean series' 1st..99th percentile range
n_bm3d_slices = 5                 # slices of the same series denoised with BM3D (and scored)
seed = 0
target_slices_per_second = 150.0  # 9,000 slices in 60 s
memory_allowance_mb = 300.0       # the peak RSS may exceed the input and output array sizes by this much
adapt_shape = [128, 128, 10]      # the volume the adaptation is timed on
adapt_steps = 300
adapt_budget_seconds = 60.0       # for the whole command: load, adapt, denoise, write
work_dir = ""                     # keep the synthetic and denoised NIfTIs in a new folder inside this one;
                                  # "" = a temporary folder, removed after
results_path = "denoising_examples/benchmark_inference.json"
update_readme = False             # true: write the table into README.md between the benchmark_inference markers
# ---

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
MB = 2 ** 20

# Runs a command and reports its wall time and peak RSS. A separate small process, because on Linux a
# child's ru_maxrss also counts the pages of the process that started it (held until its exec), and this
# script holds the whole series in memory.
LAUNCHER = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.call(sys.argv[2:])
seconds = time.perf_counter() - started
max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
with open(sys.argv[1], "w") as f:
    json.dump({"returncode": code, "seconds": seconds, "peak_rss_bytes": max_rss}, f)
"""


def phantom_volume(size):
    """A noise-free EPI-like head (X, Y, Z) float32, intensities about 0..1200: scalp, grey matter around
    white matter with a folded boundary, bright CSF in two ventricles, a smooth coil sensitivity and the
    partial-volume blur of thick voxels."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in size), indexing="ij")
    width = np.sqrt(np.clip(1 - (0.95 * z) ** 2, 1e-6, None))  # the head narrows towards the top and bottom
    radius = np.sqrt((x / 0.8) ** 2 + (y / 0.92) ** 2) / width
    white = radius < 0.62 * (1 + 0.12 * np.sin(9 * np.arctan2(y, x) + 4 * z))
    ventricles = (((np.abs(x) - 0.12) / 0.09) ** 2 + (y / 0.3) ** 2 + (z / 0.35) ** 2) < 1
    volume = np.select([ventricles & (radius < 0.88), white, radius < 0.88, radius < 1],
                       [1000.0, 560.0, 780.0, 350.0], 0.0)
    volume *= 1 + 0.15 * x - 0.1 * y
    return ndimage.gaussian_filter(volume, 0.6).astype(np.float32)


def synthetic_series(clean, change):
    """(X, Y, Z, T) float32 series: the clean volume times each volume's signal change, fresh noise in each
    volume; and the noise sigma in intensity units."""
    low, high = percentile_range(clean)
    sigma = noise_sigma * (high - low)
    series = np.empty((*clean.shape, len(change)), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for t, factor in enumerate(change):
        draws = rng.standard_normal((2, *clean.shape), dtype=np.float32)
        series[..., t] = add_noise(clean * np.float32(factor), sigma, noise_model, draws)
    return series, sigma


def write_series(series, path):
    image = nib.Nifti1Image(series, np.diag([voxel_size_mm] * 3 + [1.0]))
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_zooms(((voxel_size_mm,) * 3 + (repetition_time_s,))[:series.ndim])
    nib.save(image, path)


def run_measured(command, folder):
    """(wall seconds, peak RSS bytes, stdout) of a command, which must succeed."""
    report = os.path.join(folder, "measured.json")
    process = subprocess.run([sys.executable, "-c", LAUNCHER, report, *command], capture_output=True, text=True)
    with open(report) as f:
        measured = json.load(f)
    if process.returncode != 0 or measured["returncode"] != 0:
        raise InputError(f"{' '.join(command)} failed:\n{process.stderr.strip()}")
    return measured["seconds"], measured["peak_rss_bytes"], process.stdout


def tool_precision(stdout):
    """What use_trained_autoencoder.py said it ran the network in: "bfloat16" or "float32"."""
    said = [line for line in stdout.splitlines() if " runs in " in line]
    return said[0].split(" runs in ")[1].split()[0] if said else "unknown"


def measure_adaptation(folder):
    """Wall time of use_trained_autoencoder.py --adapt_steps on a noisy adapt_shape phantom, and in-head PSNR
    of its output and of the output without adaptation, against the noise-free phantom."""
    clean = phantom_volume(adapt_shape)
    noisy, _ = synthetic_series(clean, [1.0])
    input_path = os.path.join(folder, "volume.nii.gz")
    write_series(noisy[..., 0], input_path)
    low, high = percentile_range(clean)
    head = clean > low + 0.1 * (high - low)
    psnr, seconds, said = {}, None, ""
    for steps in (0, adapt_steps):
        output_path = os.path.join(folder, f"volume_adapted_{steps}.nii.gz")
        command = [sys.executable, os.path.join(SCRIPTS, "use_trained_autoencoder.py"), f"--model={model_path}",
                   f"--input={input_path}", f"--output={output_path}", f"--adapt_steps={steps}", "--overwrite",
                   f"--precision={precision}"]
        elapsed, _, stdout = run_measured(command, folder)
        denoised = np.moveaxis(np.asarray(nib.load(output_path).dataobj, dtype=np.float32), 2, 0)
        psnr[steps] = mean_psnr_in_mask(np.moveaxis(normalise(clean, low, high), 2, 0),
                                        normalise(denoised, low, high), np.moveaxis(head, 2, 0))
        if steps:
            seconds, said = elapsed, next(line for line in stdout.splitlines() if line.startswith("adaptation:"))
    return {"shape": adapt_shape, "steps": adapt_steps, "seconds": seconds, "budget_seconds": adapt_budget_seconds,
            "meets_target": seconds <= adapt_budget_seconds, "psnr_mask_without": psnr[0],
            "psnr_mask_with": psnr[adapt_steps], "tool_said": said}


def time_bm3d(noisy_slices, sigma):
    """BM3D of each (H, W) slice on the [0, 1] scale with the true sigma: (denoised slices, seconds per slice)."""
    started = time.perf_counter()
    denoised = bm3d_slices(noisy_slices, sigma)
    return denoised, (time.perf_counter() - started) / len(noisy_slices)


def markdown_table(results):
    network, memory, adapt = results["network"], results["memory"], results["adaptation"]
    psnr = results["psnr_mask_db"]
    return "\n".join([
        f"Denoising a {'x'.join(map(str, shape))} float32 NIfTI ({results['n_slices']:,} slices) with "
        f"{os.path.basename(model_path)} (convolutions in {results['precision']}); {results['machine']}",
        "",
        "| | measured | target |",
        "|---|---|---|",
        f"| wall time, whole file (load, denoise, write .nii.gz) | {network['seconds']:.1f} s "
        f"| {results['n_slices'] / target_slices_per_second:.0f} s |",
        f"| slices per second | {network['slices_per_second']:.0f} | {target_slices_per_second:.0f} |",
        f"| peak RSS | {memory['peak_rss_mb']:.0f} MB | {memory['budget_mb']:.0f} MB (input "
        f"{memory['input_mb']:.0f} + output {memory['output_mb']:.0f} + {memory_allowance_mb:.0f}) |",
        f"| BM3D, seconds per slice ({n_bm3d_slices} slices) | {results['bm3d_seconds_per_slice']:.3f} s | |",
        f"| network speed-up over BM3D, per slice | {results['speedup_over_bm3d']:.0f}x | |",
        f"| `--adapt_steps={adapt['steps']}` on a {'x'.join(map(str, adapt['shape']))} volume, wall time of the "
        f"whole command | {adapt['seconds']:.1f} s | {adapt['budget_seconds']:.0f} s |",
        "",
        f"PSNR in the head on those {n_bm3d_slices} slices: noisy {psnr['noisy']:.2f} dB, "
        f"BM3D (true sigma) {psnr['bm3d']:.2f} dB, network {psnr['network']:.2f} dB "
        "(a synthetic phantom, not the network's training data)",
        "",
        f"PSNR in the head of the {'x'.join(map(str, adapt['shape']))} volume: {adapt['psnr_mask_without']:.2f} dB "
        f"without adaptation, {adapt['psnr_mask_with']:.2f} dB with it (the tool said: \"{adapt['tool_said']}\")",
    ])


def main():
    settings = apply_overrides(globals(), aliases={"model": "model_path"})
    if len(shape) != 4 or min(shape) < 1:
        raise InputError(f"shape={shape}; expected four sizes X,Y,Z,T")
    check_bm3d_fits(shape[:2], f"shape={shape}")
    if len(adapt_shape) != 3 or min(adapt_shape[:2]) < 8 or adapt_shape[2] < 1 or adapt_steps < 1:
        raise InputError(f"adapt_shape={adapt_shape}, adapt_steps={adapt_steps}; expected X,Y of 8 or more, Z of 1 "
                         "or more, and 1 or more steps")
    if n_bm3d_slices < 1 or not noise_sigma > 0:
        raise InputError(f"n_bm3d_slices={n_bm3d_slices}, noise_sigma={noise_sigma}; expected 1 or more slices and "
                         "a sigma above 0")
    check_file_exists(model_path, "checkpoint (train one with scripts/train_autoencoder.py, or give --model)")
    check_output_path(results_path)
    check_seed(seed)
    if work_dir and os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise InputError(f"work_dir={work_dir} is a file; expected a folder")
    load_before = os.getloadavg()[0]
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)
    # a new folder even inside work_dir, kept there: the files of earlier runs and the user's are never replaced
    folder = tempfile.mkdtemp(prefix="benchmark_inference_", dir=work_dir or None)
    input_path, output_path = os.path.join(folder, "series.nii.gz"), os.path.join(folder, "denoised.nii.gz")
    try:
        clean = phantom_volume(shape[:3])
        t = np.arange(shape[3])
        change = 1 + 0.02 * t / shape[3] + 0.01 * np.sin(2 * np.pi * t / 20)  # drift and a 20-volume cycle
        series, sigma = synthetic_series(clean, change)
        write_series(series, input_path)
        print(f"synthetic series written to {input_path} ({os.path.getsize(input_path) / MB:.0f} MB on disk)")
        # the slices BM3D gets: the middle axial slice at times spread over the series, on the [0, 1] scale
        low, high = percentile_range(series.ravel(order="K")[::7])
        z, times = shape[2] // 2, np.linspace(0, shape[3] - 1, n_bm3d_slices).astype(int)
        noisy_slices = normalise(np.moveaxis(series[:, :, z, times], 2, 0), low, high)
        clean_slices = normalise(clean[None, :, :, z] * change[times, None, None], low, high)
        del series

        command = [sys.executable, os.path.join(SCRIPTS, "use_trained_autoencoder.py"), f"--model={model_path}",
                   f"--input={input_path}", f"--output={output_path}", "--overwrite", f"--precision={precision}"]
        print("running " + " ".join(command), flush=True)
        seconds, peak_rss, stdout = run_measured(command, folder)
        denoised_middle = np.asarray(nib.load(output_path).dataobj[:, :, z, :], dtype=np.float32)
        network_slices = normalise(np.moveaxis(denoised_middle[:, :, times], 2, 0), low, high)
        output_file_mb = os.path.getsize(output_path) / MB
        input_file_mb = os.path.getsize(input_path) / MB
        adaptation = measure_adaptation(folder)
    finally:
        if not work_dir:
            shutil.rmtree(folder, ignore_errors=True)
    bm3d_denoised, bm3d_seconds = time_bm3d(noisy_slices, sigma / (high - low))

    n_slices = shape[2] * shape[3]
    array_bytes = int(np.prod(shape)) * 4  # float32 in, float32 out
    budget = 2 * array_bytes + memory_allowance_mb * MB
    masks = clean_slices > 0.1
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    results = {
        "command": " ".join(command), "n_slices": n_slices, "precision": tool_precision(stdout),
        "machine": f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, load average {load_before:.1f} before "
                   f"and {os.getloadavg()[0]:.1f} after",
        "network": {"seconds": seconds, "slices_per_second": n_slices / seconds,
                    "meets_target": n_slices / seconds >= target_slices_per_second},
        "memory": {"peak_rss_mb": peak_rss / MB, "input_mb": array_bytes / MB, "output_mb": array_bytes / MB,
                   "budget_mb": budget / MB, "meets_target": peak_rss <= budget,
                   "input_file_mb": input_file_mb, "output_file_mb": output_file_mb},
        "bm3d_seconds_per_slice": bm3d_seconds,
        "speedup_over_bm3d": bm3d_seconds / (seconds / n_slices),
        "adaptation": adaptation,
        "psnr_mask_db": {"noisy": mean_psnr_in_mask(clean_slices, noisy_slices, masks),
                         "bm3d": mean_psnr_in_mask(clean_slices, bm3d_denoised, masks),
                         "network": mean_psnr_in_mask(clean_slices, network_slices, masks)},
        "tool_output": stdout.strip().splitlines(), "settings": settings, "versions": package_versions(),
    }
    print(markdown_table(results))
    if update_readme:
        write_into_readme(markdown_table(results), "benchmark_inference")
    print(f"results written to {save_json(results, results_path)}")


if __name__ == "__main__":
    run_main(main)
