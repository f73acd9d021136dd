"""train_autoencoder.py end to end: a few epochs on a tiny dataset, the checkpoint, and bad settings."""
import json

import numpy as np
import pytest
import torch

from common import denoise_slices
from conftest import assert_one_line_error, phantom_volume, run_script, write_nifti
from models import count_parameters, model_from_checkpoint

N_EPOCHS = 4


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    scan = write_nifti(folder / "tiny.nii.gz", phantom_volume((40, 36, 12, 3)))
    dataset = folder / "dataset.npz"
    run_script("make_dataset", f"--input_paths={scan}", f"--output={dataset}", "--target_n_images=600")
    return dataset


def train(folder, dataset, *overrides, check=True):
    return run_script("train_autoencoder", f"--dataset_path={dataset}", f"--models_dir={folder / 'models'}",
                      f"--plots_dir={folder / 'plots'}", f"--examples_dir={folder / 'examples'}", "--batch_size=4",
                      *overrides, check=check)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    result = train(folder, tiny_dataset, f"--n_epochs={N_EPOCHS}")
    with np.load(tiny_dataset) as archive:
        n_train = int((archive["split"] == "train").sum())
    return folder, result, f"autoencoder_seed_{N_EPOCHS}epochs_{n_train}images"


def test_a_few_epochs_lower_the_validation_mse(trained, tiny_dataset):
    folder, result, name = trained
    with np.load(tiny_dataset) as archive:
        val = archive["split"] == "val"
        noisy, clean = archive["noisy"][val], archive["clean"][val]
    history = torch.load(folder / "models" / f"{name}.pt", weights_only=True)["metadata"]["history"]
    assert history["val_epoch"] == list(range(1, N_EPOCHS + 1))
    assert history["val_mse"][-1] < history["val_mse"][0]
    assert history["val_mse"][-1] < np.mean((noisy - clean) ** 2)  # better than doing nothing
    assert "final validation MSE" in result.stdout


def test_outputs_are_named_after_the_run(trained):
    folder, _, name = trained
    assert (folder / "models" / f"{name}.pt").is_file()
    assert (folder / "plots" / f"MSE_vs_Epochs_{name}.png").is_file()
    assert (folder / "examples" / f"denoising_5x3_{name}.png").is_file()


def test_checkpoint_loads_safely_and_rebuilds_the_trained_network(trained, tiny_dataset):
    folder, _, name = trained
    checkpoint = torch.load(folder / "models" / f"{name}.pt", weights_only=True)
    metadata = checkpoint["metadata"]
    assert metadata["arch"] == "seed" and metadata["n_epochs"] == N_EPOCHS
    assert metadata["noise_model"] == "gaussian" and metadata["noise_sigma"] == 0.06
    assert metadata["normalisation"]["low_percentile"] == 1.0
    model = model_from_checkpoint(checkpoint).eval()
    assert count_parameters(model) == metadata["n_parameters"] == 9_569
    json.dumps(metadata)  # everything in it is plain data
    # the rebuilt network is the trained one: it reproduces the last validation MSE
    with np.load(tiny_dataset) as archive:
        val = archive["split"] == "val"
        noisy, clean = archive["noisy"][val], archive["clean"][val]
    val_mse = np.mean((denoise_slices(model, noisy, 0.06) - clean) ** 2)
    assert val_mse == pytest.approx(metadata["history"]["val_mse"][-1], rel=1e-4)




@pytest.mark.parametrize("override, fragment", [
    ("--n_epoch=3", "unknown setting --n_epoch"),
    ("--n_epochs=abc", "--n_epochs=abc"),
])
def test_bad_command_line_is_a_one_line_error(tmp_path, tiny_dataset, override, fragment):
    assert_one_line_error(train(tmp_path, tiny_dataset, override, check=False), fragment)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("override, fragment", [
    ("--n_epochs=-2", "n_epochs=-2"),
    ("--batch_size=0", "batch_size=0"),
    ("--batch_size=500", "fewer than batch_size=500"),
    ("--zoom_range=0.8,1.2", "needs patch_size"),
    ("--gamma_range=1.2,0.8", "gamma_range=[1.2, 0.8]"),
    ("--loss_weighting=log", "loss_weighting='log'"),
    ("--noise_sigma_range=0.02,0.1 --fresh_noise=false", "needs fresh_noise"),
    ("--synthetic_fraction=1.5", "synthetic_fraction=1.5"),
    ("--synthetic_dark_fraction=-0.1", "synthetic_dark_fraction=-0.1"),
    ("--learning_rate=nan", "learning_rate=nan"),
    ("--noise_model=rician", "holds gaussian noise, on which validation would run"),
    ("--synthetic_fraction=0.5 --training_target=recorrupted", "needs training_target=clean"),
    ("--precision=half", "precision='half'"),
    ("--arch=dncnn --arch_args={\"width\":0}", "arch_args={'width': 0} do not fit arch=dncnn"),
    ("--arch=dncnn --arch_args={\"depth\":0}", "(a network without weights)"),
    ("--arch=shufflenet --arch_args={\"factor\":0}", "arch_args={'factor': 0} do not fit arch=shufflenet"),
    ("--patch_size=1 --training_target=neighbor2neighbor", "patch_size=1; expected 0 (whole slices) or 8 pixels"),
])
def test_bad_settings_are_caught_before_training(tmp_path, tiny_dataset, override, fragment):
    result = train(tmp_path, tiny_dataset, *override.split(), check=False)
    assert_one_line_error(result, fragment)
    assert "parameters" not in result.stdout  # the training never started
    assert not (tmp_path / "models").exists()


def test_a_diverging_training_is_one_clear_error_and_saves_no_model(tmp_path, tiny_dataset):
    result = train(tmp_path, tiny_dataset, "--arch=dncnn", "--learning_rate=1e12", "--n_epochs=3", check=False)
    assert result.returncode == 1  # the progress bar came first on stderr, the error is its last line
    assert result.stderr.strip().splitlines()[-1].startswith("error: training diverged: the training loss is nan")
    assert not list((tmp_path / "models").glob("*.pt")) and not (tmp_path / "plots").exists()


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(tmp_path, tiny_dataset):
    """The untagged seed names on the bundled scan are shipped networks: once silently replaced."""
    train(tmp_path, tiny_dataset, "--n_epochs=1")
    (model,) = (tmp_path / "models").glob("*[0-9]images.pt")
    before = model.read_bytes()
    result = train(tmp_path, tiny_dataset, "--n_epochs=1", "--seed=1", check=False)
    assert_one_line_error(result, f"{model} exists", "--output_tag", "--overwrite")
    assert model.read_bytes() == before and "parameters" not in result.stdout
    train(tmp_path, tiny_dataset, "--n_epochs=1", "--seed=1", "--overwrite")
    assert model.read_bytes() != before


def test_an_output_folder_that_is_a_file_is_refused_before_training(tmp_path, tiny_dataset):
    (tmp_path / "models").write_text("a file")
    result = train(tmp_path, tiny_dataset, "--n_epochs=1", check=False)
    assert_one_line_error(result, "models is a file, not a folder")
    assert "parameters" not in result.stdout and (tmp_path / "models").read_text() == "a file"


def test_zoom_and_contrast_augmentation_train_on_equal_patches(tmp_path, tiny_dataset):
    """Zoom factors that would shrink a slice below the patch size are raised to fit the patch."""
    train(tmp_path, tiny_dataset, "--n_epochs=1", "--arch=dncnn", '--arch_args={"depth": 3, "width": 8}',
          "--patch_size=24", "--augment", "--zoom_range=0.1,1.6", "--gamma_range=0.6,1.6",
          "--noise_sigma_range=0.02,0.1", "--loss_weighting=inverse_variance")
    checkpoint = next((tmp_path / "models").glob("*[0-9]images.pt"))
    settings = torch.load(checkpoint, weights_only=True)["metadata"]["training_settings"]
    assert settings["zoom_range"] == [0.1, 1.6] and settings["loss_weighting"] == "inverse_variance"


def test_dark_discs_and_inverse_variance_weights_act_on_what_is_trained(monkeypatch):
    """The two settings the end-to-end run above only records: dark discs put zero-signal regions into the
    dead-leaves images, and inverse-variance weighting makes the low-noise image count more in the loss."""
    import train_autoencoder
    dark = [train_autoencoder.dead_leaves_image((64, 64), np.random.default_rng(i), dark_fraction=0.5)
            for i in range(4)]
    plain = [train_autoencoder.dead_leaves_image((64, 64), np.random.default_rng(i)) for i in range(4)]
    assert np.mean([np.mean(d < 0.02) for d in dark]) > 3 * np.mean([np.mean(p < 0.02) for p in plain]) + 0.05

    def constant_output(noisy, sigma):
        return torch.zeros_like(noisy)
    noisy = torch.zeros(2, 1, 8, 8)
    target = torch.stack([torch.full((1, 8, 8), 0.1), torch.full((1, 8, 8), 0.3)])  # errors 0.01 and 0.09
    sigma = torch.tensor([0.01, 0.1])
    plain_loss = train_autoencoder.training_loss(constant_output, noisy, target, sigma, 0, 0)
    monkeypatch.setattr(train_autoencoder, "loss_weighting", "inverse_variance")
    weighted_loss = train_autoencoder.training_loss(constant_output, noisy, target, sigma, 0, 0)
    assert float(plain_loss) == pytest.approx(0.05)
    assert float(weighted_loss) == pytest.approx((0.01 / 0.01 ** 2 + 0.09 / 0.1 ** 2) / (1 / 0.01 ** 2 + 1 / 0.1 ** 2))


def test_synthetic_images_replace_the_scan_and_have_flat_regions_and_edges(monkeypatch):
    import train_autoencoder
    monkeypatch.setattr(train_autoencoder, "synthetic_fraction", 1.0)
    monkeypatch.setattr(train_autoencoder, "patch_size", 32)
    blank_scan = [np.zeros((40, 36), np.float32), np.zeros((40, 36), np.float32)]
    noisy, target, sigma = train_autoencoder.make_training_pair(blank_scan, epoch=0, index=3, train_sigma=0.05,
                                                                train_noise_model="gaussian")
    assert target.shape == noisy.shape == (32, 32) and sigma == 0.05
    assert 0 <= target.min() and target.max() <= 1 and target.std() > 0.05  # not the blank scan
    assert 0.04 < np.std(noisy - target) < 0.06
    image = train_autoencoder.dead_leaves_image((64, 64), np.random.default_rng(1))
    steps = np.abs(np.diff(image, axis=1))
    assert np.mean(steps < 0.01) > 0.3 and np.mean(steps > 0.1) > 0.01
    assert not np.allclose(image, train_autoencoder.dead_leaves_image((64, 64), np.random.default_rng(2)))
    dark = train_autoencoder.dead_leaves_image((64, 64), np.random.default_rng(1), dark_fraction=0.5)
    assert np.mean(image < 1e-3) < 0.01 and np.mean(dark < 1e-3) > 0.1  # zero-signal regions only when asked


def test_no_dark_discs_draws_the_same_images_as_before_dark_discs_existed():
    """The shipped dead-leaves network's command (no dark discs) must still make the images it was trained on."""
    import train_autoencoder
    image = train_autoencoder.dead_leaves_image((48, 40), np.random.default_rng(7))
    assert image.shape == (48, 40) and round(float(image.sum()), 3) == 1212.292  # the sum before that change


def test_synthetic_fraction_trains_and_is_recorded(tmp_path, tiny_dataset):
    train(tmp_path, tiny_dataset, "--n_epochs=1", "--arch=shufflenet", '--arch_args={"depth": 2, "width": 8}',
          "--patch_size=16", "--augment", "--synthetic_fraction=0.5", "--synthetic_dark_fraction=0.2",
          "--noise_sigma_range=0.02,0.1")
    checkpoint = next((tmp_path / "models").glob("*[0-9]images.pt"))
    settings = torch.load(checkpoint, weights_only=True)["metadata"]["training_settings"]
    assert settings["synthetic_fraction"] == 0.5 and settings["synthetic_dark_fraction"] == 0.2


def test_bfloat16_training_learns_and_is_recorded(tmp_path, tiny_dataset):
    histories = {}
    for precision in ("bfloat16", "float32"):
        train(tmp_path / precision, tiny_dataset, f"--n_epochs={N_EPOCHS}", "--arch=dncnn",
              '--arch_args={"depth": 3, "width": 8}', f"--precision={precision}")
        checkpoint = torch.load(next((tmp_path / precision / "models").glob("*[0-9]images.pt")), weights_only=True)
        assert checkpoint["metadata"]["training_settings"]["precision"] == precision
        assert all(value.dtype == torch.float32 for value in checkpoint["state_dict"].values())  # weights stay float32
        histories[precision] = checkpoint["metadata"]["history"]
    assert histories["bfloat16"]["val_mse"][-1] < histories["bfloat16"]["val_mse"][0]
    # the same seed, data and steps: only the precision of the forward pass differs
    assert histories["bfloat16"]["train_mse"][0] != histories["float32"]["train_mse"][0]
    assert histories["bfloat16"]["train_mse"][0] == pytest.approx(histories["float32"]["train_mse"][0], rel=0.05)


def test_square_whole_slices_trained_with_quarter_turns_are_recorded_as_such(tmp_path):
    """Augmentation turns a square image by quarter turns, patch or whole slice: the metadata once said so only
    for patches, and the self-ensemble then refused a network trained on square whole slices."""
    from common import load_checkpoint
    scan = write_nifti(tmp_path / "square.nii.gz", phantom_volume((24, 24, 8, 2)))
    run_script("make_dataset", f"--input_paths={scan}", f"--output={tmp_path / 'square.npz'}", "--target_n_images=20")
    run_script("train_autoencoder", f"--dataset_path={tmp_path / 'square.npz'}", "--arch=dncnn",
               '--arch_args={"depth": 3, "width": 8}', "--n_epochs=1", "--batch_size=4", "--augment", "--patch_size=0",
               f"--models_dir={tmp_path}", f"--plots_dir={tmp_path}", f"--examples_dir={tmp_path}")
    (model,) = [p for p in tmp_path.glob("autoencoder_dncnn_*.pt") if not p.name.endswith(".resume.pt")]
    assert load_checkpoint(model)[1]["all_orientations"] is True
