import pytest
import torch


def pytest_configure(config):
    # Test models are tiny: one intra-op thread is many times faster than two that fight over 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from tiny import world

    return world(tmp_path_factory)
