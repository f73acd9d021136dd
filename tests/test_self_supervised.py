"""Self-supervision: time pairs never cross a split, Neighbor2Neighbor never shows the network a target
pixel, recorrupted pairs have independent noise, every self-supervised training target runs end to end,
and use-time adaptation improves a poorly matched network."""
import numpy as np
import pytest
import torch

from common import (add_noise, adapt_to_slices, denoise_adapted, denoise_slices, keeps_adaptation,
                    neighbour_subsample, neighbor2neighbor_loss, object_region, object_threshold, recorrupt)
from conftest import phantom_volume, run_script, write_nifti
from models import build_model


@pytest.fixture(scope="module")
def paired_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    scan = write_nifti(folder / "series.nii.gz", phantom_volume((32, 28, 12, 4)))
    dataset = folder / "pairs.npz"
    run_script("make_dataset", f"--input_paths={scan}", f"--output={dataset}", "--pairing=time",
               "--target_n_images=200")
    return dataset


def test_time_pairs_join_the_same_slice_at_another_time_and_never_cross_a_split(paired_dataset):
    with np.load(paired_dataset) as archive:
        partner = archive["partner_index"]
        has_partner = partner >= 0
        assert has_partner.mean() > 0.9  # a static phantom: almost every pair passes the difference guard
        rows, partners = np.flatnonzero(has_partner), partner[has_partner]
        assert np.all(archive["split"][rows] == archive["split"][partners])
        assert np.all(archive["slice_index"][rows] == archive["slice_index"][partners])
        assert np.all(archive["time_index"][rows] != archive["time_index"][partners])


def test_pairs_that_differ_far_beyond_the_noise_are_dropped(tmp_path):
    series = phantom_volume((32, 28, 12, 4))
    series[..., 2:] = np.roll(series[..., 2:], 6, axis=0)  # the head moves between volumes 1 and 2
    scan = write_nifti(tmp_path / "moving.nii.gz", series)
    run_script("make_dataset", f"--input_paths={scan}", f"--output={tmp_path / 'pairs.npz'}", "--pairing=time",
               "--target_n_images=200")
    with np.load(tmp_path / "pairs.npz") as archive:
        partner, time_index = archive["partner_index"], archive["time_index"]
        crossing = (partner >= 0) & (time_index == 1) & (time_index[np.maximum(partner, 0)] == 2)
        assert not crossing.any()
        assert np.any((partner >= 0) & (time_index == 0))  # static pairs are kept


def test_neighbour_subsampling_takes_two_different_adjacent_pixels_of_each_cell():
    positions = torch.arange(16 * 12, dtype=torch.float32).reshape(1, 1, 16, 12)
    choice = torch.randint(8, (1, 1, 8, 6), generator=torch.Generator().manual_seed(0))
    first, second = neighbour_subsample(positions, choice)
    rows_first, cols_first = first // 12, first % 12
    rows_second, cols_second = second // 12, second % 12
    assert torch.all(first != second)
    assert torch.all((rows_first // 2 == rows_second // 2) & (cols_first // 2 == cols_second // 2))  # same cell
    assert torch.all((rows_first - rows_second).abs() + (cols_first - cols_second).abs() == 1)  # adjacent


def test_the_network_input_never_holds_a_target_pixel():
    """Changing the pixels the loss uses as targets must not change what the network sees."""
    torch.manual_seed(0)
    seen = []
    model = lambda x, sigma: (seen.append(x.clone()), x)[1]  # records its inputs
    noisy = torch.rand(2, 1, 16, 16)
    neighbor2neighbor_loss(model, noisy, None, torch.Generator().manual_seed(3))
    choice = torch.randint(8, (2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    _, targets = neighbour_subsample(torch.arange(512.0).reshape(2, 1, 16, 16), choice)
    changed = noisy.clone().reshape(-1)
    changed[targets.long().reshape(-1)] += 100.0  # only the target pixels change
    seen_after = []
    model_after = lambda x, sigma: (seen_after.append(x.clone()), x)[1]
    neighbor2neighbor_loss(model_after, changed.reshape(2, 1, 16, 16), None, torch.Generator().manual_seed(3))
    assert torch.equal(seen[0], seen_after[0])  # the sub-image the loss trains on is untouched


def test_recorrupted_input_and_target_have_independent_noise_around_the_clean_image():
    """Recorrupted-to-Recorrupted: the input's and the target's noise must be uncorrelated (else the
    network learns to copy noise), the target unbiased, and the input's sigma as stated."""
    rng = np.random.default_rng(0)
    clean = np.full((200_000,), 0.4, dtype=np.float32)
    sigma = 0.05
    noisy = add_noise(clean, sigma, "gaussian", rng.standard_normal((2, clean.size), dtype=np.float32))
    inputs, targets, input_sigma = recorrupt(noisy, sigma, rng.standard_normal(clean.size, dtype=np.float32))
    input_noise, target_noise = inputs - clean, targets - clean
    assert abs(np.corrcoef(input_noise, target_noise)[0, 1]) < 0.01
    assert abs(target_noise.mean()) < 0.001
    assert input_noise.std() == pytest.approx(input_sigma, rel=0.01)
    assert input_sigma == pytest.approx(sigma * np.sqrt(1.25))


def test_recorrupted_training_refuses_rician_noise(paired_dataset, tmp_path):
    result = run_script("train_autoencoder", f"--dataset_path={paired_dataset}", f"--models_dir={tmp_path}",
                        "--training_target=recorrupted", "--noise_model=rician", check=False)
    assert result.returncode != 0
    assert "training_target=recorrupted needs Gaussian noise" in result.stderr.strip().splitlines()[-1]


def test_recorrupted_or_clean_training_on_a_series_without_added_noise_is_refused(tmp_path, tiny_scan):
    run_script("make_dataset", f"--input_paths={tiny_scan}", f"--output={tmp_path / 'real.npz'}", "--noise_sigma=0")
    result = run_script("train_autoencoder", f"--dataset_path={tmp_path / 'real.npz'}", f"--models_dir={tmp_path}",
                        "--training_target=recorrupted", "--fresh_noise=false", "--batch_size=4", check=False)
    assert result.returncode != 0
    assert "needs the noise sigma" in result.stderr.strip().splitlines()[-1]
    # its clean images are its noisy ones: a supervised network would learn to change nothing
    result = run_script("train_autoencoder", f"--dataset_path={tmp_path / 'real.npz'}", f"--models_dir={tmp_path}",
                        f"--plots_dir={tmp_path}", f"--examples_dir={tmp_path}", "--batch_size=4", check=False)
    assert result.returncode != 0
    assert "training_target=clean would learn to change nothing" in result.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize("target", ["time_partner", "neighbor2neighbor", "recorrupted"])
def test_self_supervised_training_runs_and_learns(paired_dataset, tmp_path, target):
    run_script("train_autoencoder", f"--dataset_path={paired_dataset}", f"--models_dir={tmp_path}",
               f"--plots_dir={tmp_path}", f"--examples_dir={tmp_path}", "--arch=unet", '--arch_args={"width": 8}',
               "--n_epochs=4", "--batch_size=8", "--patch_size=24", "--learning_rate=3e-3",
               f"--training_target={target}")
    model_file = next(p for p in tmp_path.glob("*.pt") if not p.name.endswith(".resume.pt"))
    checkpoint = torch.load(model_file, weights_only=True)
    history = checkpoint["metadata"]["history"]
    assert checkpoint["metadata"]["training_target"] == target
    assert history["val_mse"][-1] < history["val_mse"][0]


def test_a_real_series_trains_a_noise_map_network_told_its_own_noise(tmp_path, tiny_scan):
    # without added noise, the images' own noise is what the network must be told, in training as at use
    # (use_trained_autoencoder.py estimates it), not 0
    import json

    import nibabel as nib
    from common import percentile_range
    dataset = tmp_path / "real.npz"
    result = run_script("make_dataset", f"--input_paths={tiny_scan}", f"--output={dataset}", "--noise_sigma=0",
                        "--pairing=time")
    with np.load(dataset) as archive:
        own_sigma = json.loads(str(archive["settings_json"]))["own_noise_sigma"]
    low, high = percentile_range(np.asarray(nib.load(tiny_scan).dataobj, dtype=np.float32), 1.0, 99.0)
    assert own_sigma == pytest.approx(5.0 / (high - low), rel=0.15)  # the phantom's noise: 5 in its own units
    assert "the scans' own noise" in result.stdout
    run_script("train_autoencoder", f"--dataset_path={dataset}", f"--models_dir={tmp_path}", f"--plots_dir={tmp_path}",
               f"--examples_dir={tmp_path}", "--arch=dncnn", '--arch_args={"depth": 3, "width": 8, "noise_map": true}',
               "--n_epochs=1", "--batch_size=4", "--patch_size=16", "--training_target=time_partner", "--fresh_noise=false")
    model_file = next(p for p in tmp_path.glob("*.pt") if not p.name.endswith(".resume.pt"))
    metadata = torch.load(model_file, weights_only=True)["metadata"]
    assert metadata["noise_sigma_range"] == [own_sigma, own_sigma]
    # scored against the partner, not against the input itself (which would reward leaving the noise in)
    assert metadata["validation"].startswith("validation MSE against the time partner")
    assert metadata["history"]["val_mse"][-1] > 0.9 * own_sigma ** 2  # at least the partner's noise variance
    evaluation = run_script("use_trained_autoencoder", f"--model_path={model_file}", f"--dataset_path={dataset}",
                            f"--examples_dir={tmp_path}", check=False)
    assert evaluation.returncode != 0
    assert "holds no added noise" in evaluation.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob("metrics_*.json"))


def test_time_partner_training_needs_a_paired_dataset(tmp_path, tiny_scan):
    run_script("make_dataset", f"--input_paths={tiny_scan}", f"--output={tmp_path / 'plain.npz'}")
    result = run_script("train_autoencoder", f"--dataset_path={tmp_path / 'plain.npz'}", "--training_target=time_partner",
                        f"--models_dir={tmp_path}", check=False)
    assert result.returncode != 0
    assert "--pairing=time" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("loss", ["recorrupted", "neighbor2neighbor"])
def test_adaptation_improves_a_network_that_does_not_fit_the_image(loss):
    rng = np.random.default_rng(0)
    clean = np.stack([phantom_volume((48, 48, 1), seed=s)[:, :, 0] / 1000 for s in range(6)]).astype(np.float32)
    noisy = add_noise(clean, 0.08, "gaussian", rng.standard_normal((2, *clean.shape), dtype=np.float32))
    torch.manual_seed(0)
    untrained = build_model("unet", {"width": 8}).eval()  # knows nothing: adaptation must teach it
    adapted, info = adapt_to_slices(untrained, noisy, 0.08, n_steps=150, max_seconds=60, learning_rate=3e-3,
                                    patch_size=32, loss=loss)
    before = denoise_slices(untrained, noisy, 0.08)
    after = denoise_adapted(untrained, adapted, noisy, 0.08, info["object_threshold"])
    inside = object_region(before, info["object_threshold"])
    assert info["kept"] and info["heldout_gain_z"] > 2 and info["recorrupted_gain_z"] > 2
    assert np.mean((after - clean)[inside] ** 2) < 0.5 * np.mean((before - clean)[inside] ** 2)
    assert np.mean((after - clean) ** 2) < np.mean((before - clean) ** 2)


def disc_slices(n_slices=2, size=40, radius=10):
    """Bright discs with a dark hole in the middle, on a black background: (n, size, size)."""
    rows, columns = np.indices((size, size))
    distance = np.hypot(rows - size / 2, columns - size / 2)
    disc = ((distance < radius) & (distance > 3)).astype(np.float32) * 0.8
    return np.repeat(disc[None], n_slices, axis=0)


def test_the_object_region_holds_the_object_its_holes_and_edges_but_not_the_background():
    slices = disc_slices()
    region = object_region(slices, object_threshold(slices))
    assert region[:, 20, 20].all()                   # the hole is filled
    assert region[:, 20, 20 + 10 + 1].all()          # one pixel beyond the edge
    assert not region[:, :3, :3].any() and not region[:, 20, 36].any()


class Offset(torch.nn.Module):
    """A stand-in network that adds a constant."""
    def __init__(self, offset):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor(float(offset)))

    def forward(self, images, noise_sigma):
        return images + self.offset


def test_the_adapted_network_denoises_the_object_and_the_trained_one_the_background():
    slices = disc_slices()
    trained, adapted = Offset(0.0), Offset(0.1)
    threshold = object_threshold(slices)
    combined = denoise_adapted(trained, adapted, slices, 0.05, threshold)
    inside = object_region(slices, threshold)
    np.testing.assert_allclose(combined[inside], slices[inside] + 0.1, atol=1e-6)
    np.testing.assert_allclose(combined[~inside], slices[~inside], atol=1e-6)
    np.testing.assert_array_equal(denoise_adapted(trained, trained, slices, 0.05, threshold), slices)


def test_the_adaptation_is_checked_on_held_out_pixels_of_the_object_only():
    noisy = disc_slices(4) + np.random.default_rng(2).normal(0, 0.03, (4, 40, 40)).astype(np.float32)
    model = Offset(0.0)
    info = adapt_to_slices(model, noisy, 0.03, n_steps=1, max_seconds=30, learning_rate=0.0)[1]
    assert 0.2 < info["object_fraction"] < 0.4  # the disc, radius 10 in 40 x 40, and its 2-pixel margin
    assert info["heldout_pixels"] == pytest.approx(0.1 * info["object_fraction"] * noisy.size, rel=0.2)


@pytest.mark.parametrize("masked_z, recorrupted_z, magnitude, kept", [
    (3.0, 3.0, False, True),     # both see a clear gain
    (0.5, 3.3, False, True),     # the masked check sees too little to tell (as on 2x coarser voxels), and no loss
    (-2.5, 5.0, False, False),   # the masked check sees a clear loss: a veto
    (8.0, 1.5, False, False),    # the whole-image check must see a clear gain
    (0.0, 0.0, False, False),
    (3.0, 3.0, True, True),      # Rician noise can fool the recorrupted check: both must see a clear gain
    (0.5, 3.3, True, False),
    (3.3, 1.5, True, False),
])
def test_an_adaptation_is_kept_on_a_clear_whole_image_gain_that_the_masked_check_does_not_contradict(
        masked_z, recorrupted_z, magnitude, kept):
    assert keeps_adaptation(masked_z, recorrupted_z, magnitude) is kept


def test_adaptation_that_does_not_help_is_discarded():
    """With a learning rate of zero nothing changes, so there is no gain and the original is returned."""
    noisy = np.random.default_rng(1).random((4, 32, 32), dtype=np.float32)
    model = build_model("unet", {"width": 8}).eval()
    returned, info = adapt_to_slices(model, noisy, 0.05, n_steps=3, max_seconds=30, learning_rate=0.0)
    assert returned is model and not info["kept"]
    assert info["heldout_gain_z"] == info["recorrupted_gain_z"] == 0.0


def test_the_heldout_fraction_sets_how_many_pixels_check_the_adaptation():
    from common import InputError
    noisy = np.random.default_rng(1).random((4, 32, 32), dtype=np.float32)
    model = build_model("unet", {"width": 8}).eval()
    for fraction in (0.1, 0.3):
        info = adapt_to_slices(model, noisy, 0.05, n_steps=1, max_seconds=30, learning_rate=0.0,
                               heldout_fraction=fraction)[1]
        assert info["heldout_pixels"] == pytest.approx(fraction * noisy.size, rel=0.15)
    with pytest.raises(InputError, match="held-out fraction 0.5"):
        adapt_to_slices(model, noisy, 0.05, n_steps=1, max_seconds=30, heldout_fraction=0.5)


def test_a_time_partner_target_is_the_partner_with_noise_of_its_own(monkeypatch):
    """Noise2Noise: the target is the other time point's slice with independent noise, not the input again
    (training toward the input itself also lowers a loss, so an end-to-end run cannot tell)."""
    import train_autoencoder
    for name, value in (("training_target", "time_partner"), ("patch_size", 0), ("augment", False),
                        ("fresh_noise", True), ("noise_sigma_range", []), ("synthetic_fraction", 0.0)):
        monkeypatch.setattr(train_autoencoder, name, value)
    rows, columns = np.mgrid[:64, :64]
    clean = (0.5 + 0.3 * np.sin(rows / 5.0)).astype(np.float32)
    partner_clean = clean * 1.01
    noisy, target, sigma = train_autoencoder.make_training_pair([clean, clean, partner_clean, partner_clean],
                                                                epoch=0, index=0, train_sigma=0.1,
                                                                train_noise_model="gaussian")
    input_noise, target_noise = (noisy - clean).ravel(), (target - partner_clean).ravel()
    assert abs(np.corrcoef(input_noise, target_noise)[0, 1]) < 0.05
    assert target_noise.std() == pytest.approx(0.1, rel=0.05) and sigma == 0.1


def test_a_magnitude_image_is_judged_by_the_magnitude_rule(monkeypatch):
    import common
    calls = []
    monkeypatch.setattr(common, "keeps_adaptation", lambda m, r, magnitude=False: calls.append(magnitude) or False)
    clean = np.stack([phantom_volume((32, 32, 1), seed=s)[:, :, 0] / 1000 for s in range(4)]).astype(np.float32)
    noisy = add_noise(clean, 0.08, "rician", np.random.default_rng(0).standard_normal((2, *clean.shape),
                                                                                     dtype=np.float32))
    for magnitude in (True, False):
        _, info = adapt_to_slices(build_model("unet", {"width": 8}).eval(), noisy, 0.08, n_steps=2, max_seconds=30,
                                  patch_size=16, magnitude=magnitude)
        assert info["kept"] is False
    assert calls == [True, False]


def test_the_held_out_check_never_sees_a_held_out_value():
    """masked_pixel_errors: changing the noisy value at held-out pixels changes nothing the network sees."""
    from common import masked_pixel_errors
    rows, columns = np.indices((20, 20))
    heldout = ((rows + columns) % 2 == 0) & (np.random.default_rng(0).random((2, 20, 20)) < 0.3)
    noisy = np.random.default_rng(1).random((2, 20, 20), dtype=np.float32)
    changed = noisy.copy()
    changed[heldout] += 5.0
    seen = []
    model = lambda x, sigma: (seen.append(x.clone()), x)[1]
    masked_pixel_errors(model, noisy, 0.05, heldout)
    masked_pixel_errors(model, changed, 0.05, heldout)
    assert torch.equal(seen[0], seen[1])


def test_the_recorrupted_check_is_the_true_error_plus_a_constant():
    """recorrupted_pixel_errors: a network that returns the clean image scores sigma^2 (1 + 1 / alpha^2), one
    that returns its input scores sigma^2 (alpha + 1 / alpha)^2; their difference is the identity's true
    error at the recorrupted noise level, sigma^2 (1 + alpha^2)."""
    from common import RECORRUPTION_ALPHA as alpha
    from common import recorrupted_pixel_errors
    rng = np.random.default_rng(0)
    clean = rng.random((4, 64, 64), dtype=np.float32)
    sigma = 0.05
    noisy = add_noise(clean, sigma, "gaussian", rng.standard_normal((2, *clean.shape), dtype=np.float32))
    heldout = np.ones(clean.shape, dtype=bool)
    oracle = lambda x, s: torch.from_numpy(clean[:, None])[:len(x)]  # one batch: 4 slices < 16
    identity = lambda x, s: x
    oracle_error = recorrupted_pixel_errors(oracle, noisy, sigma, heldout).mean()
    identity_error = recorrupted_pixel_errors(identity, noisy, sigma, heldout).mean()
    assert oracle_error == pytest.approx(sigma ** 2 * (1 + 1 / alpha ** 2), rel=0.03)
    assert identity_error == pytest.approx(sigma ** 2 * (alpha + 1 / alpha) ** 2, rel=0.03)
    assert identity_error - oracle_error == pytest.approx(sigma ** 2 * (1 + alpha ** 2), rel=0.1)
