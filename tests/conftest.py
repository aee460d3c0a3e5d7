import pytest
import torch


def pytest_configure(config):
    # Test models are tiny: one intra-op thread is many times faster than two that fight over 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from tiny import world

    return world(tmp_path_factory)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """Root of a fast build of the embedded demo (corpora, tokenizer, specialist sources, weak, target)."""
    from lightning_fuse.demo import FAST_BUILD, build_demo_assets

    return build_demo_assets(root=tmp_path_factory.mktemp("demo"), **FAST_BUILD)


def pytest_collection_modifyitems(config, items):
    """Skip the ``cuda``-marked tests, with the reason, unless CUDA (or LIGHTNING_FUSE_TEST_DEVICE=cpu) is there."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    from gpu_device import cuda_test_device

    try:
        device, why = cuda_test_device()
    except (RuntimeError, ValueError) as err:  # LIGHTNING_FUSE_TEST_DEVICE=cuda without a GPU, or a typo
        raise pytest.UsageError(str(err)) from None
    if device is None:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def cuda_device():
    """The device a ``cuda``-marked test runs on (see tests/gpu_device.py)."""
    from gpu_device import cuda_test_device

    device, why = cuda_test_device()
    if device is None:
        pytest.skip(why)
    return device
