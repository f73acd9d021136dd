"""common.py: --name=value arguments become settings of the right type; NIfTIs are read in chunks."""
import platform
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common import InputError, apply_overrides, load_nifti, network_name, read_float32


def script_settings():
    """A stand-in for a script's globals(): its settings and some things that are not settings."""
    return {"n_epochs": 10, "learning_rate": 1e-3, "augment": False, "slice_range": [], "input_paths": ["a.nii"],
            "noise_sigma_range": [0.01, 0.1], "arch_args": {}, "arch": "seed", "model_path": "m.pt",
            "BUNDLED_SCAN": "x.nii.gz", "_private": 1, "__doc__": "a script"}


def test_each_type_is_parsed_from_text():
    settings = script_settings()
    apply_overrides(settings, ["--n_epochs=3", "--learning_rate=2e-4", "--augment=false", "--slice_range=10,14",
                               "--input_paths=b.nii.gz,c.nii", "--noise_sigma_range=0.02,0.2",
                               "--arch_args={\"width\": 32}", "--arch=unet"])
    assert settings["n_epochs"] == 3 and type(settings["n_epochs"]) is int
    assert settings["learning_rate"] == 2e-4 and type(settings["learning_rate"]) is float
    assert settings["augment"] is False
    assert settings["slice_range"] == [10, 14] and all(type(v) is int for v in settings["slice_range"])
    assert settings["input_paths"] == ["b.nii.gz", "c.nii"]
    assert settings["noise_sigma_range"] == [0.02, 0.2]
    assert settings["arch_args"] == {"width": 32}
    assert settings["arch"] == "unet"


def test_json_lists_bare_flags_and_separate_values():
    settings = script_settings()
    apply_overrides(settings, ["--slice_range=[3, 7]", "--augment", "--n_epochs", "5"])
    assert settings["slice_range"] == [3, 7]
    assert settings["augment"] is True
    assert settings["n_epochs"] == 5


def test_returns_the_settings_only():
    settings = script_settings()
    returned = apply_overrides(settings, ["--n_epochs=2"])
    assert returned["n_epochs"] == 2
    assert "BUNDLED_SCAN" not in returned and "_private" not in returned and "__doc__" not in returned


def test_aliases_set_the_named_setting():
    settings = script_settings()
    apply_overrides(settings, ["--model=other.pt", "--input", "scan.nii"],
                    aliases={"model": "model_path", "input": "input_paths"})
    assert settings["model_path"] == "other.pt"
    assert settings["input_paths"] == ["scan.nii"]


@pytest.mark.parametrize("argv, message", [
    (["--n_epoch=3"], "unknown setting --n_epoch"),
    (["--BUNDLED_SCAN=y"], "unknown setting --BUNDLED_SCAN"),
    (["--n_epochs=abc"], "--n_epochs=abc: expected a value of type int"),
    (["--n_epochs=2.5"], "expected a value of type int"),
    (["--learning_rate=fast"], "expected a value of type float"),
    (["--augment=maybe"], "expected true or false"),
    (["--arch_args=[1]"], "expected a value of type dict"),
    (["--noise_sigma_range=0.1,big"], "expected a value of type list"),
    (["--learning_rate=nan"], "--learning_rate=nan: expected finite numbers, not nan or inf"),
    (["--noise_sigma_range=0.01,inf"], "--noise_sigma_range=0.01,inf: expected finite numbers"),
    (["--noise_sigma_range=[0.01, NaN]"], "expected finite numbers"),
    (["--n_epochs"], "--n_epochs needs a value"),
    (["n_epochs=3"], "unexpected argument"),
])
def test_bad_overrides_are_errors(argv, message):
    settings = script_settings()
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace(".", r"\.")):
        apply_overrides(settings, argv)
    assert settings["n_epochs"] == 10


@pytest.mark.parametrize("shape", [(9, 7, 5), (9, 7, 5, 6)])
def test_chunked_read_equals_reading_at_once(tmp_path, shape):
    values = np.random.default_rng(0).normal(100, 30, shape)
    image = nib.Nifti1Image(values, np.eye(4))
    image.header.set_data_dtype(np.int16)  # stored scaled: each chunk must be scaled like the whole
    nib.save(image, str(tmp_path / "scan.nii.gz"))
    loaded = nib.load(tmp_path / "scan.nii.gz", keep_file_open=True)
    data, n_not_finite, n_too_large = read_float32(loaded, chunk_bytes=2 * 9 * 7 * 4)  # a few slices per chunk, a ragged last one
    assert data.dtype == np.float32 and n_not_finite == 0
    np.testing.assert_array_equal(data, np.asarray(nib.load(tmp_path / "scan.nii.gz").dataobj, dtype=np.float32))
    np.testing.assert_allclose(data, values, atol=0.01)


def test_load_nifti_counts_every_nan_and_inf(tmp_path):
    values = np.ones((6, 5, 4, 3), dtype=np.float32)
    values[0, 0, 0, 0] = values[5, 4, 3, 2] = np.nan
    values[2, 2, 2, 1] = -np.inf
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(tmp_path / "scan.nii"))
    with pytest.raises(InputError, match="contains 3 NaN or Inf values"):
        load_nifti(tmp_path / "scan.nii")


def test_load_nifti_tells_values_too_large_for_float32_from_nan(tmp_path):
    values = np.ones((6, 5, 4), dtype=np.float64)
    values[1, 1, 1] = values[2, 2, 2] = 1e300
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(tmp_path / "huge.nii"))
    loaded = nib.load(tmp_path / "huge.nii", keep_file_open=True)
    assert read_float32(loaded)[1:] == (0, 2)
    with pytest.raises(InputError, match=r"contains 2 values beyond float32's range"):
        load_nifti(tmp_path / "huge.nii")
    values[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(tmp_path / "huge_and_nan.nii"))
    assert read_float32(nib.load(tmp_path / "huge_and_nan.nii", keep_file_open=True))[1:] == (1, 2)


def dark_and_bright_slices(noise_model, sigma, n=6, size=96):
    """Slices whose left 60% is background (0) and right 40% a smooth bright object, with noise."""
    from common import add_noise
    clean = np.zeros((n, size, size), np.float32)
    clean[:, :, int(0.6 * size):] = 0.6 + 0.2 * np.sin(np.arange(size) / 9.0)[:, None]
    draws = np.random.default_rng(0).standard_normal((2, *clean.shape), dtype=np.float32)
    return add_noise(clean, sigma, noise_model, draws)


@pytest.mark.parametrize("noise_model", ["gaussian", "rician"])
def test_noise_sigma_is_estimated_for_gaussian_and_rician_noise(noise_model):
    """Rician noise is the magnitude of complex Gaussian noise: over a dark background it spreads only 0.655
    sigma, which a plain wavelet estimate reads as a sigma about a third too low."""
    from common import estimate_noise_sigma
    assert estimate_noise_sigma(dark_and_bright_slices(noise_model, 0.06)) == pytest.approx(0.06, rel=0.06)


def test_noise_sigma_of_small_slices_is_not_damped_at_their_borders():
    """A symmetric extension of the borders (the wavelet transform's default) reads 0.83 sigma here."""
    from common import estimate_noise_sigma
    noise = np.random.default_rng(0).standard_normal((40, 17, 21)).astype(np.float32) * 0.06
    assert estimate_noise_sigma(noise) == pytest.approx(0.06, rel=0.05)


def test_noise_sigma_leaves_out_a_masked_background_at_any_value():
    """A skull-stripped, z-scored scan: its background is 0 in its own units, a constant but not 0 once scaled to
    the 1st-99th percentiles; read as noise-free detail it filled the least structured half (estimate 0)."""
    from common import estimate_noise_sigma, normalise, percentile_range
    rng = np.random.default_rng(3)
    rows, columns = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 48), indexing="ij")
    head = (rows / 0.8) ** 2 + (columns / 0.7) ** 2 < 1
    clean = np.where(head, np.sin(4 * rows) * np.cos(3 * columns), 0)
    scan = np.stack([np.where(head, clean + rng.normal(0, 0.3, head.shape), 0) for _ in range(6)]).astype(np.float32)
    low, high = percentile_range(scan)
    scaled = normalise(scan, low, high)
    assert np.mean(scan < 0) > 0.2 and scaled[0, 0, 0] != 0
    # not a magnitude image (as the tool decides from the scan's own values: a fifth of them below 0)
    assert estimate_noise_sigma(scaled, magnitude=False) == pytest.approx(0.3 / (high - low), rel=0.1)
    assert estimate_noise_sigma(np.where(head, 0.6, 0.1)[None].astype(np.float32)) == 0  # no noise at all


def test_noise_sigma_is_read_where_detailed_slices_have_least_structure():
    """Sharp edges at every scale (dead leaves): the whole finest diagonal band reads 0.0227 for 0.02."""
    from common import estimate_noise_sigma
    from train_autoencoder import dead_leaves_image
    clean = np.stack([dead_leaves_image((96, 96), np.random.default_rng(i)) for i in range(6)])
    noisy = clean + np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32) * 0.02
    assert estimate_noise_sigma(noisy) == pytest.approx(0.02, rel=0.06)


def test_noise_sigma_of_a_magnitude_image_without_background_counts_dark_from_zero_signal():
    """A cropped field of view: tissue everywhere, scaled as the tool scales a scan (its 1st percentile to 0).
    Taking its darkest tissue for noise-only background read the sigma 8% high."""
    from common import add_noise, estimate_noise_sigma, normalise, percentile_range
    clean = np.repeat((1.0 + 0.3 * np.sin(np.arange(128) / 9.0))[None, None, :], 128, axis=1).repeat(6, axis=0)
    draws = np.random.default_rng(5).standard_normal((2, *clean.shape), dtype=np.float32)
    noisy = add_noise(clean.astype(np.float32), 0.1, "rician", draws)
    low, high = percentile_range(noisy)
    scaled, true_sigma = normalise(noisy, low, high), 0.1 / (high - low)
    assert estimate_noise_sigma(scaled, True, zero=normalise(0.0, low, high)) == pytest.approx(true_sigma, rel=0.03)
    assert estimate_noise_sigma(scaled, True) > 1.05 * true_sigma  # dark counted from the 1st percentile


def test_noise_sigma_ignores_a_masked_background():
    from common import estimate_noise_sigma
    slices = dark_and_bright_slices("rician", 0.05)
    slices[:, :, :40] = 0  # the scanner zeroed the background
    assert estimate_noise_sigma(slices) == pytest.approx(0.05, rel=0.06)
    assert estimate_noise_sigma(np.zeros((2, 16, 16), np.float32)) == 0.0


def test_the_self_ensemble_turns_every_orientation_back():
    """An untrained network is not symmetric; the mean over the 8 orientations is, exactly: a flipped or rotated
    slice gives the flipped or rotated result, for non-square slices too."""
    import torch

    import models
    from common import denoise_slices
    torch.manual_seed(0)
    model = models.build_model("dncnn", {"depth": 3, "width": 8}).eval()
    slices = np.random.default_rng(0).random((2, 13, 10), dtype=np.float32)
    ensembled = denoise_slices(model, slices, 0.05, self_ensemble=True)
    plain = denoise_slices(model, slices, 0.05)
    assert ensembled.shape == slices.shape and not np.allclose(ensembled, plain, atol=1e-4)
    rotated = np.ascontiguousarray(np.rot90(slices, 1, axes=(1, 2)))
    np.testing.assert_allclose(denoise_slices(model, rotated, 0.05, self_ensemble=True),
                               np.rot90(ensembled, 1, axes=(1, 2)), atol=1e-5)
    mirrored = np.ascontiguousarray(slices[:, ::-1])
    np.testing.assert_allclose(denoise_slices(model, mirrored, 0.05, self_ensemble=True), ensembled[:, ::-1], atol=1e-5)
    # and the plain network is not symmetric, so the checks above could fail
    assert not np.allclose(denoise_slices(model, mirrored, 0.05), plain[:, ::-1], atol=1e-4)


def batch_counting_network():
    """(a tiny DnCNN, the same network as a function that records each batch's size, that record)."""
    import torch

    import models
    torch.manual_seed(0)
    network = models.build_model("dncnn", {"depth": 2, "width": 4, "noise_map": True}).eval()
    seen = []

    def model(batch, sigma):
        seen.append(len(batch))
        return network(batch, sigma)

    model.parameters = network.parameters
    return network, model, seen


@pytest.mark.parametrize("shape, batches", [((5, 300, 200), [3, 2]), ((20, 20, 17), [16, 4]), ((2, 700, 600), [1, 1])])
def test_big_slices_go_through_in_smaller_batches_with_the_same_result(shape, batches):
    """A batch holds at most MAX_BATCH_PIXELS pixels (but at least one slice), and each slice's sigma goes with it."""
    import torch

    from common import denoise_slices
    network, model, seen = batch_counting_network()
    slices = np.random.default_rng(0).random(shape, dtype=np.float32)
    sigmas = np.linspace(0.01, 0.1, shape[0])
    denoised = denoise_slices(model, slices, sigmas)
    assert seen == batches
    with torch.inference_mode():
        one_by_one = [network(torch.from_numpy(s[None, None]), torch.tensor([sigma]))[0, 0].numpy()
                      for s, sigma in zip(slices, sigmas.astype(np.float32))]
    np.testing.assert_allclose(denoised, np.stack(one_by_one), atol=1e-5)


def test_the_adaptation_checks_run_big_slices_in_smaller_batches_with_the_same_result():
    """model_in_batches (the adaptation guard's forward passes) keeps to the same pixel cap as denoise_slices."""
    import torch

    from common import model_in_batches
    network, model, seen = batch_counting_network()
    images = torch.rand(5, 1, 300, 200)
    batched = model_in_batches(model, images, 0.05)
    assert seen == [3, 2]
    with torch.inference_mode():
        np.testing.assert_allclose(batched.numpy(), network(images, 0.05).numpy(), atol=1e-5)


def test_bfloat16_moves_the_output_only_slightly():
    """The convolutions run in bfloat16 (the output changes, so it ran) and the rest in float32: the change is
    far below any noise level worth removing."""
    import torch

    import models
    from common import denoise_slices
    torch.manual_seed(0)
    model = models.build_model("dncnn", {"depth": 3, "width": 8, "noise_map": True}).eval()
    slices = np.random.default_rng(0).random((3, 20, 17), dtype=np.float32)
    plain = denoise_slices(model, slices, 0.05)
    rounded = denoise_slices(model, slices, 0.05, bfloat16=True)
    assert rounded.dtype == np.float32 and rounded.shape == slices.shape
    assert not np.array_equal(rounded, plain)
    assert np.sqrt(np.mean((rounded - plain) ** 2)) < 4e-4  # rounding the output itself to bfloat16 gives ~8e-4


@pytest.mark.parametrize("precision, expected", [("float32", False), ("bfloat16", True)])
def test_an_explicit_precision_is_obeyed(precision, expected):
    import torch

    from common import use_bfloat16
    assert use_bfloat16(precision, torch.device("cpu")) is expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_takes_bfloat16_only_where_the_cpu_computes_it(monkeypatch, native):
    import torch

    import common
    monkeypatch.setattr(common, "native_bfloat16", lambda device: native)
    assert common.use_bfloat16("auto", torch.device("cpu")) is native
    assert common.use_bfloat16("float32", torch.device("cpu")) is False


def test_an_unknown_precision_is_refused():
    import torch

    from common import use_bfloat16
    with pytest.raises(InputError, match="precision='half'"):
        use_bfloat16("half", torch.device("cpu"))


@pytest.mark.parametrize("metadata, accepted", [
    ({"all_orientations": True, "training_settings": {}}, True),
    ({"all_orientations": False, "training_settings": {"augment": True, "patch_size": 128}}, False),
    ({"training_settings": {"augment": True, "patch_size": 64}}, True),   # written before "all_orientations"
    ({"training_settings": {"augment": False, "patch_size": 64}}, False),
    ({"training_settings": {"augment": True, "patch_size": 0}}, False),   # whole non-square slices: half turns only
])
def test_the_self_ensemble_takes_only_networks_trained_on_every_orientation(metadata, accepted):
    from common import check_self_ensemble
    if accepted:
        check_self_ensemble(metadata, "model.pt")
    else:
        with pytest.raises(InputError, match="model.pt was not trained on flipped and rotated"):
            check_self_ensemble(metadata, "model.pt")


FREE_A_BLOCK = """
import os
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import common
if sys.argv[2] == "keep":
    assert common.keep_freed_memory()
def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
block = np.ones(16 * 2**20 // 8)
before = resident_mb()
del block
print(before - resident_mb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
@pytest.mark.parametrize("keep", [True, False])
def test_freed_blocks_stay_with_the_process_only_after_keep_freed_memory(keep):
    scripts = str(Path(__file__).resolve().parent.parent / "scripts")
    result = subprocess.run([sys.executable, "-c", FREE_A_BLOCK, scripts, "keep" if keep else "default"],
                            capture_output=True, text=True, check=True)
    returned_mb = float(result.stdout)
    assert returned_mb < 1 if keep else returned_mb > 15


def test_keep_freed_memory_does_nothing_outside_linux(monkeypatch):
    import common
    monkeypatch.setattr(sys, "platform", "darwin")
    assert common.keep_freed_memory() is False


@pytest.mark.parametrize("path, name", [("trained_models/autoencoder_dncnn_blind_200epochs_672images.pt",
                                         "dncnn_blind_200epochs_672images"),
                                        ("/elsewhere/my_net.pth", "my_net")])
def test_both_benchmarks_name_a_checkpoint_by_its_file(path, name):
    assert network_name(path) == name


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_a_time_limit_is_one_line_and_exit_code_130(stop):
    import signal
    import subprocess
    import sys
    from conftest import SCRIPTS
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from common import run_main\n"
            "def main():\n    print('ready', flush=True); time.sleep(60)\nrun_main(main)")
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps that: as under
    # `nohup make test &`, where this test hung; the child gets the default, as a terminal gives it
    process = subprocess.Popen([sys.executable, "-c", code, SCRIPTS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(getattr(signal, stop))
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and stderr.strip() == "interrupted"


def test_the_rician_floor_of_a_tiny_sigma_leaves_the_image_as_it_is_without_overflow():
    """A noise estimate of rounding error (1e-35) once made the floor's inversion overflow float32 to Inf."""
    import warnings
    from common import remove_rician_floor
    image = np.array([0.0, 0.01, 0.5, 1.0, 5.0], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow, no invalid cast
        floored = remove_rician_floor(image, 1e-35)
    np.testing.assert_allclose(floored, image, rtol=1e-6)
    assert np.isnan(remove_rician_floor(np.array([np.nan], dtype=np.float32), 0.06)[0])


def test_an_output_is_replaced_whole_or_not_at_all(tmp_path):
    """A write that fails half-way leaves the previous file as it was and no temporary file; one that succeeds
    gets the usual permissions, not mkstemp's private ones."""
    import os
    from common import atomic_write
    path = tmp_path / "out.json"
    path.write_text("old")

    def fails_half_way(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(path, fails_half_way)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    atomic_write(path, lambda tmp: open(tmp, "w").write("new"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o666 & ~umask


def test_the_example_grid_of_a_series_without_added_noise_names_no_psnr(recwarn):
    """A real series (make_dataset --noise_sigma=0) has its noisy image as its clean one: the grid says so
    instead of asking scikit-image for the PSNR of identical images (a divide-by-zero warning and inf dB)."""
    from common import plot_denoising_grid
    clean = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    masks = np.ones_like(clean, dtype=bool)
    figure = plot_denoising_grid(clean, clean * 0.9, clean, masks, "title")
    titles = [axis.get_title() for axis in figure.axes]
    assert titles[0] == "noisy: the clean image" and titles[1].endswith("dB in mask") and "inf" not in titles[1]
    assert not [w for w in recwarn if "divide" in str(w.message)]
    figure = plot_denoising_grid(clean, clean * 0.9, clean, ~masks, "title")  # a slice without head: no PSNR
    assert [axis.get_title() for axis in figure.axes][:2] == ["noisy (no head in this slice)",
                                                              "denoised (no head in this slice)"]


def test_slices_of_other_sizes_are_denoised_at_their_own_size_not_with_their_zero_padding():
    import torch
    from common import denoise_at_own_sizes, denoise_slices
    from models import build_model
    torch.manual_seed(0)
    model = build_model("dncnn", {"depth": 3, "width": 8, "noise_map": True}).eval()
    rng = np.random.default_rng(0)
    small, large = rng.random((2, 10, 12), dtype=np.float32), rng.random((1, 16, 14), dtype=np.float32)
    stacked = np.zeros((3, 16, 14), dtype=np.float32)  # as a dataset of two scan sizes stacks them
    stacked[:2, :10, :12], stacked[2:] = small, large
    shapes = np.array([[10, 12], [10, 12], [16, 14]])
    denoised = denoise_at_own_sizes(model, stacked, shapes, 0.06)
    np.testing.assert_array_equal(denoised[:2, :10, :12], denoise_slices(model, small, 0.06))
    np.testing.assert_array_equal(denoised[2:], denoise_slices(model, large, 0.06))
    assert not denoised[:2, 10:].any() and not denoised[:2, :, 12:].any()
    padded = denoise_slices(model, stacked, 0.06)[:2, :10, :12]  # the padding reaches the small slices' borders
    assert np.abs(padded - denoised[:2, :10, :12]).max() > 1e-3


def test_the_tsnr_of_voxels_that_never_change_is_0_not_float32_rounding():
    from common import tsnr_map
    series = np.repeat(np.random.default_rng(0).uniform(100, 1000, (6, 5, 4, 1)).astype(np.float32), 3, axis=3)
    assert not tsnr_map(series).any()  # the mean of three equal float32 values is not always exactly them
    series[..., 0] += 1.0
    assert (tsnr_map(series) > 0).all() and tsnr_map(series).max() < 1e4
