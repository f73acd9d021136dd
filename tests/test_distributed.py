"""torchrun on CPU (gloo): two processes train as one process does, only rank 0 writes, and a rank
that dies ends the whole run instead of leaving the others waiting."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_autoencoder
from conftest import SCRIPTS, run_in_process

NAME = "autoencoder_seed_1epochs_12images"


def train_args(folder, dataset, *overrides):
    return [f"--dataset_path={dataset}", "--n_epochs=1", "--batch_size=4", "--patch_size=16", "--augment",
            f"--models_dir={folder}", f"--plots_dir={folder}", f"--examples_dir={folder}", *overrides]


def torchrun(*args, **popen_args):
    """torchrun with two CPU processes on this machine; it sets each worker's threads itself."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(SCRIPTS, "train_autoencoder.py"), *map(str, args)]
    return subprocess.Popen(command, env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen_args)


def test_two_processes_train_as_one(tiny_dataset, tmp_path):
    process = torchrun(*train_args(tmp_path / "two", tiny_dataset))
    run_in_process(train_autoencoder, *train_args(tmp_path / "one", tiny_dataset))  # meanwhile, the reference
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    two = torch.load(tmp_path / "two" / f"{NAME}.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / f"{NAME}.pt", weights_only=True)
    assert two["metadata"]["world_size"] == 2
    for name, weights in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], weights, rtol=1e-5, atol=1e-6)
    for key in ("train_mse", "val_mse"):
        assert two["metadata"]["history"][key] == pytest.approx(one["metadata"]["history"][key], rel=1e-5)
    # only rank 0 writes and reports
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert stdout.count("model written to") == 1


def worker_pids(launcher_pid):
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        variables = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(variables[b"RANK"])


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
def test_a_dead_rank_ends_the_run(tiny_dataset, tmp_path):
    process = torchrun(*train_args(tmp_path, tiny_dataset, "--n_epochs=100000", "--checkpoint_every=1",
                                   "--val_every=1000"))
    state = tmp_path / "autoencoder_seed_100000epochs_12images.resume.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    rank_1 = next(pid for pid in worker_pids(process.pid) if rank_of(pid) == 1)
    os.kill(rank_1, signal.SIGKILL)  # rank 0 is left waiting for its gradients
    started = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.monotonic() - started < 60
    assert "train_autoencoder.py FAILED" in stderr or "Signal 9" in stderr or "SIGKILL" in stderr, stderr
