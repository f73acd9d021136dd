"""Property-based tests (hypothesis): padding then cropping, and normalising then denormalising,
give back what went in, over random shapes and intensity ranges."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common import denormalise, normalise
from models import ARCHITECTURES, build_model, pad_to_multiple

sides = st.integers(min_value=1, max_value=37)


@settings(max_examples=150, deadline=None)
@given(height=sides, width=sides, multiple=st.sampled_from([1, 2, 3, 4, 8]), channels=st.integers(1, 3),
       seed=st.integers(0, 2 ** 32 - 1))
def test_pad_to_multiple_then_crop_is_the_identity(height, width, multiple, channels, seed):
    x = torch.from_numpy(np.random.default_rng(seed).random((2, channels, height, width), dtype=np.float32))
    padded = pad_to_multiple(x, multiple)
    assert padded.shape[:2] == x.shape[:2]
    assert padded.shape[-2] % multiple == 0 and padded.shape[-1] % multiple == 0
    assert height <= padded.shape[-2] < height + multiple and width <= padded.shape[-1] < width + multiple
    assert torch.equal(padded[..., :height, :width], x)


@settings(max_examples=20, deadline=None)
@given(arch=st.sampled_from(sorted(ARCHITECTURES)), height=st.integers(1, 19), width=st.integers(1, 19))
def test_every_network_returns_the_shape_it_was_given(arch, height, width):
    torch.manual_seed(0)
    arch_args = {"depth": 3, "width": 8} if arch in ("dncnn", "shufflenet") else {"width": 4} if arch == "unet" else {}
    model = build_model(arch, arch_args).eval()
    x = torch.rand(2, 1, height, width)
    with torch.inference_mode():
        y = model(x, torch.full((2,), 0.05))
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


intensities = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(low=intensities, width=st.floats(min_value=1e-2, max_value=1e5), n_values=st.integers(1, 50),
       seed=st.integers(0, 2 ** 32 - 1))
def test_normalise_without_clipping_then_denormalise_is_the_identity(low, width, n_values, seed):
    high = low + width
    # values inside and well outside [low, high], as a real scan's outliers beyond the percentiles are
    volume = (low + width * np.random.default_rng(seed).uniform(-2, 3, n_values)).astype(np.float32)
    scaled = normalise(volume, low, high)
    assert scaled.dtype == np.float32
    restored = denormalise(scaled, low, high)
    assert restored.dtype == np.float32
    # float32 rounding happens on the scale of the largest magnitude involved
    tolerance = 8 * np.finfo(np.float32).eps * (np.abs(volume) + abs(low) + abs(high))
    assert np.all(np.abs(restored - volume) <= tolerance)
