"""Reliable training: resuming gives the run an uninterrupted one would have given, Ctrl-C saves a
resumable state, bad resume files and bad settings stop with one clear line, and the same seed and
settings give the same dataset bytes and the same loss history."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import make_dataset
import train_autoencoder
from common import InputError, load_checkpoint
from conftest import SCRIPTS, run_in_process, run_script

TRAIN_IMAGES = 12  # 4 training slice positions x 3 time points


def train_args(folder, dataset, n_epochs, *overrides):
    return [f"--dataset_path={dataset}", f"--n_epochs={n_epochs}", "--batch_size=4", "--patch_size=16",
            "--augment", f"--models_dir={folder}", f"--plots_dir={folder}", f"--examples_dir={folder}", *overrides]


def run_name(n_epochs):
    return f"autoencoder_seed_{n_epochs}epochs_{TRAIN_IMAGES}images"


def trained(folder, n_epochs):
    """(state_dict, history) of a finished run."""
    checkpoint = torch.load(folder / f"{run_name(n_epochs)}.pt", weights_only=True)
    return checkpoint["state_dict"], checkpoint["metadata"]["history"]


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    run_in_process(train_autoencoder, *train_args(folder, tiny_dataset, 4))
    return folder


def test_resuming_after_2_of_4_epochs_gives_the_uninterrupted_run(tiny_dataset, uninterrupted, tmp_path):
    run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 2))
    state = tmp_path / f"{run_name(2)}.resume.pt"
    run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 4, f"--resume={state}"))
    weights, history = trained(tmp_path, 4)
    expected_weights, expected_history = trained(uninterrupted, 4)
    assert_same_weights(weights, expected_weights)
    assert history == expected_history
    assert history["epoch"] == [1, 2, 3, 4]


def test_resuming_on_another_dataset_or_precision_warns_and_an_explicit_default_does_not(tiny_dataset, tmp_path,
                                                                                          capsys):
    """The same scan and slices with Rician noise: as many images, so only the settings tell them apart."""
    scan = tiny_dataset.parent / "tiny.nii.gz"
    rician = tmp_path / "rician.npz"
    run_in_process(make_dataset, f"--input_paths={scan}", f"--output={rician}", "--slice_range=1,7",
                   "--target_n_images=1", "--noise_model=rician")
    run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 2))
    state = tmp_path / f"{run_name(2)}.resume.pt"
    capsys.readouterr()
    run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 3, f"--resume={state}",
                                                  "--noise_model=gaussian"))
    assert "warning: resuming" not in capsys.readouterr().err  # the noise it was trained with, named
    run_in_process(train_autoencoder, *train_args(tmp_path, rician, 3, f"--resume={state}", "--precision=bfloat16",
                                                  "--overwrite"))  # the 3-epoch model of the run above
    warning = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: resuming"))
    assert "train_noise_model=rician (was gaussian)" in warning and "precision=bfloat16 (was float32)" in warning
    assert "dataset_settings.noise_model=rician (was gaussian)" in warning


def test_same_seed_gives_the_same_dataset_bytes_and_loss_history(tiny_dataset, uninterrupted, tmp_path):
    # a fresh interpreter for the second run: nothing may depend on the process (hash seeds, import order)
    scan = tiny_dataset.parent / "tiny.nii.gz"
    dataset = tmp_path / "again.npz"
    make_args = [f"--input_paths={scan}", f"--output={dataset}", "--slice_range=1,7", "--target_n_images=1"]
    run_in_process(make_dataset, *make_args)
    first_bytes = dataset.read_bytes()
    run_script("make_dataset", *make_args)
    assert dataset.read_bytes() == first_bytes
    run_script("train_autoencoder", *train_args(tmp_path, dataset, 4))
    weights, history = trained(tmp_path, 4)
    expected_weights, expected_history = trained(uninterrupted, 4)
    assert history["train_mse"] == expected_history["train_mse"]
    assert history["val_mse"] == expected_history["val_mse"]
    assert_same_weights(weights, expected_weights)


def test_ctrl_c_saves_a_resumable_state_and_says_how_to_resume(tiny_dataset, tmp_path):
    args = train_args(tmp_path, tiny_dataset, 100000, "--checkpoint_every=1", "--val_every=1000")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "train_autoencoder.py"), *args],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / f"{run_name(100000)}.resume.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first checkpoint: training is under way and the handler is in place
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"--resume={state}" in stderr
    assert "Traceback" not in stderr
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # written atomically
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] >= 1 and saved["history"]["epoch"] == list(range(1, saved["epoch"] + 1))
    # the state it saved continues
    run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, saved["epoch"] + 1, f"--resume={state}"))
    assert trained(tmp_path, saved["epoch"] + 1)[1]["epoch"] == list(range(1, saved["epoch"] + 2))


def resume_error(tmp_path, dataset, state_path, *overrides):
    with pytest.raises(InputError) as error:
        run_in_process(train_autoencoder, *train_args(tmp_path, dataset, 4, f"--resume={state_path}", *overrides))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_resume_files_give_one_clear_line(tiny_dataset, uninterrupted, tmp_path):
    good = uninterrupted / f"{run_name(4)}.resume.pt"
    truncated = tmp_path / "truncated.resume.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    assert "truncated" in resume_error(tmp_path, tiny_dataset, truncated)
    text = tmp_path / "notes.resume.pt"
    text.write_text("not a checkpoint\n")
    assert "not a readable PyTorch file" in resume_error(tmp_path, tiny_dataset, text)
    assert "a trained model, not a resume state" in resume_error(tmp_path, tiny_dataset, uninterrupted / f"{run_name(4)}.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert "not a resume state" in resume_error(tmp_path, tiny_dataset, foreign)
    assert "arch=seed" in resume_error(tmp_path, tiny_dataset, good, "--arch=dncnn")
    assert "no such resume checkpoint" in resume_error(tmp_path, tiny_dataset, tmp_path / "missing.resume.pt")


def test_a_checkpoint_format_mismatch_is_named(tiny_dataset, uninterrupted, tmp_path):
    state = torch.load(uninterrupted / f"{run_name(4)}.resume.pt", weights_only=True)
    state["format_version"] = 0
    torch.save(state, tmp_path / "old.resume.pt")
    message = resume_error(tmp_path, tiny_dataset, tmp_path / "old.resume.pt")
    assert "format 0" in message and f"format {train_autoencoder.CHECKPOINT_FORMAT}" in message
    checkpoint = torch.load(uninterrupted / f"{run_name(4)}.pt", weights_only=True)
    checkpoint["metadata"]["format_version"] = 0
    torch.save(checkpoint, tmp_path / "old.pt")
    with pytest.raises(InputError, match="checkpoint format 0; this code reads format"):
        load_checkpoint(tmp_path / "old.pt")


def test_every_torch_load_is_weights_only():
    for name in os.listdir(SCRIPTS):
        if name.endswith(".py"):
            with open(os.path.join(SCRIPTS, name)) as f:
                for line in f:
                    assert "torch.load(" not in line or "weights_only=True" in line, f"{name}: {line.strip()}"


def fail(*args, **kwargs):
    raise AssertionError("work started before the settings were checked")


@pytest.mark.parametrize("script, args, expected", [
    ("train", ["--n_epochs=-1"], "n_epochs=-1"),
    ("train", ["--batch_size=0"], "batch_size=0"),
    ("train", ["--noise_sigma_range=-0.1,0.1"], "noise_sigma_range=[-0.1, 0.1]"),
    ("train", ["--arch=nonsense"], "arch='nonsense'"),
    ("train", ["--batch_size=16"], f"{TRAIN_IMAGES} training images, fewer than batch_size=16"),
    ("train", ["--noise_sigma_range=0.01,25"], "the [0, 1] scale"),
    ("train", ["--seed=-1"], "seed=-1; expected a whole number from 0"),
    ("train", ["--seed=99999999999999999999999"], "seed=99999999999999999999999"),
    ("train", ["--output_tag=../escape"], "holds a path separator"),
    ("make", ["--seed=-1"], "seed=-1; expected a whole number from 0"),
    ("make", ["--noise_sigma=-0.01"], "noise_sigma=-0.01"),
    ("make", ["--noise_sigma=25"], "not the scan's units"),  # a sigma in scanner units
    ("make", ["--pairing=time", "--n_timepoints=1"], "n_timepoints=1 keeps one"),  # not "the file has one volume"
    ("make", ["--val_fraction=0.5", "--test_fraction=0.5"], "val_fraction=0.5"),
    ("make", ["--slice_range=1,3"], "2 slice positions cannot be split into non-empty train, val and test"),
])
def test_bad_settings_stop_before_any_work_and_name_the_setting(tiny_dataset, tmp_path, monkeypatch, script, args,
                                                                  expected):
    if script == "train":
        if "batch_size=16" not in args[0]:  # settings that need no data are checked before it is read
            monkeypatch.setattr(train_autoencoder, "load_dataset", fail)
        monkeypatch.setattr(train_autoencoder, "train_one_epoch", fail)
        module, args = train_autoencoder, train_args(tmp_path, tiny_dataset, 4, *args)
    else:
        monkeypatch.setattr(make_dataset, "load_nifti", fail)
        scan = tiny_dataset.parent / "tiny.nii.gz"
        module, args = make_dataset, [f"--input_paths={scan}", f"--output={tmp_path / 'x.npz'}", *args]
    with pytest.raises(InputError) as error:
        run_in_process(module, *args)
    assert expected in str(error.value)
    assert not os.listdir(tmp_path)  # nothing written


def test_a_run_does_not_replace_the_resume_state_of_an_earlier_one_it_does_not_continue(tiny_dataset, tmp_path):
    """A Ctrl-C'd run leaves NAME.resume.pt and no NAME.pt: the same command again, --resume forgotten, would start
    from scratch and overwrite the saved progress at its first checkpoint."""
    run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 2))
    (tmp_path / f"{run_name(2)}.pt").unlink()  # as after a Ctrl-C
    state = tmp_path / f"{run_name(2)}.resume.pt"
    saved = state.read_bytes()
    with pytest.raises(InputError) as error:
        run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 2))
    message = str(error.value)
    assert f"{state} holds the state of an unfinished run" in message and f"--resume={state}" in message
    with pytest.raises(InputError, match="unfinished run"):  # --overwrite replaces models, not unfinished runs
        run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 2, "--overwrite"))
    assert state.read_bytes() == saved
    run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 2, f"--resume={state}"))  # continues it
    run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 2, "--overwrite"))  # finished: replaced


def test_resuming_on_a_dataset_split_otherwise_is_refused(tiny_dataset, uninterrupted, tmp_path):
    """Another seed splits the same scan at other positions, into as many training images: the resumed network
    would have trained on test positions of the dataset its checkpoint names, and the evaluation could not tell."""
    scan = tiny_dataset.parent / "tiny.nii.gz"
    other = tmp_path / "other_split.npz"
    run_in_process(make_dataset, f"--input_paths={scan}", f"--output={other}", "--slice_range=1,7",
                   "--target_n_images=1", "--seed=3")
    with np.load(other) as a, np.load(tiny_dataset) as b:
        assert (a["split"] == "train").sum() == (b["split"] == "train").sum()
        assert set(a["slice_index"][a["split"] == "train"]) != set(b["slice_index"][b["split"] == "train"])
    message = resume_error(tmp_path, other, uninterrupted / f"{run_name(4)}.resume.pt")
    assert "trained on other slice positions" in message


def test_a_run_stopped_while_writing_its_outputs_writes_no_model_and_resumes_to_all_of_them(tiny_dataset, tmp_path,
                                                                                             monkeypatch):
    """The model is written last: a model beside a missing figure would make the same command refuse to run again."""
    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(train_autoencoder, "save_figure", stop)
        with pytest.raises(KeyboardInterrupt):
            run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 2))
    assert not (tmp_path / f"{run_name(2)}.pt").exists()
    state = tmp_path / f"{run_name(2)}.resume.pt"
    run_in_process(train_autoencoder, *train_args(tmp_path, tiny_dataset, 2, f"--resume={state}"))
    assert trained(tmp_path, 2)[1]["epoch"] == [1, 2]
    assert (tmp_path / f"MSE_vs_Epochs_{run_name(2)}.png").exists()
    assert (tmp_path / f"denoising_5x3_{run_name(2)}.png").exists()


def test_the_command_to_resume_uses_the_launcher_of_the_run(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scripts/train_autoencoder.py", "--n_epochs=9", "--resume=old.resume.pt"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_autoencoder.command_to_resume("a.resume.pt") == \
        "python scripts/train_autoencoder.py --n_epochs=9 --resume=a.resume.pt"
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    assert train_autoencoder.command_to_resume("a.resume.pt").startswith(
        "torchrun --standalone --nproc_per_node=2 scripts/train_autoencoder.py --n_epochs=9 ")
