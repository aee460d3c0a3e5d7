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
