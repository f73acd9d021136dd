"""Train a denoiser on data/mri_denoising.npz; save it to trained_models/, its loss curve to plots/
and example denoisings to denoising_examples/.

Single process:  python scripts/train_autoencoder.py --n_epochs=100
Several:         torchrun --standalone --nproc_per_node=2 scripts/train_autoencoder.py   (see README.md)
Ctrl-C saves a state to continue from: --resume=trained_models/NAME.resume.pt"""
import copy
import math
import os
import shlex
import signal
import sys
import time
import warnings

import numpy as np
import torch
from scipy import ndimage
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from common import (MAX_NOISE_SIGMA, InputError, add_noise, apply_overrides, atomic_write, check_file_exists,
                    check_output_path, check_seed, denoise_at_own_sizes, denoise_slices, keep_freed_memory,
                    load_dataset, native_bfloat16, neighbor2neighbor_loss, package_versions, pick_device,
                    plot_denoising_grid, recorrupt, run_main, save_figure, scan_identities, unpadded, usable_cores)
from models import ARCHITECTURES, CHECKPOINT_FORMAT, build_model, count_parameters, uses_noise_map

# --- settings: edit here, or override on the command line: --n_epochs=100 --arch=unet
dataset_path = "data/mri_denoising.npz"
arch = "seed"                  # a name from models.ARCHITECTURES
arch_args = {}                 # keyword arguments of that network, e.g. --arch_args='{"width": 32}'
n_epochs = 10                  # one epoch = one pass over the training images
batch_size = 32                # the effective batch, shared out over torchrun processes
learning_rate = 1e-3
lr_schedule = "constant"       # "constant" or "cosine" (decays to 0 at the last epoch)
seed = 0
fresh_noise = True             # draw new noise every epoch; False reuses the fixed noise in the .npz
noise_model = ""               # "gaussian" or "rician": must be the dataset's noise, on which validation runs;
                               # "" = the dataset's
noise_sigma_range = []         # train over sigmas drawn from [low, high] (a blind model); [] = the dataset's sigma
training_target = "clean"     # "clean" (supervised); "time_partner": the same slice at a neighbouring time
                               # point with its own noise (Noise2Noise, make_dataset --pairing=time);
                               # "neighbor2neighbor": the noisy image itself, self-supervised (no clean image);
                               # "recorrupted": Recorrupted-to-Recorrupted, self-supervised, Gaussian noise of
                               # known sigma: a noisier copy of the noisy image learns to match another
patch_size = 0                 # train on random square patches of this size; 0 = whole slices
augment = False                # random flips, and 90-degree rotations when patches are square
zoom_range = []                # resample each clean image by a random factor in [low, high] first, so the
                               # network meets other voxel sizes (supervised training with fresh noise only)
gamma_range = []               # raise each clean image to a random power in [low, high]: other contrasts
synthetic_fraction = 0.0       # share of training images replaced by a fresh dead-leaves image (dead_leaves_image):
                               # flat regions, sharp edges and every scale, which one training scan lacks
synthetic_dark_fraction = 0.0  # share of the dead-leaves discs at zero signal, like air or bone in a scan
loss_weighting = "none"        # "none": plain MSE; "inverse_variance": each image's MSE divided by its noise
                               # sigma^2, so low noise levels count as much in the loss as they do in PSNR
precision = "float32"          # "bfloat16": the forward pass in bfloat16 (weights, gradients and loss stay float32):
                               # faster on a CPU with native bfloat16 (AVX512-BF16, AMX; DnCNN steps 2.4x in an
                               # ad hoc timing), slower elsewhere
val_every = 1                  # epochs between validation passes
checkpoint_every = 10          # epochs between resumable checkpoints (and always on Ctrl-C)
resume = ""                    # a .resume.pt file to continue from
overwrite = False              # replace an existing checkpoint of the same name (the shipped ones among them)
output_tag = ""                # added to the output names, e.g. "_blind"
models_dir = "trained_models"
plots_dir = "plots"
examples_dir = "denoising_examples"
# ---

MIN_PATCH_SIZE = 8  # pixels: Neighbor2Neighbor halves a patch, and the networks' 3x3 kernels need a few pixels


def check_settings(world_size):
    """The settings that need no data, checked before anything is read."""
    check_seed(seed)
    problems = []
    if "/" in output_tag or os.sep in output_tag:
        problems.append(f"output_tag={output_tag!r} holds a path separator; it is added to file names (give folders "
                        "with models_dir, plots_dir and examples_dir)")
    if arch not in ARCHITECTURES:
        problems.append(f"arch={arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    else:
        try:  # built and run once on a small slice: bad sizes fail in many ways, some only in the forward pass
            with warnings.catch_warnings():  # torch warns before it fails on a layer of 0 channels
                warnings.simplefilter("ignore")
                model = build_model(arch, arch_args)
            model(torch.zeros(1, 1, MIN_PATCH_SIZE, MIN_PATCH_SIZE), torch.zeros(1))
            if not any(True for _ in model.parameters()):
                raise ValueError("a network without weights")
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            problems.append(f"arch_args={arch_args} do not fit arch={arch} ({reason})")
    if noise_model not in ("", "gaussian", "rician"):
        problems.append(f"noise_model={noise_model!r}; expected '', 'gaussian' or 'rician'")
    if n_epochs < 1:
        problems.append(f"n_epochs={n_epochs}; expected 1 or more")
    if batch_size < 1:
        problems.append(f"batch_size={batch_size}; expected 1 or more")
    elif batch_size % world_size:
        problems.append(f"batch_size={batch_size} cannot be shared equally by {world_size} processes")
    if not 0 < learning_rate < math.inf:
        problems.append(f"learning_rate={learning_rate}; expected above 0")
    if precision not in ("float32", "bfloat16"):
        problems.append(f"precision={precision!r}; expected one of float32, bfloat16")
    if lr_schedule not in ("constant", "cosine"):
        problems.append(f"lr_schedule={lr_schedule!r}; expected 'constant' or 'cosine'")
    if noise_sigma_range and (len(noise_sigma_range) != 2
                              or not 0 <= noise_sigma_range[0] <= noise_sigma_range[1] < MAX_NOISE_SIGMA):
        problems.append(f"noise_sigma_range={noise_sigma_range}; expected low,high with 0 <= low <= high < "
                        f"{MAX_NOISE_SIGMA} (the [0, 1] scale of the scans' 1st-99th percentile range)")
    if training_target not in ("clean", "time_partner", "neighbor2neighbor", "recorrupted"):
        problems.append(f"training_target={training_target!r}; expected 'clean', 'time_partner', "
                        "'neighbor2neighbor' or 'recorrupted'")
    if training_target == "recorrupted" and noise_model == "rician":
        problems.append("training_target=recorrupted needs Gaussian noise (its pairs are independent only then)")
    if patch_size < 0 or 0 < patch_size < MIN_PATCH_SIZE:
        problems.append(f"patch_size={patch_size}; expected 0 (whole slices) or {MIN_PATCH_SIZE} pixels or more")
    for name, value in (("zoom_range", zoom_range), ("gamma_range", gamma_range)):
        if value and (len(value) != 2 or not 0 < value[0] <= value[1]):
            problems.append(f"{name}={value}; expected low,high with 0 < low <= high")
        elif value and not (training_target == "clean" and fresh_noise):
            problems.append(f"{name} changes the clean image, so it needs training_target=clean and fresh_noise")
        elif name == "zoom_range" and value and not patch_size:
            problems.append("zoom_range changes the image size, so it needs patch_size (equal-sized patches)")
    if not 0 <= synthetic_fraction <= 1:
        problems.append(f"synthetic_fraction={synthetic_fraction}; expected 0 to 1")
    elif synthetic_fraction and not (training_target == "clean" and fresh_noise):
        problems.append("synthetic_fraction makes clean images, so it needs training_target=clean and fresh_noise")
    if not 0 <= synthetic_dark_fraction <= 1:
        problems.append(f"synthetic_dark_fraction={synthetic_dark_fraction}; expected 0 to 1")
    if noise_sigma_range and not fresh_noise:
        problems.append("noise_sigma_range needs fresh_noise: the fixed noise in the dataset has one sigma")
    if loss_weighting not in ("none", "inverse_variance"):
        problems.append(f"loss_weighting={loss_weighting!r}; expected 'none' or 'inverse_variance'")
    elif loss_weighting == "inverse_variance" and training_target == "neighbor2neighbor":
        problems.append("loss_weighting=inverse_variance needs a target image (training_target clean or time_partner)")
    if val_every < 1 or checkpoint_every < 1:
        problems.append(f"val_every={val_every}, checkpoint_every={checkpoint_every}; expected 1 or more")
    if problems:
        raise InputError("; ".join(problems))


def check_dataset_fits(n_train, val):
    """The settings that depend on the dataset, checked before training starts."""
    problems = []
    if len(val["rows"]) == 0:
        problems.append(f"{dataset_path} has no validation images" + (
            " with a time partner, which a real series is scored against" if val["against_partner"] else ""))
    if n_train < batch_size:
        problems.append(f"{dataset_path} has {n_train} training images, fewer than batch_size={batch_size}")
    if problems:
        raise InputError("; ".join(problems))


def training_rows(arrays):
    """Rows of the training images; for Noise2Noise only those with a time partner."""
    is_train = arrays["split"] == "train"
    if training_target != "time_partner":
        return np.flatnonzero(is_train)
    if arrays["partner_index"] is None or not np.any(arrays["partner_index"][is_train] >= 0):
        raise InputError(f"training_target=time_partner needs time pairs: make {dataset_path} with "
                         "make_dataset.py --pairing=time from a 4D scan")
    return np.flatnonzero(is_train & (arrays["partner_index"] >= 0))


def training_positions(arrays, rows, dataset_settings):
    """Sorted [scan (common.scan_identities), slice position] of the training images: a resumed run must train on
    the same ones, or the evaluation's check for test positions seen in training would miss those of the first
    dataset."""
    names = scan_identities(dataset_settings)[0]
    pairs = {(names[scan] if scan < len(names) else str(scan), int(position))
             for scan, position in zip(arrays["scan_index"][rows].tolist(), arrays["slice_index"][rows].tolist())}
    return [list(pair) for pair in sorted(pairs)]


def setup_distributed():
    """(rank, world_size, device) for a torchrun launch, or (0, 1, best device) for a plain one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, pick_device()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        # share out the cores this process may use
        torch.set_num_threads(max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
        dist.init_process_group("gloo")
    return dist.get_rank(), world_size, device


def leave_process_group():
    """All processes leave together, after rank 0 has written the outputs: a process that tore down its gloo
    connections while rank 0 was still at work aborted once in a test run ("terminate called without an active
    exception", a known race in gloo's teardown)."""
    dist.barrier()
    dist.destroy_process_group()


def sample_rng(epoch, index):
    """The random stream of one training image in one epoch: the same in every process and after a resume."""
    return np.random.default_rng([seed, epoch, index])


def dead_leaves_image(shape, rng, n_discs=300, min_radius=1.5, dark_fraction=0.0):
    """A synthetic clean image (H, W) in [0, 1]: the dead-leaves model (Lee, Mumford & Huang 2001; as
    training data for denoisers, Achddou et al. 2021). Opaque discs of random grey level lie one over
    another (the first drawn on top); radii have density proportional to r^-3 between min_radius and half
    the image, so that every scale is present as in natural images; a random Gaussian blur (0.5-1.5 pixels)
    stands for the scanner's point spread. What no disc covers takes one more grey level."""
    height, width = shape
    uniform = rng.random(n_discs)
    max_radius = max(height, width) / 2
    radii = (min_radius ** -2 - uniform * (min_radius ** -2 - max_radius ** -2)) ** -0.5  # inverse of the r^-3 CDF
    centre_rows, centre_columns = rng.uniform(0, height, n_discs), rng.uniform(0, width, n_discs)
    greys = rng.random(n_discs + 1)
    if dark_fraction:
        greys[rng.random(n_discs + 1) < dark_fraction] = 0
    image = np.full(shape, greys[-1])
    rows, columns = np.ogrid[:height, :width]
    for radius, row, column, grey in zip(radii[::-1], centre_rows[::-1], centre_columns[::-1], greys[-2::-1]):
        top, left = max(0, int(row - radius)), max(0, int(column - radius))  # the disc's bounding box
        bottom, right = min(height, int(row + radius) + 2), min(width, int(column + radius) + 2)
        disc = (rows[top:bottom] - row) ** 2 + (columns[:, left:right] - column) ** 2 <= radius ** 2
        image[top:bottom, left:right][disc] = grey  # painted last to first: the first disc ends on top
    return ndimage.gaussian_filter(image, rng.uniform(0.5, 1.5)).astype(np.float32)


def make_training_pair(images, epoch, index, train_sigma, train_noise_model):
    """(noisy input, target, sigma) for one image from images = [clean, fixed noisy] (plus [partner clean,
    partner fixed noisy] for Noise2Noise): a random patch, flips/rotations, fresh noise. The target is the
    clean image, or the partner with its own noise, or (neighbor2neighbor) the noisy input itself."""
    rng = sample_rng(epoch, index)
    if synthetic_fraction and rng.random() < synthetic_fraction:
        height, width = images[0].shape
        shape = (min(patch_size, height), min(patch_size, width)) if patch_size else (height, width)
        images = [dead_leaves_image(shape, rng, dark_fraction=synthetic_dark_fraction)]
    if zoom_range:  # only the clean image: its noisy copies are made below
        factor = max(rng.uniform(*zoom_range), patch_size / min(images[0].shape))  # still holds a whole patch
        images = [np.clip(ndimage.zoom(images[0], factor, order=3, mode="mirror"), 0, None)]
    if gamma_range:
        images = [np.maximum(images[0], 0) ** rng.uniform(*gamma_range)]
    if patch_size:
        height, width = images[0].shape
        size_h, size_w = min(patch_size, height), min(patch_size, width)
        top, left = rng.integers(0, height - size_h + 1), rng.integers(0, width - size_w + 1)
        images = [image[top:top + size_h, left:left + size_w] for image in images]
    sigma = rng.uniform(*noise_sigma_range) if noise_sigma_range else train_sigma
    if fresh_noise:  # on a real series without synthetic noise (sigma 0) this leaves the images as they are
        noisy_images = [add_noise(clean, sigma, train_noise_model, rng.standard_normal((2, *clean.shape), dtype=np.float32))
                        for clean in images[0::2]]
    else:
        noisy_images = images[1::2]
    noisy = noisy_images[0]
    target = {"clean": images[0], "time_partner": noisy_images[-1], "neighbor2neighbor": noisy,
              "recorrupted": None}[training_target]
    if training_target == "recorrupted":  # the clean image is not used: only the noisy one and its sigma
        noisy, target, sigma = recorrupt(noisy, sigma, rng.standard_normal(noisy.shape, dtype=np.float32))
    if augment:
        if rng.random() < 0.5:
            target, noisy = target[::-1], noisy[::-1]
        if rng.random() < 0.5:
            target, noisy = target[:, ::-1], noisy[:, ::-1]
        n_turns = rng.integers(4) if noisy.shape[0] == noisy.shape[1] else 2 * rng.integers(2)
        target, noisy = np.rot90(target, n_turns), np.rot90(noisy, n_turns)
    return np.ascontiguousarray(noisy, dtype=np.float32), np.ascontiguousarray(target, dtype=np.float32), sigma


def make_batch(indices, epoch, train, train_sigma, train_noise_model, device):
    """The training pairs of the training images `indices` (0 .. n_train - 1), read from the dataset's rows."""
    rows = train["rows"][indices.numpy()]
    pairs = []
    for i, row in zip(indices.tolist(), rows.tolist()):
        images = [np.asarray(train["clean"][row]), np.asarray(train["noisy"][row])]
        if training_target == "time_partner":
            partner = train["partner_index"][row]
            images += [np.asarray(train["clean"][partner]), np.asarray(train["noisy"][partner])]
        pairs.append(make_training_pair(images, epoch, i, train_sigma, train_noise_model))
    noisy = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None]).to(device)
    target = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None]).to(device)
    # images without added noise hold their own, and the network is told its level as at use
    sigma = torch.tensor([p[2] or train["own_noise_sigma"] for p in pairs], dtype=torch.float32, device=device)
    return noisy.contiguous(memory_format=torch.channels_last), target, sigma


def training_loss(model, noisy, target, sigma, epoch, first_index):
    """Mean squared error against the target, or the self-supervised Neighbor2Neighbor loss."""
    if training_target != "neighbor2neighbor":
        errors = torch.mean((model(noisy, sigma) - target) ** 2, dim=(1, 2, 3))
        if loss_weighting == "inverse_variance":  # scaled so the loss stays an MSE at the batch's mean sigma
            weights = 1 / torch.clamp(sigma, min=1e-3) ** 2
            return torch.sum(errors * weights) / torch.sum(weights)
        return torch.mean(errors)
    generator = torch.Generator().manual_seed(int(sample_rng(epoch, first_index).integers(2 ** 62)))
    return neighbor2neighbor_loss(model, noisy, sigma, generator)


def learning_rate_at(epoch):
    if lr_schedule == "cosine":
        return learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / n_epochs))
    return learning_rate


def stop_requested_everywhere(stop_requested, world_size, device):
    """Whether any process has been asked to stop (Ctrl-C, SIGTERM). They must all stop before the same
    batch: a process that went on would wait for the others' gradients forever."""
    if world_size == 1:
        return bool(stop_requested)
    flag = torch.tensor([float(bool(stop_requested))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_one_epoch(model, optimiser, loader, epoch, train, train_sigma, train_noise_model, device, world_size,
                    stop_requested):
    """One pass over the training images; returns the mean training MSE over all processes, or None
    if a stop was requested before the epoch was done."""
    model.train()
    for group in optimiser.param_groups:
        group["lr"] = learning_rate_at(epoch)
    loader.sampler.set_epoch(epoch)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for (indices,) in loader:
        if stop_requested_everywhere(stop_requested, world_size, device):
            return None
        noisy, target, sigma = make_batch(indices, epoch, train, train_sigma, train_noise_model, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            loss = training_loss(model, noisy, target, sigma, epoch, int(indices[0]))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loss_sum += torch.tensor([loss.item() * len(indices), len(indices)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(loss_sum)
    return float(loss_sum[0] / loss_sum[1])


def validation_set(arrays, dataset_sigma):
    """The validation images and what each is scored against: its clean image; or, in a real series without
    added noise (whose "clean" image is the noisy one) trained with time pairs, the same slice at a
    neighbouring time point: its noise is independent, so the MSE is the error against the truth plus that
    noise's variance, and it still falls as denoising improves (Noise2Noise's argument)."""
    rows = np.flatnonzero(arrays["split"] == "val")
    against_partner = dataset_sigma == 0 and training_target == "time_partner" and arrays["partner_index"] is not None
    if against_partner:
        rows = rows[arrays["partner_index"][rows] >= 0]
    return {"rows": rows, "noisy": arrays["noisy"], "image_shape": arrays["image_shape"],
            "reference": arrays["noisy"] if against_partner else arrays["clean"],
            "reference_rows": arrays["partner_index"][rows] if against_partner else rows,
            "against_partner": against_partner,
            "label": "validation MSE against the time partner (its noise included)" if against_partner
            else "validation MSE (val slice positions)"}


def validation_mse(model, val, noise_sigma, chunk_size=256):
    """Mean squared error of the denoised validation images against their reference (validation_set) over
    their own pixels (not the zero padding that stacks scans of other sizes, which holds no noise and would
    count as perfectly denoised), chunk_size images in memory at a time."""
    squared_error, n_pixels = 0.0, 0
    for start in range(0, len(val["rows"]), chunk_size):
        rows = val["rows"][start:start + chunk_size]
        clean = np.asarray(val["reference"][val["reference_rows"][start:start + chunk_size]])
        shapes = val["image_shape"][rows]
        squared = (denoise_at_own_sizes(model, np.asarray(val["noisy"][rows]), shapes, noise_sigma) - clean) ** 2
        inside = unpadded(shapes, clean.shape[1:])
        squared_error += float(np.sum(squared if inside.all() else squared[inside], dtype=np.float64))
        n_pixels += int(inside.sum())
    return squared_error / n_pixels


def run_name(n_train):
    return f"autoencoder_{arch}{output_tag}_{n_epochs}epochs_{n_train}images"


def resume_settings(run_data):
    """The settings that shape the rest of a run: a resumed run should share them with the one it continues.
    run_data: what the run trains on (n_train_images, train_noise_model, dataset_settings)."""
    return {"arch": arch, "arch_args": arch_args, "seed": seed, "batch_size": batch_size,
            "learning_rate": learning_rate, "lr_schedule": lr_schedule, "fresh_noise": fresh_noise,
            "noise_sigma_range": list(noise_sigma_range), "patch_size": patch_size, "augment": augment,
            "training_target": training_target, "zoom_range": list(zoom_range), "gamma_range": list(gamma_range),
            "loss_weighting": loss_weighting, "synthetic_fraction": synthetic_fraction,
            "synthetic_dark_fraction": synthetic_dark_fraction, "precision": precision,
            **run_data}


def settings_changes(saved, current):
    """'name=value (was old)' for each setting in both that changed; a dict of settings (the dataset's) key by key.
    Settings an older state did not save are not compared."""
    changes = []
    for name, value in current.items():
        if name not in saved or saved[name] == value:
            continue
        if isinstance(value, dict) and isinstance(saved[name], dict):
            changes += [f"{name}.{key}={value.get(key)} (was {saved[name].get(key)})"
                        for key in sorted(set(value) | set(saved[name])) if value.get(key) != saved[name].get(key)]
        else:
            changes.append(f"{name}={value} (was {saved[name]})")
    return changes


def training_state(model, optimiser, epoch, history, run_data):
    """A copy of everything needed to continue the run after `epoch` epochs: later steps do not change it."""
    return copy.deepcopy({"state_dict": model.state_dict(), "optimiser": optimiser.state_dict(), "epoch": epoch,
                          "history": history, "format_version": CHECKPOINT_FORMAT,
                          "settings": resume_settings(run_data)})


def save_torch(data, path):
    return atomic_write(path, lambda tmp: torch.save(data, tmp))


def load_resume_state(path, model, optimiser, run_data):
    """Restore the model and optimiser from a .resume.pt file. Returns (epochs done, loss history,
    the settings that differ from the run that saved it)."""
    check_file_exists(path, "resume checkpoint")
    cannot = f"{path} cannot be resumed"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise InputError(f"{cannot}: it is not a readable PyTorch file, or it is truncated ({type(error).__name__})") from None
    if not isinstance(state, dict) or not {"state_dict", "optimiser", "epoch", "history", "settings"} <= state.keys():
        kind = ("a trained model, not a resume state (those end in .resume.pt)"
                if isinstance(state, dict) and "metadata" in state else "not a resume state of train_autoencoder.py")
        raise InputError(f"{cannot}: it is {kind}")
    if state.get("format_version") != CHECKPOINT_FORMAT:
        raise InputError(f"{cannot}: it has checkpoint format {state.get('format_version')}, this code reads format "
                         f"{CHECKPOINT_FORMAT}; continue it with the version of the code that wrote it")
    saved = state["settings"]
    if (saved["arch"], saved["arch_args"]) != (arch, arch_args):
        raise InputError(f"{cannot}: it was made by arch={saved['arch']} arch_args={saved['arch_args']}, "
                         f"not arch={arch} arch_args={arch_args}")
    n_train = run_data["n_train_images"]
    if saved.get("n_train_images", n_train) != n_train:
        raise InputError(f"{cannot}: it was trained on {saved['n_train_images']} images, {dataset_path} has "
                         f"{n_train}; resume with the dataset it was trained on")
    if saved.get("train_positions", run_data["train_positions"]) != run_data["train_positions"]:
        raise InputError(f"{cannot}: it was trained on other slice positions than the training split of {dataset_path} "
                         "(a dataset of other scans, or split with another seed or slice range), so the test positions "
                         "of either could have been trained on; resume with the dataset it was trained on")
    if state["epoch"] > n_epochs:
        raise InputError(f"{cannot}: it has done {state['epoch']} epochs, more than n_epochs={n_epochs}")
    try:
        model.load_state_dict(state["state_dict"])
        optimiser.load_state_dict(state["optimiser"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise InputError(f"{cannot}: {str(error).splitlines()[0]}") from None
    return state["epoch"], state["history"], settings_changes(saved, resume_settings(run_data))


def plot_loss_curves(history, title, val_label):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, scale in zip(axes, ("linear", "log")):
        axis.plot(history["epoch"], history["train_mse"], label="train MSE")
        axis.plot(history["val_epoch"], history["val_mse"], label=val_label)
        axis.set_xscale(scale)
        axis.set_yscale(scale)
        axis.set_xlabel("epoch")
        axis.set_ylabel("MSE")
        axis.set_title("linear" if scale == "linear" else "log-log")
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def command_to_resume(resume_path):
    """This run's command line with --resume=resume_path in place of any --resume it had."""
    args = sys.argv[1:]
    kept = [a for i, a in enumerate(args) if not a.startswith("--resume") and not (i and args[i - 1] == "--resume")]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's own options are not seen here: the usual ones
    launcher = ["torchrun", "--standalone", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
    return shlex.join([*launcher, sys.argv[0], *kept, f"--resume={resume_path}"])


def stop_and_say_how_to_resume(state, resume_path, rank):
    """Save the state of the last completed epoch, tell how to continue from it and exit with status 130."""
    if rank == 0:
        save_torch(state, resume_path)
        print(f"\nstopped during epoch {state['epoch'] + 1}; the state after epoch {state['epoch']} is saved in "
              f"{resume_path}\ncontinue with the same command (python or torchrun) and --resume:\n"
              f"  {command_to_resume(resume_path)}", file=sys.stderr)
    sys.exit(130)


def main():
    settings = apply_overrides(globals())
    check_settings(int(os.environ.get("WORLD_SIZE", "1")))
    rank, world_size, device = setup_distributed()
    keep_freed_memory()
    arrays, dataset_settings = load_dataset(dataset_path)
    train = {"rows": training_rows(arrays), "clean": arrays["clean"], "noisy": arrays["noisy"],
             "partner_index": arrays["partner_index"],
             "own_noise_sigma": float(dataset_settings.get("own_noise_sigma", 0.0))}  # a real series' own noise
    val = validation_set(arrays, float(dataset_settings["noise_sigma"]))
    n_train = len(train["rows"])
    check_dataset_fits(n_train, val)
    if patch_size > min(arrays["clean"].shape[1:]) and rank == 0:
        height, width = arrays["clean"].shape[1:]
        print(f"note: patch_size={patch_size} is larger than the {height}x{width} slices of {dataset_path}: each "
              f"patch is cut to at most {min(patch_size, height)}x{min(patch_size, width)}")
    train_sigma = float(dataset_settings["noise_sigma"])  # the noise added to the clean images
    if train_sigma == 0 and training_target == "clean" and not noise_sigma_range:
        raise InputError(f"{dataset_path} has no added noise (make_dataset.py --noise_sigma=0): its clean images are "
                         "the noisy ones, so training_target=clean would learn to change nothing; use "
                         "training_target=time_partner (a dataset made with --pairing=time) or neighbor2neighbor")
    told_sigma = train_sigma or train["own_noise_sigma"]  # the noise level the network is told without a range
    train_noise_model = noise_model or dataset_settings["noise_model"]
    if train_noise_model not in ("gaussian", "rician"):
        raise InputError(f"noise_model={train_noise_model!r}; expected 'gaussian' or 'rician'")
    if train_noise_model != dataset_settings["noise_model"]:  # validation runs on the dataset's own noisy images
        raise InputError(f"noise_model={noise_model} but {dataset_path} holds {dataset_settings['noise_model']} noise, "
                         f"on which validation would run; make a dataset with make_dataset.py --noise_model={noise_model}")
    if training_target == "recorrupted" and train_noise_model != "gaussian":
        raise InputError(f"training_target=recorrupted needs Gaussian noise; {dataset_path} has {train_noise_model} noise")
    if training_target == "recorrupted" and not (train_sigma > 0 or noise_sigma_range):
        raise InputError(f"training_target=recorrupted needs the noise sigma of the images, and {dataset_path} has "
                         "none (noise_sigma 0, a real series): use training_target=neighbor2neighbor, or "
                         "use_trained_autoencoder.py --adapt_steps, which estimates the sigma")

    if precision == "bfloat16" and not native_bfloat16(device) and rank == 0:
        print(f"warning: {device} has no native bfloat16 arithmetic; precision=bfloat16 will be slower than float32",
              file=sys.stderr)
    run_data = {"n_train_images": n_train, "train_noise_model": train_noise_model,  # compared on --resume
                "dataset_settings": {k: v for k, v in dataset_settings.items() if k != "versions"},
                "train_positions": training_positions(arrays, train["rows"], dataset_settings)}
    torch.manual_seed(seed)
    model = build_model(arch, arch_args).to(device).to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    start_epoch, history = 0, {"epoch": [], "train_mse": [], "val_epoch": [], "val_mse": []}
    if resume:
        start_epoch, history, changed = load_resume_state(resume, model, optimiser, run_data)
        if changed and rank == 0:
            print(f"warning: resuming {resume} with other settings than it was trained with: {', '.join(changed)}",
                  file=sys.stderr)
    network = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model

    # every process sees the same shuffled order and takes its share of each batch of batch_size
    sampler = DistributedSampler(TensorDataset(torch.arange(n_train)), num_replicas=world_size,
                                 rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(TensorDataset(torch.arange(n_train)), batch_size=batch_size // world_size,
                        sampler=sampler, drop_last=True)
    name = run_name(n_train)
    resume_path = os.path.join(models_dir, name + ".resume.pt")
    output_paths = {"model": os.path.join(models_dir, name + ".pt"), "resume": resume_path,
                    "plot": os.path.join(plots_dir, f"MSE_vs_Epochs_{name}.png"),
                    "examples": os.path.join(examples_dir, f"denoising_5x3_{name}.png")}
    for path in output_paths.values():  # before training, not at its end
        check_output_path(path)
    if os.path.exists(output_paths["model"]) and not overwrite:
        raise InputError(f"{output_paths['model']} exists (a shipped or earlier network); choose another --output_tag "
                         "or --models_dir, or pass --overwrite to replace it")
    # an unfinished run's state (no model beside it) is never replaced by a run that does not continue it, not even
    # with --overwrite, which the README's long commands pass to replace the shipped models
    unfinished = os.path.exists(resume_path) and not os.path.exists(output_paths["model"])
    if unfinished and not (resume and os.path.samefile(resume, resume_path)):
        raise InputError(f"{resume_path} holds the state of an unfinished run of this name, which this run would "
                         f"replace; continue it with --resume={resume_path}, or delete it to start again")
    if rank == 0:
        print(f"{arch} ({count_parameters(model):,} parameters) on {device} x{world_size}, "
              f"{n_train} training and {len(val['rows'])} validation images, "
              f"{train_noise_model} noise sigma "
              + (f"{noise_sigma_range[0]}-{noise_sigma_range[1]}" if noise_sigma_range else f"{train_sigma}")
              + (f" (no noise added: the network is told the images' own, sigma {told_sigma:.4f})"
                 if told_sigma != train_sigma and not noise_sigma_range else ""))

    # Ctrl-C or SIGTERM: stop before the next batch and save the state of the last completed epoch
    stop_requested = []
    previous_handlers = {number: signal.signal(number, lambda number, frame: stop_requested.append(number))
                         for number in (signal.SIGINT, signal.SIGTERM)}
    last_state = training_state(model, optimiser, start_epoch, history, run_data)
    stopped = False
    started = time.perf_counter()
    progress = tqdm(range(start_epoch, n_epochs), desc=name, disable=rank != 0, initial=start_epoch, total=n_epochs)
    try:
        for epoch in progress:
            train_mse = train_one_epoch(network, optimiser, loader, epoch, train, train_sigma, train_noise_model,
                                        device, world_size, stop_requested)
            if train_mse is None:
                stopped = True
                break
            if not math.isfinite(train_mse):  # nothing is saved: the last resumable state is from before
                saved = (f" (and delete {resume_path}, its state before diverging, to start again)"
                         if os.path.exists(resume_path) else "")
                raise InputError(f"training diverged: the training loss is {train_mse} in epoch {epoch + 1}; "
                                 f"try a smaller learning_rate than {learning_rate:g}{saved}")
            history["epoch"].append(epoch + 1)
            history["train_mse"].append(train_mse)
            if rank == 0 and ((epoch + 1) % val_every == 0 or epoch + 1 == n_epochs):
                history["val_epoch"].append(epoch + 1)
                history["val_mse"].append(validation_mse(model.eval(), val, told_sigma))
                progress.set_postfix(train_mse=f"{train_mse:.2e}", val_mse=f"{history['val_mse'][-1]:.2e}")
            last_state = training_state(model, optimiser, epoch + 1, history, run_data)
            if rank == 0 and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == n_epochs):
                save_torch(last_state, resume_path)
    finally:
        progress.close()
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
    if stopped:
        stop_and_say_how_to_resume(last_state, resume_path, rank)
    seconds = time.perf_counter() - started
    if rank != 0:
        leave_process_group()
        return

    metadata = {
        "format_version": CHECKPOINT_FORMAT, "arch": arch, "arch_args": arch_args,
        "n_parameters": count_parameters(model), "noise_map": uses_noise_map(model),
        "noise_model": train_noise_model, "noise_sigma": train_sigma, "training_target": training_target,
        "noise_sigma_range": list(noise_sigma_range) or [told_sigma, told_sigma],
        "normalisation": {"method": "percentile", "low_percentile": dataset_settings["low_percentile"],
                          "high_percentile": dataset_settings["high_percentile"]},
        "dataset": dataset_path, "dataset_settings": dataset_settings,
        "split": {"train": sorted(set(arrays["slice_index"][arrays["split"] == "train"].tolist())),
                  "val": sorted(set(arrays["slice_index"][arrays["split"] == "val"].tolist())),
                  "test": sorted(set(arrays["slice_index"][arrays["split"] == "test"].tolist()))},
        "split_scans": {name: sorted(set(arrays["scan_index"][arrays["split"] == name].tolist()))
                        for name in ("train", "val", "test")},
        "n_epochs": n_epochs, "n_train_images": n_train, "training_settings": settings,
        # augmentation turns square patches by quarter turns, other shapes only by half turns (make_pair)
        "all_orientations": bool(augment and (0 < patch_size <= min(arrays["clean"].shape[1:])
                                              or arrays["clean"].shape[1] == arrays["clean"].shape[2])),
        "history": history, "validation": val["label"], "world_size": world_size, "train_seconds_this_run": seconds,
        "versions": package_versions(),
    }
    title = f"{arch}{output_tag}, {n_epochs} epochs, {n_train} images"
    plot_path = save_figure(plot_loss_curves(history, title, val["label"]), output_paths["plot"])
    examples = val["rows"][np.linspace(0, len(val["rows"]) - 1, 5).astype(int)]
    noisy, clean, mask = (np.asarray(arrays[k][examples]) for k in ("noisy", "clean", "mask"))
    figure = plot_denoising_grid(noisy, denoise_slices(model.eval(), noisy, told_sigma), clean, mask,
                                 f"{title}: validation slices")
    grid_path = save_figure(figure, output_paths["examples"])
    # the model last: a run stopped before it has none, and --resume with its state of the last epoch writes all three
    model_path = save_torch({"state_dict": model.state_dict(), "metadata": metadata}, output_paths["model"])
    print(f"trained in {seconds:.0f} s; final validation MSE {history['val_mse'][-1]:.3e}")
    print(f"model written to {model_path}\nloss plot written to {plot_path}\nexamples written to {grid_path}")
    if world_size > 1:
        leave_process_group()


if __name__ == "__main__":
    run_main(main)
