"""Test-wide settings (offline Hub, few threads, opt-in GPU and network tests) and the tiny teacher fixtures that
several test files share (their helpers and constants are in tests/tiny.py)."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="dreamteacher-tests-datasets-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests use tiny tensors: one thread is as fast, and on a busy 2-core host two threads spin-wait for each other
# (a tiny UNet forward slows down by orders of magnitude).
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu")
    parser.addoption("--run-network", action="store_true", help="run tests marked network")


def pytest_collection_modifyitems(config, items):
    for marker in ("gpu", "network"):
        if config.getoption(f"--run-{marker}"):
            continue
        skip = pytest.mark.skip(reason=f"needs --run-{marker}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tracker_runs(monkeypatch):
    """(name, config) of every `Accelerator.init_trackers` call in the test; the call itself still happens."""
    import accelerate

    calls, real = [], accelerate.Accelerator.init_trackers

    def init_trackers(self, name, config=None, **kwargs):
        calls.append((name, config))
        return real(self, name, config=config, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "init_trackers", init_trackers)
    return calls


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny teacher folder (tests/tiny.py): unet/ + scheduler/ with 1000 steps."""
    from tests.tiny import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    """A diffusers pipeline-layout folder: unet/ + scheduler/ (500 steps, to prove the config is read)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from tests.tiny import TINY_UNET

    d = tmp_path_factory.mktemp("ddpm")
    torch.manual_seed(0)
    UNet2DModel(**TINY_UNET).save_pretrained(d / "unet")
    DDPMScheduler(num_train_timesteps=500, beta_schedule="linear").save_pretrained(d / "scheduler")
    return d


@pytest.fixture(scope="module")
def teacher(unet_dir):
    """The frozen teacher `unet_dir` holds, built with the defaults at timestep 50 (the fmnist normalisation)."""
    from tests.tiny import MEAN, STD, teacher_config
    from training.teacher.build import build_teacher

    return build_teacher(teacher_config(unet_dir), MEAN, STD)
