"""models.py: every network keeps the slice size, and checkpoints rebuild the network they describe."""
import pytest
import torch

import models


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
@pytest.mark.parametrize("height, width", [(61, 73), (17, 21), (5, 7)])
def test_every_network_keeps_odd_sizes(arch, height, width):
    torch.manual_seed(0)
    model = models.build_model(arch).eval()
    noisy = torch.rand(2, 1, height, width)
    with torch.inference_mode():
        denoised = model(noisy, torch.tensor([0.05, 0.1]))
    assert denoised.shape == (2, 1, height, width)
    assert torch.isfinite(denoised).all()


@pytest.mark.parametrize("height, width", [(61, 73), (5, 7)])
def test_a_dilated_dncnn_keeps_odd_sizes_and_differs_from_the_plain_one(height, width):
    torch.manual_seed(0)
    plain = models.build_model("dncnn", {"depth": 4, "width": 8}).eval()
    dilated = models.build_model("dncnn", {"depth": 4, "width": 8, "dilations": [1, 3, 3, 1]}).eval()
    dilated.load_state_dict(plain.state_dict())  # the same weights, spaced out
    noisy = torch.rand(1, 1, height, width)
    with torch.inference_mode():
        assert dilated(noisy).shape == (1, 1, height, width)
        assert not torch.allclose(dilated(noisy), plain(noisy))


@pytest.mark.parametrize("dilations", [[1, 2], [1, 0, 1, 1], [1, 1.5, 2, 1]])
def test_dilations_that_do_not_fit_the_depth_are_refused(dilations):
    with pytest.raises(ValueError, match="dilations"):
        models.build_model("dncnn", {"depth": 4, "dilations": dilations})


def test_seed_network_has_the_original_parameter_count():
    assert models.count_parameters(models.build_model("seed")) == 9_569


def test_noise_map_networks_use_the_noise_sigma():
    checked = []
    for arch in models.ARCHITECTURES:
        torch.manual_seed(0)
        model = models.build_model(arch, {} if arch == "seed" else {"noise_map": True}).eval()
        if not models.uses_noise_map(model):
            continue
        noisy = torch.rand(1, 1, 16, 16)
        with torch.inference_mode():
            assert not torch.equal(model(noisy, torch.tensor([0.01])), model(noisy, torch.tensor([0.2]))), arch
        checked.append(arch)
    assert sorted(checked) == ["dncnn", "shufflenet", "unet"]  # every network that can take a noise level


def checkpoint_of(model, arch, arch_args=None):
    return {"state_dict": model.state_dict(),
            "metadata": {"format_version": models.CHECKPOINT_FORMAT, "arch": arch, "arch_args": arch_args or {}}}


@pytest.mark.parametrize("arch, arch_args", [("seed", {}), ("dncnn", {"depth": 3, "width": 8})])
def test_model_from_checkpoint_rebuilds_the_same_network(tmp_path, arch, arch_args):
    torch.manual_seed(1)
    model = models.build_model(arch, arch_args).eval()
    path = tmp_path / "model.pt"
    torch.save(checkpoint_of(model, arch, arch_args), path)
    rebuilt = models.model_from_checkpoint(torch.load(path, weights_only=True)).eval()
    assert type(rebuilt) is type(model)
    noisy = torch.rand(1, 1, 20, 24)
    with torch.inference_mode():
        assert torch.equal(rebuilt(noisy, torch.tensor([0.06])), model(noisy, torch.tensor([0.06])))


def test_model_from_checkpoint_raises_on_weights_of_another_network():
    seed_weights = models.build_model("seed").state_dict()
    checkpoint = {"state_dict": seed_weights,
                  "metadata": {"format_version": models.CHECKPOINT_FORMAT, "arch": "dncnn", "arch_args": {}}}
    with pytest.raises(RuntimeError, match="state_dict"):
        models.model_from_checkpoint(checkpoint)


@pytest.mark.parametrize("checkpoint, message", [
    ({"weights": 1}, "not a checkpoint of this repo"),
    ([1, 2], "not a checkpoint of this repo"),
    ({"state_dict": {}, "metadata": "seed"}, "not a checkpoint of this repo"),
    ({"state_dict": {}, "metadata": {"format_version": 99, "arch": "seed"}}, "format 99"),
    ({"state_dict": {}, "metadata": {"format_version": models.CHECKPOINT_FORMAT, "arch": "resnet"}},
     "unknown architecture 'resnet'"),
])
def test_model_from_checkpoint_rejects_what_it_cannot_rebuild(checkpoint, message):
    with pytest.raises(ValueError, match=message):
        models.model_from_checkpoint(checkpoint)


def test_the_scripts_default_networks_are_shipped_and_load():
    """A renamed or missing checkpoint would break make demo and the README's commands on a fresh clone."""
    import os

    import benchmark_denoisers
    import benchmark_inference
    import benchmark_noisy_reference
    import use_trained_autoencoder
    from common import load_checkpoint
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = {use_trained_autoencoder.model_path, benchmark_inference.model_path, *benchmark_denoisers.model_paths,
             *benchmark_noisy_reference.model_paths}
    for path in paths:
        model, metadata = load_checkpoint(os.path.join(root, path))
        assert metadata["n_parameters"] == sum(p.numel() for p in model.parameters())
