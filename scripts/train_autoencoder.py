"""Train a denoiser on data/mri_denoising.npz; save it to trained_models/, its loss curve to plots/
and example denoisings to denoising_examples/.

Single process:  python scripts/train_autoencoder.py --n_epochs=100
Several:         torchrun --nproc_per_node=2 scripts/train_autoencoder.py   (see README.md)"""
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from common import (InputError, add_noise, apply_overrides, atomic_write, check_file_exists, denoise_slices,
                    package_versions, pick_device, plot_denoising_grid, run_main, save_figure)
from models import CHECKPOINT_FORMAT, build_model, count_parameters, uses_noise_map

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
noise_model = ""               # "gaussian" or "rician"; "" = the dataset's
noise_sigma_range = []         # train over sigmas drawn from [low, high] (a blind model); [] = the dataset's sigma
patch_size = 0                 # train on random square patches of this size; 0 = whole slices
augment = False                # random flips, and 90-degree rotations when patches are square
val_every = 1                  # epochs between validation passes
checkpoint_every = 10          # epochs between resumable checkpoints (and always on Ctrl-C)
resume = ""                    # a .resume.pt file to continue from
output_tag = ""                # added to the output names, e.g. "_blind"
models_dir = "trained_models"
plots_dir = "plots"
examples_dir = "denoising_examples"
# ---


def check_settings(n_train, n_val, world_size):
    problems = []
    if n_epochs < 1:
        problems.append(f"n_epochs={n_epochs}; expected 1 or more")
    if batch_size < 1:
        problems.append(f"batch_size={batch_size}; expected 1 or more")
    elif batch_size % world_size:
        problems.append(f"batch_size={batch_size} cannot be shared equally by {world_size} processes")
    if learning_rate <= 0:
        problems.append(f"learning_rate={learning_rate}; expected above 0")
    if lr_schedule not in ("constant", "cosine"):
        problems.append(f"lr_schedule={lr_schedule!r}; expected 'constant' or 'cosine'")
    if noise_sigma_range and (len(noise_sigma_range) != 2 or not 0 <= noise_sigma_range[0] <= noise_sigma_range[1]):
        problems.append(f"noise_sigma_range={noise_sigma_range}; expected low,high with 0 <= low <= high")
    if patch_size < 0:
        problems.append(f"patch_size={patch_size}; expected 0 (whole slices) or a size in pixels")
    if val_every < 1 or checkpoint_every < 1:
        problems.append(f"val_every={val_every}, checkpoint_every={checkpoint_every}; expected 1 or more")
    if n_val == 0:
        problems.append(f"{dataset_path} has no validation images")
    if n_train < batch_size:
        problems.append(f"{dataset_path} has {n_train} training images, fewer than batch_size={batch_size}")
    if problems:
        raise InputError("; ".join(problems))


def load_dataset(path):
    """The .npz arrays a run needs and the settings that made them."""
    import json
    check_file_exists(path, "dataset (run scripts/make_dataset.py first)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in ("clean", "noisy", "mask", "split", "slice_index", "scan_index")}
            dataset_settings = json.loads(str(archive["settings_json"]))
    except (KeyError, ValueError, OSError) as error:
        raise InputError(f"{path} is not a dataset made by make_dataset.py ({error})") from None
    return arrays, dataset_settings


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
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
        dist.init_process_group("gloo")
    return dist.get_rank(), world_size, device


def sample_rng(epoch, index):
    """The random stream of one training image in one epoch: the same in every process and after a resume."""
    return np.random.default_rng([seed, epoch, index])


def make_training_pair(clean, fixed_noisy, epoch, index, train_sigma, train_noise_model):
    """(noisy input, clean target, sigma) for one image: a random patch, flips/rotations, fresh noise."""
    rng = sample_rng(epoch, index)
    if patch_size:
        height, width = clean.shape
        size_h, size_w = min(patch_size, height), min(patch_size, width)
        top, left = rng.integers(0, height - size_h + 1), rng.integers(0, width - size_w + 1)
        clean = clean[top:top + size_h, left:left + size_w]
        fixed_noisy = fixed_noisy[top:top + size_h, left:left + size_w]
    sigma = rng.uniform(*noise_sigma_range) if noise_sigma_range else train_sigma
    if fresh_noise:
        draws = rng.standard_normal((2, *clean.shape), dtype=np.float32)
        noisy = add_noise(clean, sigma, train_noise_model, draws)
    else:
        noisy = fixed_noisy
    if augment:
        if rng.random() < 0.5:
            clean, noisy = clean[::-1], noisy[::-1]
        if rng.random() < 0.5:
            clean, noisy = clean[:, ::-1], noisy[:, ::-1]
        n_turns = rng.integers(4) if clean.shape[0] == clean.shape[1] else 2 * rng.integers(2)
        clean, noisy = np.rot90(clean, n_turns), np.rot90(noisy, n_turns)
    return np.ascontiguousarray(noisy, dtype=np.float32), np.ascontiguousarray(clean, dtype=np.float32), sigma


def make_batch(indices, epoch, train, train_sigma, train_noise_model, device):
    pairs = [make_training_pair(train["clean"][i], train["noisy"][i], epoch, i, train_sigma, train_noise_model)
             for i in indices.tolist()]
    noisy = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None]).to(device)
    clean = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None]).to(device)
    sigma = torch.tensor([p[2] for p in pairs], dtype=torch.float32, device=device)
    return noisy.contiguous(memory_format=torch.channels_last), clean, sigma


def learning_rate_at(epoch):
    if lr_schedule == "cosine":
        return learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / n_epochs))
    return learning_rate


def train_one_epoch(model, optimiser, loader, epoch, train, train_sigma, train_noise_model, device, world_size):
    """One pass over the training images; returns the mean training MSE over all processes."""
    model.train()
    for group in optimiser.param_groups:
        group["lr"] = learning_rate_at(epoch)
    loader.sampler.set_epoch(epoch)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for (indices,) in loader:
        noisy, clean, sigma = make_batch(indices, epoch, train, train_sigma, train_noise_model, device)
        loss = torch.mean((model(noisy, sigma) - clean) ** 2)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loss_sum += torch.tensor([loss.item() * len(indices), len(indices)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(loss_sum)
    return float(loss_sum[0] / loss_sum[1])


def validation_mse(model, val, train_sigma):
    denoised = denoise_slices(model, val["noisy"], train_sigma)
    return float(np.mean((denoised - val["clean"]) ** 2))


def run_name(n_train):
    return f"autoencoder_{arch}{output_tag}_{n_epochs}epochs_{n_train}images"


def training_state(model, optimiser, epoch, history):
    return {"state_dict": model.state_dict(), "optimiser": optimiser.state_dict(), "epoch": epoch,
            "history": history, "format_version": CHECKPOINT_FORMAT,
            "settings": {"arch": arch, "arch_args": arch_args, "seed": seed, "batch_size": batch_size}}


def save_torch(data, path):
    return atomic_write(path, lambda tmp: torch.save(data, tmp))


def load_resume_state(path, model, optimiser):
    check_file_exists(path, "resume checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format_version") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {state.get('format_version')}, this code reads {CHECKPOINT_FORMAT}")
        saved = state["settings"]
        if (saved["arch"], saved["arch_args"]) != (arch, arch_args):
            raise ValueError(f"it was made by arch={saved['arch']} {saved['arch_args']}, not arch={arch} {arch_args}")
        model.load_state_dict(state["state_dict"])
        optimiser.load_state_dict(state["optimiser"])
    except Exception as error:
        raise InputError(f"{path} cannot be resumed: {str(error).splitlines()[0]}") from None
    return state["epoch"], state["history"]


def plot_loss_curves(history, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, scale in zip(axes, ("linear", "log")):
        axis.plot(history["epoch"], history["train_mse"], label="train MSE")
        axis.plot(history["val_epoch"], history["val_mse"], label="validation MSE (val slice positions)")
        axis.set_xscale(scale)
        axis.set_yscale(scale)
        axis.set_xlabel("epoch")
        axis.set_ylabel("MSE")
        axis.set_title("linear" if scale == "linear" else "log-log")
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def main():
    settings = apply_overrides(globals())
    rank, world_size, device = setup_distributed()
    arrays, dataset_settings = load_dataset(dataset_path)
    train = {k: arrays[k][arrays["split"] == "train"] for k in ("clean", "noisy")}
    val = {k: arrays[k][arrays["split"] == "val"] for k in ("clean", "noisy", "mask")}
    check_settings(len(train["clean"]), len(val["clean"]), world_size)
    train_sigma = float(dataset_settings["noise_sigma"])
    train_noise_model = noise_model or dataset_settings["noise_model"]
    if train_noise_model not in ("gaussian", "rician"):
        raise InputError(f"noise_model={train_noise_model!r}; expected 'gaussian' or 'rician'")

    torch.manual_seed(seed)
    model = build_model(arch, arch_args).to(device).to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    start_epoch, history = 0, {"epoch": [], "train_mse": [], "val_epoch": [], "val_mse": []}
    if resume:
        start_epoch, history = load_resume_state(resume, model, optimiser)
    network = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model

    # every process sees the same shuffled order and takes its share of each batch of batch_size
    sampler = DistributedSampler(TensorDataset(torch.arange(len(train["clean"]))), num_replicas=world_size,
                                 rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(TensorDataset(torch.arange(len(train["clean"]))), batch_size=batch_size // world_size,
                        sampler=sampler, drop_last=True)
    name = run_name(len(train["clean"]))
    resume_path = os.path.join(models_dir, name + ".resume.pt")
    if rank == 0:
        print(f"{arch} ({count_parameters(model):,} parameters) on {device} x{world_size}, "
              f"{len(train['clean'])} training and {len(val['clean'])} validation images, "
              f"{train_noise_model} noise sigma "
              + (f"{noise_sigma_range[0]}-{noise_sigma_range[1]}" if noise_sigma_range else f"{train_sigma}"))

    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))  # finish the epoch, save, then stop
    started = time.perf_counter()
    progress = tqdm(range(start_epoch, n_epochs), desc=name, disable=rank != 0, initial=start_epoch, total=n_epochs)
    for epoch in progress:
        train_mse = train_one_epoch(network, optimiser, loader, epoch, train, train_sigma, train_noise_model,
                                    device, world_size)
        history["epoch"].append(epoch + 1)
        history["train_mse"].append(train_mse)
        if rank == 0 and ((epoch + 1) % val_every == 0 or epoch + 1 == n_epochs):
            history["val_epoch"].append(epoch + 1)
            history["val_mse"].append(validation_mse(model.eval(), val, train_sigma))
            progress.set_postfix(train_mse=f"{train_mse:.2e}", val_mse=f"{history['val_mse'][-1]:.2e}")
        last = epoch + 1 == n_epochs
        if rank == 0 and ((epoch + 1) % checkpoint_every == 0 or interrupted or last):
            save_torch(training_state(model, optimiser, epoch + 1, history), resume_path)
        if interrupted and not last:
            if rank == 0:
                print(f"\ninterrupted after epoch {epoch + 1}; continue with --resume={resume_path}")
            sys.exit(130)
    seconds = time.perf_counter() - started
    if rank != 0:
        dist.destroy_process_group()
        return

    metadata = {
        "format_version": CHECKPOINT_FORMAT, "arch": arch, "arch_args": arch_args,
        "n_parameters": count_parameters(model), "noise_map": uses_noise_map(model),
        "noise_model": train_noise_model, "noise_sigma": train_sigma,
        "noise_sigma_range": list(noise_sigma_range) or [train_sigma, train_sigma],
        "normalisation": {"method": "percentile", "low_percentile": dataset_settings["low_percentile"],
                          "high_percentile": dataset_settings["high_percentile"]},
        "dataset": dataset_path, "dataset_settings": dataset_settings,
        "split": {"train": sorted(set(arrays["slice_index"][arrays["split"] == "train"].tolist())),
                  "val": sorted(set(arrays["slice_index"][arrays["split"] == "val"].tolist())),
                  "test": sorted(set(arrays["slice_index"][arrays["split"] == "test"].tolist()))},
        "n_epochs": n_epochs, "n_train_images": len(train["clean"]), "training_settings": settings,
        "history": history, "world_size": world_size, "train_seconds_this_run": seconds,
        "versions": package_versions(),
    }
    model_path = save_torch({"state_dict": model.state_dict(), "metadata": metadata},
                            os.path.join(models_dir, name + ".pt"))
    title = f"{arch}{output_tag}, {n_epochs} epochs, {len(train['clean'])} images"
    plot_path = save_figure(plot_loss_curves(history, title), os.path.join(plots_dir, f"MSE_vs_Epochs_{name}.png"))
    examples = np.linspace(0, len(val["clean"]) - 1, 5).astype(int)
    denoised = denoise_slices(model.eval(), val["noisy"][examples], train_sigma)
    figure = plot_denoising_grid(val["noisy"][examples], denoised, val["clean"][examples], val["mask"][examples],
                                 f"{title}: validation slices")
    grid_path = save_figure(figure, os.path.join(examples_dir, f"denoising_5x3_{name}.png"))
    print(f"trained in {seconds:.0f} s; final validation MSE {history['val_mse'][-1]:.3e}")
    print(f"model written to {model_path}\nloss plot written to {plot_path}\nexamples written to {grid_path}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
