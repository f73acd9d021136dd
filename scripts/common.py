"""What every script needs: command-line overrides, checked NIfTI reading and atomic writing,
intensity normalisation, synthetic noise, foreground masks and image-quality metrics."""
import gzip
import hashlib
import importlib.resources
import json
import math
import os
import signal
import sys
import tempfile
import zlib

import nibabel as nib
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

BUNDLED_SCAN = str(importlib.resources.files("nibabel") / "tests" / "data" / "example4d.nii.gz")
# the scripts' default network
DEFAULT_MODEL = "trained_models/autoencoder_dncnn_blind_bf16_b4_unclipped_darkleaves_200epochs_672images.pt"
# a noise sigma as large as the scan's 1st-99th percentile range (the [0, 1] scale) is no noise level: most likely
# one in the scanner's units
MAX_NOISE_SIGMA = 1.0


class InputError(Exception):
    """A problem with the user's files or settings, reported as one line and a non-zero exit."""


def check_seed(seed):
    """Seeds from 0 to 2**63 - 1: numpy takes any, torch up to 2**64 - 1, and DistributedSampler adds the epoch."""
    if not 0 <= seed < 2 ** 63:
        raise InputError(f"seed={seed}; expected a whole number from 0 to 2**63 - 1")


def _stop(signal_number, frame):
    raise KeyboardInterrupt


def run_main(main):
    """Run a script's main(); an InputError becomes 'error: ...' on stderr and exit code 1, Ctrl-C or SIGTERM (a
    batch system's time limit) one line and exit code 130, not a traceback, after the same clean-up: outputs are
    renamed into place only when complete (atomic_write) and temporary folders are removed."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


# --- command-line overrides of a script's constants --------------------------------------------

def _parse_list_item(text, current):
    """One item of --name=a,b,c: of the type of the list's current items, or a number if it reads as one
    when the list is empty (--slice_range=10,14 must give numbers, --input_paths=a,b strings)."""
    if current:
        return type(current[0])(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _finite(name, text, values):
    """values, or an error if a number among them is nan or inf: no setting means anything by them, and nan
    passes every range check (nan < 0 is False)."""
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise InputError(f"--{name}={text}: expected finite numbers, not nan or inf")
    return values


def _parse_value(name, text, current):
    """Turn the text of --name=text into the type of the constant it overrides."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"--{name}={text}: expected true or false")
    if current is None or isinstance(current, str):
        return None if text.lower() == "none" and current is None else text
    try:
        if isinstance(current, dict):
            parsed = json.loads(text)
            if not isinstance(parsed, dict):
                raise ValueError
            return parsed
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return _finite(name, text, [float(text)])[0]
        if isinstance(current, (list, tuple)):
            parsed = json.loads(text) if text.startswith("[") else [_parse_list_item(p, current) for p in text.split(",") if p]
            return type(current)(_finite(name, text, parsed))
    except ValueError:  # json.JSONDecodeError is a ValueError
        raise InputError(f"--{name}={text}: expected a value of type {type(current).__name__}") from None
    raise InputError(f"--{name}: cannot override a setting of type {type(current).__name__}")


def apply_overrides(settings, argv=None, aliases=None):
    """Override module constants in `settings` (a script's globals()) from --name=value arguments.

    `aliases` maps short flags to constant names, e.g. {"model": "model_path"}. Flags without a value
    set booleans to true (--report). Unknown names are an error, never silently ignored."""
    argv = sys.argv[1:] if argv is None else list(argv)
    aliases = aliases or {}
    known = {k for k, v in settings.items()
             if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str, list, tuple, dict, type(None)))}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            hint = (" (several files: --input_paths=a.nii.gz,b.nii.gz, or a glob in quotes, which the shell leaves "
                    "alone)" if "input_paths" in known else "")
            raise InputError(f"unexpected argument {arg!r}; settings look like --name=value{hint}")
        name, has_value, text = arg[2:].partition("=")
        name = aliases.get(name, name)
        if name not in known:
            raise InputError(f"unknown setting --{arg[2:].partition('=')[0]}; known settings: "
                             + ", ".join(sorted(known | set(aliases))))
        if not has_value:
            next_is_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if isinstance(settings[name], bool) and not next_is_value:
                text = "true"
            elif next_is_value:
                i += 1
                text = argv[i]
            else:
                raise InputError(f"--{name} needs a value")
        settings[name] = _parse_value(name, text, settings[name])
        i += 1
    return {k: settings[k] for k in sorted(known)}


def pick_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bfloat16(device):
    """Whether this device computes bfloat16 convolutions natively (a CPU with AVX512-BF16 or AMX, a recent
    GPU); elsewhere bfloat16 is emulated and slower than float32. (torch.ops.mkldnn._is_mkldnn_bf16_supported
    is no test of that: it also says yes for AVX512 CPUs that only emulate bfloat16.)"""
    import torch
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    # private functions of torch.cpu: if a later torch drops them, bfloat16 is simply not used
    return bool(torch.backends.mkldnn.is_available() and any(check is not None and check() for check in checks))


def keep_freed_memory(mmap_threshold=32 * 2**20, trim_threshold=2**30):
    """Ask glibc's malloc to keep the memory of freed tensors for the next batch instead of handing it back
    to the OS. By default it unmaps or trims freed blocks of a few MB, and every batch page-faults its
    activations back in: in an ad hoc timing the bfloat16 DnCNN took 4.0 to 8.5 ms a slice depending on how a
    process's heap happened to fall, and a steady 3.8-4.6 ms with these two settings. Blocks above the mmap
    threshold (32 MB, glibc's most) are still mapped and unmapped each time: denoise_slices keeps its batches
    below it (MAX_BATCH_PIXELS). Returns whether they took; a no-op outside Linux with glibc."""
    import ctypes
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # setting either one also turns off glibc's own adjustment of both thresholds
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


PRECISIONS = ("auto", "float32", "bfloat16")  # use_trained_autoencoder.py's and the benchmark's choices


def use_bfloat16(precision, device):
    """Whether to run a network's convolutions in bfloat16 at inference: precision "bfloat16", or "auto" on a CPU
    that computes it natively (there about twice as fast; the output moves by about 3e-4 RMS on the [0, 1]
    scale)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision == "bfloat16" or (precision == "auto" and device.type == "cpu" and native_bfloat16(device))


# --- files -------------------------------------------------------------------------------------

def check_file_exists(path, what="file"):
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder; expected a {what}")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such {what}")


def usable_cores():
    """The cores this process may run on: fewer than os.cpu_count() in a container or a batch job."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_output_path(path, expected="file"):
    """Fail before any work when a file cannot be written at path: a folder by that name, or a parent that is a
    file or not writable."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder; expected a {expected}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the missing folders are created when the file is written
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{path}: no permission to write in {parent}")


def load_nifti(path):
    """Load a 3D or 4D NIfTI and check it. Returns (image, data) with data float32 (X, Y, Z[, T])."""
    path = str(path)
    check_file_exists(path)
    check_compression_matches_name(path)
    try:
        image = nib.load(path)  # finds the format; reads only the header
    except Exception as error:  # nibabel raises many types for a file that is not an image
        raise InputError(f"{path} is not a NIfTI file ({type(error).__name__}: {error})".splitlines()[0]) from None
    if isinstance(image, nib.Nifti1Pair) and not isinstance(image, nib.Nifti1Image):
        raise InputError(f"{path} is a NIfTI .hdr/.img pair; give a single .nii or .nii.gz file "
                         "(nibabel converts it: nib.save(nib.load('scan.hdr'), 'scan.nii.gz'))")
    if isinstance(image, nib.AnalyzeImage) and not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path} is an Analyze 7.5 .hdr/.img pair, not a NIfTI file; convert it, and check its "
                         "orientation after, Analyze has no reliable one (nib.save(nib.Nifti1Image(img.dataobj, "
                         "img.affine), 'scan.nii.gz') with img = nib.load('scan.hdr'))")
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path} is a {type(image).__name__}, not a NIfTI file (.nii or .nii.gz)")
    image = type(image).from_filename(path, keep_file_open=True)  # one handle: the chunked read never re-decompresses
    shape = image.shape
    if len(shape) == 5 and shape[4] == 1:
        shape = shape[:4]
    if len(shape) not in (3, 4):
        raise InputError(f"{path} has {len(image.shape)} dimensions {tuple(image.shape)}; expected a 3D or 4D NIfTI")
    if min(shape) == 0:
        raise InputError(f"{path} is empty: shape {tuple(image.shape)}")
    stored = image.get_data_dtype()
    if stored.kind == "c" or stored.names:  # a cast to float32 would drop the imaginary part, or fail
        raise InputError(f"{path} holds {'complex' if stored.kind == 'c' else 'RGB'} voxels ({stored}); expected "
                         "one real value per voxel (for complex MRI data, save its magnitude image)")
    check_gzip_intact(path)
    try:
        data, n_not_finite, n_too_large = read_float32(image)
    except (EOFError, OSError, zlib.error, ValueError) as error:
        raise InputError(f"{path} could not be read, the file may be truncated ({type(error).__name__}: {error})"
                         .splitlines()[0]) from None
    data = data.reshape(shape)
    if n_not_finite:
        raise InputError(f"{path} contains {n_not_finite} NaN or Inf values; set them to 0 first (a background "
                         "of them then stays 0, as a masked one)")
    if n_too_large:
        raise InputError(f"{path} contains {n_too_large} values beyond float32's range (+-3.4e38); rescale the image")
    if not np.any(data):
        if np.any(np.asanyarray(image.dataobj)):  # float64 values too small for float32 all became 0
            raise InputError(f"{path}: every value is below float32's smallest (about 1e-45) and reads as 0; "
                             "rescale the image")
        raise InputError(f"{path} is empty: every voxel is zero")
    return image, data


NIFTI_HEADER_SIZES = (348, 540)  # sizeof_hdr, the first 4 bytes of a NIfTI-1 and a NIfTI-2 header


def check_compression_matches_name(path):
    """nibabel decides from the name whether to decompress: a NIfTI whose name says otherwise would be
    reported as no NIfTI at all."""
    with open(path, "rb") as raw:
        start = raw.read(4)
    gzipped = start[:2] == b"\x1f\x8b"  # gzip's magic number
    if path.endswith(".nii") and gzipped:
        raise InputError(f"{path} is gzip-compressed but named .nii; rename it to .nii.gz")
    if path.endswith(".nii.gz") and not gzipped and len(start) == 4 and any(
            int.from_bytes(start, order) in NIFTI_HEADER_SIZES for order in ("little", "big")):
        raise InputError(f"{path} is an uncompressed NIfTI but named .nii.gz; rename it to .nii")


def check_gzip_intact(path, chunk_bytes=16 * 2**20):
    """Decompress a gzipped file to its end, so that gzip checks its CRC and length: nibabel reads only the
    voxels' bytes and stops before that check, so a .nii.gz with damaged bytes or its last bytes cut off would
    load with wrong voxels."""
    with open(path, "rb") as raw:
        if raw.read(2) != b"\x1f\x8b":  # gzip's magic number
            return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(chunk_bytes):
                pass
    except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{path} is damaged or truncated: its gzip data fail gzip's own check "
                         f"({type(error).__name__}: {error})".splitlines()[0]) from None


def read_float32(image, chunk_bytes=8 * 2**20):
    """(voxels as a float32 array in the file's (Fortran) order, number of NaN or Inf values in the file, number
    of finite values too large for float32), read a few volumes at a time: reading all at once makes nibabel
    hold a second full-size copy (the raw or decompressed bytes) next to the float32 result."""
    data = np.empty(image.shape, dtype=np.float32, order="F")
    n_last = image.shape[-1]
    step = max(1, chunk_bytes // max(1, data[..., 0].nbytes))
    n_not_finite = n_too_large = 0
    for start in range(0, n_last, step):
        chunk, values = data[..., start:start + step], np.asanyarray(image.dataobj[..., start:start + step])
        with np.errstate(over="ignore"):  # counted below
            chunk[...] = values
        n_bad = chunk.size - int(np.count_nonzero(np.isfinite(chunk)))
        if n_bad and values.dtype != np.float32:  # a float64 file: some may be finite values float32 cannot hold
            n_bad_in_file = values.size - int(np.count_nonzero(np.isfinite(values)))
            n_too_large += n_bad - n_bad_in_file
            n_bad = n_bad_in_file
        n_not_finite += n_bad
    return data, n_not_finite, n_too_large


def atomic_write(path, write):
    """Call write(tmp_path) on a temporary file in the destination folder, then rename it into place,
    so a crash never leaves a half-written output."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    # keep the extension(s) so libraries that look at the suffix (savefig, nibabel) do the right thing
    suffix = base[base.index("."):] if "." in base else ""
    handle, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    return path


def save_json(data, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=float)
            f.write("\n")
    return atomic_write(path, write)


def save_figure(figure, path, dpi=110):
    import matplotlib.pyplot as plt
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, bbox_inches="tight"))
    plt.close(figure)
    return path


def file_sha256(path, chunk_bytes=16 * 2**20):
    """The SHA-256 of a file's bytes: which scan a dataset was made from, wherever it lies."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def scan_identities(*datasets_settings):
    """One name per input scan of each dataset's settings, equal for the same scan: its file's SHA-256 when every
    dataset recorded it (make_dataset since 2026-12-05), else its file name (subject folders often hold scans of one
    name, and the hash tells them apart; the file name survives a move to another machine, the path does not)."""
    by_hash = all("input_sha256" in settings for settings in datasets_settings)
    return [settings["input_sha256"] if by_hash else
            [os.path.basename(path) for path in settings.get("input_paths", [])] for settings in datasets_settings]


def package_versions():
    import matplotlib
    import skimage
    import torch
    return {"python": sys.version.split()[0], "torch": str(torch.__version__), "numpy": np.__version__,
            "nibabel": nib.__version__, "scikit-image": skimage.__version__, "matplotlib": matplotlib.__version__}


# --- intensities -------------------------------------------------------------------------------

def percentile_range(volume, low_percentile=1.0, high_percentile=99.0):
    """Intensities at the given percentiles of the whole volume: the normalisation's 0 and 1."""
    low, high = np.percentile(volume, [low_percentile, high_percentile])
    if high <= low:  # a mostly constant image: fall back to the full range
        low, high = float(volume.min()), float(volume.max())
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def normalise(volume, low, high, clip=False):
    """low -> 0 and high -> 1; clip=True cuts to [0, 1], which only make_dataset's clip_to_unit_range asks for:
    the network is given a scan's brightest voxels above 1."""
    scaled = (np.asarray(volume, dtype=np.float32) - low) / (high - low)
    return np.clip(scaled, 0.0, 1.0) if clip else scaled


def denormalise(scaled, low, high):
    return np.asarray(scaled, dtype=np.float32) * (high - low) + low


def add_noise(clean, sigma, noise_model, normal_draws):
    """Noisy version of `clean` (numpy or torch) given standard normal draws of shape (2, *clean.shape).

    gaussian: clean + sigma * n1.
    rician:   |clean + sigma * (n1 + i n2)|, the magnitude of a complex signal with Gaussian noise in
              each channel: the noise of real magnitude MRI (biased upwards where the signal is low)."""
    if noise_model == "gaussian":
        return clean + sigma * normal_draws[0]
    if noise_model == "rician":
        return ((clean + sigma * normal_draws[0]) ** 2 + (sigma * normal_draws[1]) ** 2) ** 0.5
    raise InputError(f"noise_model={noise_model!r}; expected 'gaussian' or 'rician'")


def keeps_rician_floor(metadata):
    """Whether a network's output on a magnitude image holds the Rician noise floor: it was not trained on
    Rician noise, so it removes noise as if it averaged to zero."""
    return metadata["noise_model"] != "rician"


def rician_mean(signal_in_sigmas):
    """Mean of the magnitude of a signal A plus complex Gaussian noise of sigma, in sigmas, given A in sigmas:
    sqrt(pi/2) L_1/2(-A^2 / 2) (Gudbjartsson & Patz 1995), with Bessel functions scaled by exp(-A^2 / 4) so that
    large A does not overflow. 1.25 at A = 0, approaching sqrt(A^2 + 1) as A grows."""
    from scipy.special import i0e, i1e
    half_square = np.square(signal_in_sigmas) / 2
    return np.sqrt(np.pi / 2) * ((1 + half_square) * i0e(half_square / 2) + half_square * i1e(half_square / 2))


# the inverse of rician_mean as a table over u = sqrt(mean - mean at 0), in sigmas: the signal grows like u near
# the floor and smoothly above, so a uniform grid in u holds it closely and needs no search, only a multiply
_FINE_SIGNAL = np.linspace(0, 20, 200_001)
RICIAN_FLOOR = float(rician_mean(0.0))
RICIAN_U_STEP = float(np.sqrt(rician_mean(20.0) - RICIAN_FLOOR)) / 4000
RICIAN_SIGNAL_AT_U = np.interp((np.arange(4001) * RICIAN_U_STEP) ** 2 + RICIAN_FLOOR, rician_mean(_FINE_SIGNAL),
                               _FINE_SIGNAL).astype(np.float32)  # beyond 20 sigma: sqrt(x^2 - 1), exact to 1e-4 sigma


def remove_rician_floor(denoised, noise_sigma):
    """A magnitude image's Rician noise lifts its mean above the signal A (to 1.25 sigma where A = 0, to about
    sqrt(A^2 + sigma^2) where A is a few sigma). BM3D and a network trained on Gaussian noise keep that mean;
    this takes the floor out of their output by inverting the exact mean (rician_mean): a background of pure
    noise goes to 0, tissue moves little (0.003 at A = 0.3, sigma = 0.045). Values at or below the mean of
    pure noise become 0; the scale's 0 must be no signal."""
    if noise_sigma <= 0:
        return np.asarray(denoised, dtype=np.float32)
    in_sigmas = np.asarray(denoised, dtype=np.float32) / np.float32(noise_sigma)
    position = np.sqrt(np.maximum(in_sigmas - np.float32(RICIAN_FLOOR), 0)) / np.float32(RICIAN_U_STEP)
    # clipped before the cast (no int64 overflow); a NaN stays NaN through the weight, not an IndexError
    index = np.clip(np.nan_to_num(position), 0, len(RICIAN_SIGNAL_AT_U) - 2).astype(np.int64)
    weight = position - index
    signal = (1 - weight) * RICIAN_SIGNAL_AT_U[index] + weight * RICIAN_SIGNAL_AT_U[index + 1]
    beyond_table = position > len(RICIAN_SIGNAL_AT_U) - 1
    if beyond_table.any():
        # sqrt(x^2 - 1) as x sqrt(1 - x^-2): x^2 overflows float32 for a sigma far below the image's values
        far = np.where(beyond_table, in_sigmas, np.float32(2))  # 2 where unused: no division by 0
        signal = np.where(beyond_table, far * np.sqrt(1 - np.square(1 / far)), signal)
    return (signal * np.float32(noise_sigma)).astype(np.float32)


RECORRUPTION_ALPHA = 0.5  # Pang et al. use 0.5: the input gets 12% more noise, the target 2.2x the noise


def recorrupt(noisy, sigma, normal_draws, alpha=RECORRUPTION_ALPHA):
    """Recorrupted-to-Recorrupted (Pang et al., "Recorrupted-to-Recorrupted: Unsupervised Deep Learning
    for Image Denoising", CVPR 2021): from one noisy image with Gaussian noise of known sigma and fresh
    draws z (standard normal, same shape), an input y + alpha sigma z and a target y - sigma z / alpha
    whose noises are independent, so training input -> target is unbiased supervised training toward
    the clean image, at the input's noise level sigma * sqrt(1 + alpha^2), which is also returned.
    numpy or torch; sigma is a number or broadcasts against `noisy`."""
    extra = sigma * normal_draws
    return noisy + alpha * extra, noisy - extra / alpha, sigma * (1 + alpha ** 2) ** 0.5


def tsnr_map(series):
    """Temporal SNR per voxel of a 4D series: mean over time / standard deviation over time."""
    mean = series.mean(axis=3)
    std = series.std(axis=3)
    # a voxel equal at every time point has a std of float32 rounding, not 0: no tSNR of 1e7 from it
    varies = std > 1e-6 * np.abs(mean)
    return np.where(varies, mean / np.maximum(std, 1e-12), 0.0)


def foreground_mask(volume):
    """Foreground (head) mask of a normalised 3D volume (X, Y, Z): Otsu threshold of the
    lightly smoothed image, holes filled slice by slice, then dilated by one voxel. Intensities are clipped
    to [0, 1] first, so that the brightest voxels and spikes do not move the threshold."""
    smoothed = ndimage.gaussian_filter(np.clip(np.asarray(volume, dtype=np.float32), 0, 1), sigma=(1, 1, 0))
    if smoothed.max() <= smoothed.min():
        return np.ones(volume.shape, dtype=bool)
    mask = smoothed > threshold_otsu(smoothed.ravel())  # flat: a (X, Y, 3) volume is not an RGB image
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return ndimage.binary_dilation(mask, iterations=1)


def object_threshold(denoised_slices):
    """Otsu threshold between the object and the background of lightly smoothed (n, H, W) slices."""
    smoothed = ndimage.gaussian_filter(np.asarray(denoised_slices, dtype=np.float32), sigma=(0, 1, 1))
    return float(threshold_otsu(smoothed.ravel())) if smoothed.max() > smoothed.min() else -np.inf


def object_region(denoised_slices, threshold, margin=2):
    """Boolean (n, H, W): the object in denoised slices, slice by slice: lightly smoothed values above
    threshold, holes filled, grown by `margin` pixels so that its edges belong to it."""
    region = ndimage.gaussian_filter(np.asarray(denoised_slices, dtype=np.float32), sigma=(0, 1, 1)) > threshold
    for index in range(len(region)):
        region[index] = ndimage.binary_dilation(ndimage.binary_fill_holes(region[index]), iterations=margin)
    return region


# --- metrics -----------------------------------------------------------------------------------

def image_metrics(clean, estimate, mask):
    """PSNR (dB, data range 1) and SSIM of one 2D slice, inside the mask and over the whole image."""
    clean = np.asarray(clean, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    _, ssim_map = structural_similarity(clean, estimate, data_range=1.0, full=True)
    return {
        "psnr_mask": float(peak_signal_noise_ratio(clean[mask], estimate[mask], data_range=1.0)),
        "ssim_mask": float(ssim_map[mask].mean()),
        "psnr_image": float(peak_signal_noise_ratio(clean, estimate, data_range=1.0)),
        "ssim_image": float(structural_similarity(clean, estimate, data_range=1.0)),
    }


def summarise_metrics(per_slice):
    """Mean and standard deviation over slices of each metric in a list of image_metrics dicts."""
    return {key: {"mean": float(np.mean([m[key] for m in per_slice])),
                  "std": float(np.std([m[key] for m in per_slice]))}
            for key in per_slice[0]}


def save_npz(path, arrays):
    """np.savez with fixed zip timestamps, so the same arrays always give a byte-identical file."""
    import zipfile

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return atomic_write(path, write)


def load_npz(path, mapped=()):
    """The arrays of an .npz file; those named in `mapped` are memory-mapped rather than read, so
    their pages come from disk only when used (a dataset larger than memory still trains, and the
    torchrun processes on one machine share one copy). save_npz stores arrays uncompressed, which is
    what makes this possible; a compressed member is read into memory instead."""
    import zipfile
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if name in mapped and info.compress_type == zipfile.ZIP_STORED:
                arrays[name] = _map_stored_npy(path, raw, info.header_offset)
            if arrays.get(name) is None:
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    return arrays


def load_dataset(path):
    """The arrays of a make_dataset.py .npz and the settings that made them. The images (clean, noisy, mask:
    (n, X, Y)) are memory-mapped: an image is read from disk when it is used."""
    import zipfile
    check_file_exists(path, "dataset (run scripts/make_dataset.py first)")
    try:
        stored = load_npz(path, mapped=("clean", "noisy", "mask"))
        arrays = {k: stored[k] for k in ("clean", "noisy", "mask", "split", "slice_index", "scan_index",
                                         "time_index", "settings_json")} | {"partner_index": stored.get("partner_index")}
        # each image's own size, inside the zero padding that stacks scans of other sizes (datasets made before
        # 2026-12-05 do not say: their images are taken as unpadded)
        n_images, full_shape = len(arrays["clean"]), arrays["clean"].shape[1:]
        shapes = stored.get("image_shape")
        arrays["image_shape"] = np.tile(full_shape, (n_images, 1)) if shapes is None else shapes
        dataset_settings = json.loads(str(arrays.pop("settings_json")))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise InputError(f"{path} is not a dataset made by make_dataset.py ({error})".splitlines()[0]) from None
    return arrays, dataset_settings


def unpadded(image_shapes, shape):
    """(n, X, Y) masks of the pixels inside each image's own size (image_shape: (n, 2)), not its zero padding."""
    rows, columns = np.indices(shape)
    shapes = np.asarray(image_shapes)
    return (rows < shapes[:, 0, None, None]) & (columns < shapes[:, 1, None, None])


def denoise_at_own_sizes(model, noisy_slices, image_shapes, noise_sigma, **options):
    """denoise_slices on each slice cut to its own size (image_shape: (n, 2)), so that the zero padding that stacks
    scans of other sizes in one dataset never reaches the network (it darkened the borders it touched); returned
    padded again, zeros outside."""
    shapes = np.asarray(image_shapes)
    if (shapes == noisy_slices.shape[1:]).all():
        return denoise_slices(model, noisy_slices, noise_sigma, **options)
    denoised = np.zeros(noisy_slices.shape, dtype=np.float32)
    for height, width in np.unique(shapes, axis=0):
        same = np.flatnonzero((shapes == (height, width)).all(axis=1))
        denoised[same, :height, :width] = denoise_slices(model, noisy_slices[same, :height, :width], noise_sigma,
                                                         **options)
    return denoised


def unique_clean_slices(path, split):
    """Distinct clean slices (n, H, W) and masks of one split (the .npz repeats them once per noise draw), and
    the anatomical position of each (n,): one number per scan and slice position, shared by a position's time
    points; for the benchmarks, which score and add noise to whole slices: a dataset that zero-pads scans of
    other sizes to one is refused (the padding would count as perfectly denoised pixels)."""
    arrays, settings = load_dataset(path)
    if np.any(arrays["image_shape"] != arrays["clean"].shape[1:]):
        sizes = sorted({tuple(size) for size in arrays["image_shape"].tolist()})
        raise InputError(f"{path} holds slices of {len(sizes)} sizes ({', '.join(f'{h}x{w}' for h, w in sizes)}), "
                         f"zero-padded to {arrays['clean'].shape[1]}x{arrays['clean'].shape[2]}; the benchmarks "
                         "score whole slices: make the dataset from scans of one size")
    keys = np.stack([arrays["scan_index"], arrays["slice_index"], arrays["time_index"]], axis=1)
    chosen = arrays["split"] == split
    _, first = np.unique(keys[chosen], axis=0, return_index=True)
    indices = np.flatnonzero(chosen)[np.sort(first)]
    positions = np.unique(keys[indices, :2], axis=0, return_inverse=True)[1].reshape(-1)
    return np.asarray(arrays["clean"][indices]), np.asarray(arrays["mask"][indices]), positions, settings


def _map_stored_npy(path, raw, header_offset):
    """np.memmap of an uncompressed .npy member of a zip file, or None for an empty array."""
    import struct
    raw.seek(header_offset)  # the member's bytes, a plain .npy file, follow its local zip header
    name_length, extra_length = struct.unpack("<HH", raw.read(30)[26:30])
    raw.seek(header_offset + 30 + name_length + extra_length)
    if np.lib.format.read_magic(raw) == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(raw)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(raw)
    if dtype.hasobject:
        raise ValueError(f"{path}: an array of Python objects cannot be memory-mapped")
    if 0 in shape:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=raw.tell(), order="F" if fortran_order else "C")


# --- running a network and showing what it did -------------------------------------------------

# what the scripts read from a checkpoint's metadata, besides the description of the network itself
CHECKPOINT_METADATA = ("n_parameters", "noise_map", "noise_sigma_range", "normalisation")


def load_checkpoint(path):
    """Load a checkpoint of this repo (weights_only) and rebuild its network: (model, metadata)."""
    import torch
    from models import model_from_checkpoint
    path = str(path)
    check_file_exists(path, "checkpoint")
    if path.endswith(".resume.pt"):
        raise InputError(f"{path} is a state for train_autoencoder.py --resume; use the checkpoint beside it "
                         f"({os.path.basename(path).removesuffix('.resume.pt')}.pt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"{path} is not a readable PyTorch checkpoint, it may be truncated or "
                         f"of another kind ({type(error).__name__})") from None
    try:
        model = model_from_checkpoint(checkpoint)
    except (ValueError, KeyError, RuntimeError, TypeError) as error:
        # load_state_dict's first line only names the network; its second says what does not fit
        lines = [line.strip() for line in str(error).splitlines() if line.strip()][:2]
        raise InputError(f"{path}: {' '.join(lines)}"[:300]) from None
    metadata = checkpoint["metadata"]
    missing = [key for key in CHECKPOINT_METADATA if key not in metadata]
    normalisation = metadata.get("normalisation")
    percentiles = {"low_percentile", "high_percentile"}
    if not missing and not (isinstance(normalisation, dict) and percentiles <= set(normalisation)):
        missing = ["the normalisation's percentiles"]
    if missing:
        raise InputError(f"{path}: its metadata lacks {', '.join(missing)}")
    # the weights in the layout of denoise_slices' batches: 1.5-2.5x faster on a CPU than the default layout
    return model.to(memory_format=torch.channels_last).eval(), metadata


def network_name(path):
    """How tables name a checkpoint: its file name without folder, extension and "autoencoder_"."""
    return os.path.splitext(os.path.basename(str(path)))[0].removeprefix("autoencoder_")


# a batch holds at most this many pixels (16 slices of 128x96), so the activations of a 32-channel layer stay
# below glibc's 32 MB mmap threshold even in float32 and are reused between batches (keep_freed_memory):
# 256x256 slices ran 1.9x faster in batches of 4 than of 16 (ad hoc timing)
MAX_BATCH_PIXELS = 16 * 128 * 96


def slices_per_batch(batch_size, slice_shape):
    """At most batch_size slices of this shape and at most MAX_BATCH_PIXELS pixels, but at least one slice."""
    return max(1, min(batch_size, MAX_BATCH_PIXELS // max(1, int(np.prod(slice_shape)))))


def denoise_slices(model, noisy_slices, noise_sigma, batch_size=16, device=None, self_ensemble=False, bfloat16=False):
    """Run the network over (n, H, W) slices in batches of at most batch_size slices and MAX_BATCH_PIXELS pixels
    (but at least one slice); returns (n, H, W) float32 on the [0, 1] scale.

    noise_sigma is a number or an (n,) array; only networks with a noise map use it. self_ensemble: the mean
    of the network's outputs for the 8 flips and 90-degree rotations of each slice, each turned back
    (geometric self-ensemble, Timofte et al. 2016, "Seven ways to improve example-based single image super
    resolution"): for a network trained on all 8 orientations (check_self_ensemble), its errors in each
    partly average out. 8x the time. bfloat16: the convolutions in bfloat16 (use_bfloat16); the input and, in
    the residual networks, the subtraction of the predicted noise stay float32."""
    import torch
    if self_ensemble:
        total = np.zeros(np.shape(noisy_slices), dtype=np.float32)
        for turns in range(4):
            for flip in (False, True):
                denoised = denoise_slices(model, oriented(noisy_slices, turns, flip), noise_sigma, batch_size, device,
                                          bfloat16=bfloat16)
                total += undo_orientation(denoised, turns, flip)
        return total / 8
    device = device or next(model.parameters()).device
    noisy_slices = np.asarray(noisy_slices, dtype=np.float32)
    sigmas = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float32), (len(noisy_slices),))
    denoised = np.empty_like(noisy_slices)
    n_per_batch = slices_per_batch(batch_size, noisy_slices.shape[1:])
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
        for start in range(0, len(noisy_slices), n_per_batch):
            batch = torch.from_numpy(noisy_slices[start:start + n_per_batch, None]).to(device)
            batch = batch.contiguous(memory_format=torch.channels_last)
            sigma = torch.tensor(sigmas[start:start + n_per_batch], device=device)
            denoised[start:start + n_per_batch] = model(batch, sigma)[:, 0].float().cpu().numpy()
    return denoised


def check_self_ensemble(metadata, path):
    """The self-ensemble shows a network rotated slices: refuse a network that never saw them in training."""
    settings = metadata.get("training_settings", {})
    # checkpoints written before "all_orientations" existed: judged by their settings (all shipped ones: 64-pixel
    # patches of 128x96 slices)
    if not metadata.get("all_orientations", bool(settings.get("augment") and settings.get("patch_size"))):
        raise InputError(f"{path} was not trained on flipped and rotated square patches (--augment with a "
                         "--patch_size within its slices), so a self-ensemble would show it orientations it never saw")


def oriented(slices, turns, flip):
    """(n, H, W) slices rotated by turns x 90 degrees in-plane, then mirrored when flip (a contiguous copy)."""
    rotated = np.rot90(slices, turns, axes=(1, 2))
    return (rotated[:, :, ::-1] if flip else rotated).copy()  # not ascontiguousarray: it keeps a size-1 axis's
                                                               # negative stride, which torch refuses


def undo_orientation(slices, turns, flip):
    """The inverse of oriented(): slices oriented with (turns, flip) brought back to the original orientation."""
    unflipped = slices[:, :, ::-1] if flip else slices
    return np.rot90(unflipped, -turns, axes=(1, 2)).copy()


def plot_denoising_grid(noisy, denoised, clean, masks, title, row_labels=None):
    """A figure with one row per slice: noisy | denoised | clean, with in-mask PSNR on each; row_labels name the
    slices (scan and position) at the left."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n_rows = len(noisy)
    figure, axes = plt.subplots(n_rows, 3, figsize=(8, 2.7 * n_rows), squeeze=False)
    for row in range(n_rows):
        panels = [("noisy", noisy[row]), ("denoised", denoised[row]), ("clean", clean[row])]
        for column, (name, image) in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(np.asarray(image).T, cmap="gray", vmin=0, vmax=1, origin="lower")
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0 and row_labels is not None:
                axis.set_ylabel(row_labels[row], fontsize=8)
            if column < 2:
                inside_clean, inside_image = clean[row][masks[row]], image[masks[row]]
                if not masks[row].any():
                    axis.set_title(f"{name} (no head in this slice)", fontsize=9)
                elif np.array_equal(inside_clean, inside_image):  # a real series without added noise: no PSNR
                    axis.set_title(f"{name}: the clean image", fontsize=9)
                else:
                    psnr_db = peak_signal_noise_ratio(inside_clean, inside_image, data_range=1.0)
                    axis.set_title(f"{name}: {psnr_db:.2f} dB in mask", fontsize=9)
            else:
                axis.set_title(name, fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


MAD_TO_SIGMA = 0.6745                       # median |x| of a standard normal variable
RAYLEIGH_SPREAD = np.sqrt(2 - np.pi / 2)    # standard deviation of the magnitude of pure noise, in sigmas
DARK_LOCAL_MEAN = 2.25                      # in sigmas: pure magnitude noise averages 1.25 sigma, and the local
                                            # mean of 16 such pixels spreads 0.33 sigma; 3 spreads above it
MAGNITUDE_NEGATIVE_FRACTION = 0.02          # the guess when the caller does not say: scaled so that the
                                            # background lies at 0, a magnitude image has almost no value below
                                            # 0, Gaussian noise on a dark background about half of that background


MAGNITUDE_NEGATIVE_SHARE = 0.005  # a scan with at most this share of negative voxels is a magnitude image: resampling
                                  # with spline or sinc interpolation leaves a few, Gaussian noise around 0 many


def is_magnitude_image(samples):
    """Whether a scan, from its voxels in its own units (or an even subsample of them), is a magnitude image (nearly
    no negative voxel), whose dark background holds Rayleigh, not Gaussian, noise."""
    return bool(np.mean(samples < 0) <= MAGNITUDE_NEGATIVE_SHARE)


def masked_pixels(image):
    """Pixels of a 2D image that hold exactly 0, or exactly the value of a 5x5 region all at one value: a
    background the scanner or a skull-stripping mask set to one value, which after scaling need not be 0.
    Noise, even stored as whole numbers, does not give 25 equal neighbours."""
    flat = ndimage.maximum_filter(image, 5, mode="nearest") == ndimage.minimum_filter(image, 5, mode="nearest")
    masked = image == 0
    if flat.any():
        masked |= np.isin(image, np.unique(image[flat]))
    return masked


def slice_noise_sigma(image, magnitude=None, zero=0.0):
    """Noise sigma of one 2D slice from its finest diagonal wavelet coefficients (Donoho's MAD estimate:
    median |coefficient| / 0.6745), read where the slice has least structure. Three details keep anatomy
    and image size from biasing it:
    - an orthogonal transform of the slice cropped to even sizes and taken as periodic, without the
      coefficients that straddle the wrap: every coefficient of white noise then has exactly spread sigma
      (a symmetric extension damps them at the borders, which read 0.83 sigma in a 17x21 slice of pure noise);
    - only the half of the positions whose neighbourhood has least energy in the horizontal and vertical
      detail bands: edges and texture raise all three bands, while the noise of those bands is independent
      of the diagonal one, so choosing by them does not bias the noise (in a 128x96 slice of the bundled scan
      with sigma 0.02 the whole band read 0.025);
    - in a magnitude image (real MRI, Rician noise) pure noise where the image is dark has a Rayleigh
      distribution, which spreads only 0.655 as much as sigma (Henkelman 1985): there the coefficients are
      divided by 0.655 first, or a scan with much background gets too low a sigma (0.047 for 0.06). "Dark"
      counts from `zero`, the value of zero signal on the slice's scale: below 0 for a scan scaled so that its
      1st percentile is 0 and that has no background (a cropped field of view), whose darkest tissue would
      otherwise be taken for noise-only background (more than 5% high in the test).
    Coefficients that read a masked background (masked_pixels: exact zeros, or one value over whole regions)
    are left out. The estimate still reads anatomy as noise where every position has some, as in very small
    slices of a head (17x21 voxels: up to 20% high at 0.06). A slice thinner than 4 pixels gives 0. magnitude:
    whether the image is one; None guesses it from the values (see estimate_noise_sigma)."""
    import pywt
    image = np.asarray(image, dtype=np.float64)
    height, width = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    if min(height, width) < 4:  # no coefficient inside the slice: too thin to tell
        return 0.0
    coefficients = pywt.dwt2(image[:height, :width], "db2", mode="periodization")
    local_sum, (horizontal, vertical, diagonal) = coefficients  # local_sum: weights summing to 2
    structure = ndimage.uniform_filter(horizontal ** 2 + vertical ** 2, 3, mode="wrap")
    inside = (slice(0, -1), slice(0, -1))  # the last row and column wrap around the slice's edges
    detail, local_mean, structure = np.abs(diagonal[inside]), local_sum[inside] / 2, structure[inside]
    # the coefficients that read a masked pixel (a background the scanner or a mask set to one value) see less noise
    masked = masked_pixels(image[:height, :width])
    reads_masked = np.abs(pywt.dwt2(masked.astype(np.float64), "db2", mode="periodization")[0][inside]) > 1e-6
    kept = ~reads_masked if masked.any() else detail > 0
    detail, local_mean, structure = detail[kept], local_mean[kept], structure[kept]
    if detail.size == 0:
        return 0.0
    smooth = structure <= np.median(structure)
    detail, local_mean = detail[smooth], local_mean[smooth]
    sigma = np.median(detail) / MAD_TO_SIGMA
    if magnitude is None:
        magnitude = np.mean(image < 0) <= MAGNITUDE_NEGATIVE_FRACTION
    if magnitude:
        for _ in range(2):  # the first pass starts from an estimate 0.655-1 times too low
            dark = local_mean - zero < DARK_LOCAL_MEAN * sigma
            sigma = np.median(np.where(dark, detail / RAYLEIGH_SPREAD, detail)) / MAD_TO_SIGMA
    return float(sigma)


def estimate_noise_sigma(slices, magnitude=None, zero=0.0):
    """Noise sigma of a set of 2D slices (any scale): the median over slices of slice_noise_sigma, leaving out
    the slices that show no noise at all (0: empty padding of a masked scan, or too thin to tell), so that
    they do not pull it to 0; 0 when no slice shows any. The wavelet estimate is biased less by anatomy than
    the spread of the background is. magnitude: whether they come from a magnitude image (a scan whose stored
    values are never negative, as real MRI); None guesses it from the slices themselves (at most 2% negative
    values), which holds only when their background lies at 0: after the tool's 1-99 percentile scaling any
    scan has 1% negative values. zero: the value of zero signal on the slices' scale (see slice_noise_sigma)."""
    sigmas = [sigma for sigma in (slice_noise_sigma(s, magnitude, zero) for s in slices) if sigma > 0]
    return float(np.median(sigmas)) if sigmas else 0.0


# --- self-supervised training: Neighbor2Neighbor ---------------------------------------------------

# ordered pairs of adjacent pixels in a 2x2 cell; pixel k of a cell is channel k of pixel_unshuffle(x, 2)
NEIGHBOUR_PAIRS = ((0, 1), (1, 0), (0, 2), (2, 0), (1, 3), (3, 1), (2, 3), (3, 2))


def neighbour_subsample(images, choice):
    """Two half-resolution images made of different, adjacent pixels of each 2x2 cell of `images`
    (N, 1, H, W): Neighbor2Neighbor's random neighbour sub-sampler. choice (N, 1, H/2, W/2) holds an
    index into NEIGHBOUR_PAIRS per cell."""
    import torch
    import torch.nn.functional as F
    height, width = images.shape[-2] // 2 * 2, images.shape[-1] // 2 * 2
    cells = F.pixel_unshuffle(images[..., :height, :width], 2)  # (N, 4, H/2, W/2)
    pairs = torch.tensor(NEIGHBOUR_PAIRS, device=images.device)
    return cells.gather(1, pairs[choice, 0]), cells.gather(1, pairs[choice, 1])


def neighbor2neighbor_loss(model, noisy, noise_sigma, generator, gamma=1.0, cell_weight=None):
    """Self-supervised loss of Huang et al., "Neighbor2Neighbor: Self-Supervised Denoising from Single
    Noisy Images" (CVPR 2021): denoise one sub-image and match the other, whose noise is independent,
    plus their regulariser against the full-resolution output. The input never holds a target pixel.
    cell_weight (N, 1, H/2, W/2), if given, weights each 2x2 cell (0 leaves a cell out of the loss)."""
    import torch
    n, _, height, width = noisy.shape
    choice = torch.randint(len(NEIGHBOUR_PAIRS), (n, 1, height // 2, width // 2), generator=generator)
    choice = choice.to(noisy.device)
    first, second = neighbour_subsample(noisy, choice)
    denoised_first = model(first, noise_sigma)
    with torch.no_grad():
        full_first, full_second = neighbour_subsample(model(noisy, noise_sigma), choice)
    errors = (denoised_first - second) ** 2 + gamma * (denoised_first - second - (full_first - full_second)) ** 2
    if cell_weight is None:
        return torch.mean(errors)
    return torch.sum(errors * cell_weight) / torch.clamp(torch.sum(cell_weight), min=1)


def model_in_batches(model, images, noise_sigma, batch_size=16):
    """The network's output for (n, 1, H, W) images, at most batch_size at a time (slices_per_batch) to bound
    memory."""
    import torch
    n_per_batch = slices_per_batch(batch_size, images.shape[2:])
    with torch.inference_mode():
        return torch.cat([model(images[start:start + n_per_batch], noise_sigma)
                          for start in range(0, len(images), n_per_batch)])


def masked_pixel_errors(model, noisy_slices, noise_sigma, heldout):
    """Squared errors at the held-out pixels (a boolean (n, H, W) mask, no two of them neighbours) of the
    full-resolution output,
    computed from an input in which those pixels are replaced by the mean of their four neighbours, so
    the network never sees the value it is scored against (Batson & Royer, "Noise2Self", ICML 2019).
    The mean of these errors is the true denoising error plus sigma^2, on pixels the adaptation never
    used as targets: it compares two networks at full resolution without a clean image."""
    import torch
    import torch.nn.functional as F
    images = torch.from_numpy(np.asarray(noisy_slices, dtype=np.float32)[:, None])
    mask = torch.from_numpy(heldout[:, None])
    kernel = torch.tensor([[0, 0.25, 0], [0.25, 0, 0.25], [0, 0.25, 0]]).reshape(1, 1, 3, 3)
    neighbours = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="reflect"), kernel)  # never the pixel itself
    denoised = model_in_batches(model, torch.where(mask, neighbours, images), noise_sigma)
    return ((denoised - images) ** 2)[mask].numpy()


def recorrupted_pixel_errors(model, noisy_slices, noise_sigma, heldout, n_draws=4, seed=0):
    """Squared errors at the held-out pixels (boolean (n, H, W)) of the network's output for recorrupted
    inputs against recorrupted targets (see recorrupt), averaged over n_draws draws. For Gaussian noise of
    that sigma their mean is the network's true error at the input's noise level plus a constant: unlike
    masked_pixel_errors it scores the network on whole images, as it is used."""
    import torch
    images = torch.from_numpy(np.asarray(noisy_slices, dtype=np.float32)[:, None])
    mask = torch.from_numpy(heldout[:, None])
    generator = torch.Generator().manual_seed(seed)
    errors = torch.zeros(int(mask.sum()))
    for _ in range(n_draws):
        draws = torch.randn(images.shape, generator=generator)
        inputs, targets, input_sigma = recorrupt(images, float(noise_sigma), draws)
        errors += ((model_in_batches(model, inputs, input_sigma) - targets) ** 2)[mask] / n_draws
    return errors.numpy()


ADAPTATION_LOSSES = ("recorrupted", "neighbor2neighbor")
CLEAR_GAIN = 2.0  # standard errors


def keeps_adaptation(masked_z, recorrupted_z, magnitude=False):
    """Whether an adapted network is kept, from its gains over the trained one on held-out pixels, in standard
    errors. recorrupted_pixel_errors scores whole images as they are used, so it must show a clear gain, but
    assumes Gaussian noise of the given sigma. masked_pixel_errors assumes only noise independent from pixel to
    pixel, but scores the network on inputs whose held-out pixels are replaced by their neighbours' mean, far
    from how it is used where neighbouring pixels differ much, and there misses real gains (README,
    "Adaptation"): for Gaussian noise it only vetoes, when it shows a clear loss. A magnitude image's noise is
    Rician, far from Gaussian where the signal is low, which can fool the recorrupted check: there both checks
    must show a clear gain."""
    if magnitude:
        return recorrupted_z > CLEAR_GAIN and masked_z > CLEAR_GAIN
    return recorrupted_z > CLEAR_GAIN and masked_z > -CLEAR_GAIN


def adapt_to_slices(model, noisy_slices, noise_sigma, n_steps, max_seconds, learning_rate=1e-4,
                    batch_size=8, patch_size=64, heldout_fraction=0.1, seed=0, loss="recorrupted", magnitude=False):
    """Fine-tune a copy of `model` on a scan's own noisy slices (n, H, W), [0, 1] scale, for n_steps or
    max_seconds, with a self-supervised loss: "recorrupted" (Recorrupted-to-Recorrupted at full
    resolution, needs the noise sigma) or "neighbor2neighbor" (half-resolution sub-images). A random
    tenth of the pixels is held out of the loss (for neighbor2neighbor, the 2x2 cells holding them).
    The adapted copy is meant for the object only (object_region of the original's output, see
    denoise_adapted): a background is mostly noise, which the trained network had learnt to flatten and an
    adaptation to noisy data flattens less. So the held-out pixels lie in the object, where two estimates of
    the copy's error decide whether it is kept (keeps_adaptation; magnitude: the slices are of a magnitude
    image, with Rician noise). Returns (the model to use, a dict describing what happened, with the object's
    threshold)."""
    import copy
    import time

    import torch
    import torch.nn.functional as F
    if loss not in ADAPTATION_LOSSES:
        raise InputError(f"adaptation loss {loss!r}; expected one of {', '.join(ADAPTATION_LOSSES)}")
    if not 0 < heldout_fraction < 0.5:  # held-out pixels sit on one colour of a checkerboard
        raise InputError(f"held-out fraction {heldout_fraction}; expected above 0 and below 0.5")
    called = time.perf_counter()
    noisy_slices = np.asarray(noisy_slices, dtype=np.float32)
    n_slices, height, width = noisy_slices.shape
    rng = np.random.default_rng(seed)
    trained_output = denoise_slices(model, noisy_slices, noise_sigma)
    threshold = object_threshold(trained_output)
    region = object_region(trained_output, threshold)
    # held-out pixels sit on one colour of a checkerboard: no two are neighbours, so the input that
    # masked_pixel_errors builds holds no held-out value at all
    rows, columns = np.indices((height, width))
    heldout = (rng.random(noisy_slices.shape) < 2 * heldout_fraction) & ((rows + columns) % 2 == 0) & region
    # neighbor2neighbor: a 2x2 cell takes part in the loss only if none of its pixels is held out
    cells_used = ~F.pixel_unshuffle(torch.from_numpy(heldout[:, None, :height // 2 * 2, :width // 2 * 2]), 2)
    cells_used = cells_used.all(dim=1).numpy()  # (n, H/2, W/2)
    errors_before = masked_pixel_errors(model, noisy_slices, noise_sigma, heldout)
    r2r_before = recorrupted_pixel_errors(model, noisy_slices, noise_sigma, heldout, seed=seed + 1)
    adapted = copy.deepcopy(model).train()
    optimiser = torch.optim.Adam(adapted.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    sigma = torch.full((batch_size,), float(noise_sigma))
    cells_h, cells_w = min(patch_size, height) // 2, min(patch_size, width) // 2
    started, steps = time.perf_counter(), 0
    while steps < n_steps and time.perf_counter() - started < max_seconds:
        picks = rng.integers(n_slices, size=batch_size)
        tops = rng.integers(0, height // 2 - cells_h + 1, size=batch_size)
        lefts = rng.integers(0, width // 2 - cells_w + 1, size=batch_size)
        batch = torch.from_numpy(np.stack([noisy_slices[p, 2 * t:2 * (t + cells_h), 2 * l:2 * (l + cells_w)]
                                           for p, t, l in zip(picks, tops, lefts)])[:, None])
        if loss == "recorrupted":
            used = torch.from_numpy(~np.stack([heldout[p, 2 * t:2 * (t + cells_h), 2 * l:2 * (l + cells_w)]
                                               for p, t, l in zip(picks, tops, lefts)])[:, None])
            draws = torch.randn(batch.shape, generator=generator)
            inputs, targets, input_sigma = recorrupt(batch, sigma.reshape(-1, 1, 1, 1), draws)
            errors = (adapted(inputs, input_sigma.flatten()) - targets) ** 2
            value = torch.sum(errors * used) / torch.clamp(torch.sum(used), min=1)
        else:
            weight = np.stack([cells_used[p, t:t + cells_h, l:l + cells_w] for p, t, l in zip(picks, tops, lefts)])
            value = neighbor2neighbor_loss(adapted, batch, sigma, generator,
                                           cell_weight=torch.from_numpy(weight[:, None].astype(np.float32)))
        optimiser.zero_grad(set_to_none=True)
        value.backward()
        optimiser.step()
        steps += 1
    train_seconds = time.perf_counter() - started
    adapted.eval()
    masked_gain = errors_before - masked_pixel_errors(adapted, noisy_slices, noise_sigma, heldout)
    recorrupted_gain = r2r_before - recorrupted_pixel_errors(adapted, noisy_slices, noise_sigma, heldout,
                                                             seed=seed + 1)  # not the training's draws
    masked_z, recorrupted_z = (float(g.mean() / max(g.std() / np.sqrt(g.size), 1e-12)) if g.size else 0.0
                               for g in (masked_gain, recorrupted_gain))  # gains in standard errors
    kept = keeps_adaptation(masked_z, recorrupted_z, magnitude)
    info = {"loss": loss, "steps": steps, "seconds": train_seconds,
            "check_seconds": time.perf_counter() - called - train_seconds,
            "object_threshold": threshold, "object_fraction": float(region.mean()),
            "heldout_pixels": int(masked_gain.size),
            "heldout_error_before": mean_or_zero(errors_before), "heldout_gain": mean_or_zero(masked_gain),
            "recorrupted_error_before": mean_or_zero(r2r_before), "recorrupted_gain": mean_or_zero(recorrupted_gain),
            "heldout_gain_z": masked_z, "recorrupted_gain_z": recorrupted_z, "kept": kept,
            "candidate": adapted}  # the adapted copy, kept or not: benchmark_adaptation_guard.py scores both
    return (adapted if kept else model), info


def mean_or_zero(values):
    """The mean, or 0 for no values (an image without an object has no held-out pixels): never NaN in a JSON."""
    return float(values.mean()) if values.size else 0.0


def denoise_adapted(trained, adapted, noisy_slices, noise_sigma, threshold, batch_size=16, self_ensemble=False,
                    bfloat16=False):
    """(n, H, W) slices denoised by the adapted network inside the object (object_region of the trained
    network's output, with adapt_to_slices's threshold) and by the trained network outside it; self_ensemble
    and bfloat16 run both as in denoise_slices (the guard compared them without either)."""
    denoised = denoise_slices(trained, noisy_slices, noise_sigma, batch_size, self_ensemble=self_ensemble,
                              bfloat16=bfloat16)
    if adapted is trained:
        return denoised
    inside = object_region(denoised, threshold)
    return np.where(inside, denoise_slices(adapted, noisy_slices, noise_sigma, batch_size,
                                           self_ensemble=self_ensemble, bfloat16=bfloat16), denoised)


def denoise_with_adaptation(model, noisy_slices, noise_sigma, n_steps, max_seconds, batch_size=16,
                            self_ensemble=False, bfloat16=False, **adapt_options):
    """adapt_to_slices on (n, H, W) slices, then denoise_adapted: (the denoised slices, what the adaptation did:
    kept, steps, its checks' gains in standard errors, the object's share of the pixels)."""
    adapted, info = adapt_to_slices(model, noisy_slices, noise_sigma, n_steps, max_seconds, **adapt_options)
    denoised = denoise_adapted(model, adapted, noisy_slices, noise_sigma, info["object_threshold"], batch_size,
                               self_ensemble, bfloat16)
    return denoised, {key: info[key] for key in ("kept", "steps", "heldout_gain_z", "recorrupted_gain_z",
                                                 "object_fraction")}


def mean_psnr_in_mask(clean_slices, estimates, masks):
    return float(np.mean([image_metrics(c, e, m)["psnr_mask"] for c, e, m in zip(clean_slices, estimates, masks)]))


MIN_BM3D_SIDE = 8  # pixels: the bm3d package refuses slices narrower than its 8x8 blocks, and crashes the process
                   # (a segmentation fault) on exactly 8x8; 8x9 and 9x8 work


def check_bm3d_fits(shape, what):
    """The benchmarks' refusal of slices BM3D cannot take, before any work."""
    if min(shape) < MIN_BM3D_SIDE or tuple(shape) == (MIN_BM3D_SIDE, MIN_BM3D_SIDE):
        raise InputError(f"{what}: slices of {shape[0]}x{shape[1]} pixels; BM3D needs at least {MIN_BM3D_SIDE} a side "
                         f"and more than {MIN_BM3D_SIDE}x{MIN_BM3D_SIDE}")


def bm3d_slices(noisy_slices, sigma):
    """BM3D (the bm3d package) of each (H, W) slice, given the noise sigma."""
    import bm3d
    check_bm3d_fits(noisy_slices.shape[1:], "BM3D")
    return np.stack([bm3d.bm3d(s, sigma_psd=sigma) for s in noisy_slices]).astype(np.float32)


def write_into_readme(markdown, marker, readme="README.md"):
    """Replace the text between <!-- marker:start --> and <!-- marker:end --> in README.md, so the
    tables there are the ones the benchmark scripts measured."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = open(readme).read() if os.path.exists(readme) else ""
    if start not in text or end not in text:
        print(f"{readme} has no {start} ... {end} markers; table not written there")
        return
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(f"{before}{start}\n{markdown}\n{end}{after}")
    atomic_write(readme, write)
