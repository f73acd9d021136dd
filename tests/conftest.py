"""Shared test helpers: the scripts folder on sys.path, tiny NIfTIs and a way to run a script."""
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

# one thread in every test, run in this process or in a subprocess: float sums depend on the thread
# count, so runs are bit-identical only at equal thread counts (and two cores are all CI has)
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# in CI the property tests draw the same examples every run, so a red build is reproducible; locally they
# draw new ones (and hypothesis keeps any failing example in .hypothesis/ to try first next time)
if os.environ.get("CI"):
    from hypothesis import settings
    settings.register_profile("ci", derandomize=True)
    settings.load_profile("ci")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
sys.path.insert(0, SCRIPTS)
from common import DEFAULT_MODEL  # noqa: E402  (the tests import it from here)


def run_script(name, *args, cwd=None, check=True):
    """Run scripts/<name>.py with --name=value arguments; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, f"{name}.py"), *args],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_in_process(module, *args):
    """Run an imported script's main() in this process with --name=value arguments, then restore its
    settings: much faster than run_script (no new interpreter to start and import torch into)."""
    import copy
    with pytest.MonkeyPatch.context() as patch:
        for name, value in list(vars(module).items()):
            if not name.startswith("_") and name.islower() and isinstance(
                    value, (bool, int, float, str, list, tuple, dict, type(None))):
                patch.setattr(module, name, copy.deepcopy(value))
        patch.setattr(sys, "argv", [module.__file__, *map(str, args)])
        module.main()


def phantom_volume(shape, seed=0):
    """A smooth head-like phantom (X, Y, Z[, T]) with values in about 0..1000: an ellipse with structure."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    volume = np.zeros(shape[:3], dtype=np.float32)
    for z in range(shape[2]):
        head = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1
        rings = 0.6 + 0.3 * np.sin(6 * x + z * 0.3) * np.cos(5 * y)
        volume[:, :, z] = 800 * head * rings
    if len(shape) == 4:
        volume = np.stack([volume * (1 + 0.01 * t) for t in range(shape[3])], axis=3)
    return volume + rng.normal(0, 5, volume.shape).astype(np.float32)


def write_nifti(path, data, dtype=np.float32, affine=None):
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    return str(path)


@pytest.fixture
def tiny_scan(tmp_path):
    """A 4D 40x36x12x3 NIfTI in tmp_path."""
    return write_nifti(tmp_path / "tiny.nii.gz", phantom_volume((40, 36, 12, 3)))


def assert_one_line_error(result, *fragments):
    """A script failed with exit code non-zero and exactly one line on stderr: 'error: ...fragments...'."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """18 pairs of 24x20 slices: 6 slice positions of a 3-volume scan, 4 of them (12 images) for training."""
    import make_dataset
    folder = tmp_path_factory.mktemp("data")
    scan = write_nifti(folder / "tiny.nii.gz", phantom_volume((24, 20, 8, 3)))
    dataset = folder / "tiny.npz"
    run_in_process(make_dataset, f"--input_paths={scan}", f"--output={dataset}", "--slice_range=1,7",
                   "--target_n_images=1")
    return dataset
