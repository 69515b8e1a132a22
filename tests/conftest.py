"""Test-wide settings: offline Hub, few threads, opt-in GPU and network tests."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="dreamteacher-tests-datasets-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests use tiny tensors: one thread is as fast, and on a busy 2-core host two threads spin-wait for each other
# (measured here: a tiny UNet forward took 2 s with 2 threads, 10 ms with 1).
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
