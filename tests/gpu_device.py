"""Which device the ``cuda``-marked tests run on.

``cuda`` tests run on CUDA when it is available and are skipped otherwise. ``LIGHTNING_FUSE_TEST_DEVICE`` overrides:
``cpu`` runs the same test bodies on the CPU (to check the test code itself where no GPU is lent; bitsandbytes'
8-bit layers and Lightning's ``bf16-mixed`` both run on CPU), ``cuda`` makes a missing GPU an error instead of a
skip (for the GPU check, so that a broken CUDA setup cannot pass as "skipped").
"""

from __future__ import annotations

import os

import torch

DEVICE_ENV = "LIGHTNING_FUSE_TEST_DEVICE"


def cuda_test_device() -> tuple[torch.device | None, str]:
    """``(device, why)``: the device the ``cuda`` tests use, or ``None`` and the reason they are skipped.

    Raises:
        ValueError: ``LIGHTNING_FUSE_TEST_DEVICE`` is neither ``cpu`` nor ``cuda``.
        RuntimeError: ``LIGHTNING_FUSE_TEST_DEVICE=cuda`` but torch sees no CUDA device.
    """
    wanted = os.environ.get(DEVICE_ENV, "").strip().lower()
    if wanted not in ("", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={wanted!r}: use cpu, cuda, or leave it unset (cuda when available)")
    if wanted == "cpu":
        return torch.device("cpu"), f"{DEVICE_ENV}=cpu"
    if torch.cuda.is_available():
        return torch.device("cuda", 0), torch.cuda.get_device_name(0)
    if wanted == "cuda":
        raise RuntimeError(f"{DEVICE_ENV}=cuda but torch {torch.__version__} sees no CUDA device "
                           f"(torch.version.cuda = {torch.version.cuda})")  # fmt: skip
    return None, f"needs a CUDA GPU (torch.cuda.is_available() is False); {DEVICE_ENV}=cpu runs it on the CPU"


def accelerator(device: torch.device) -> str:
    """Lightning's ``accelerator`` name for ``device``."""
    return "gpu" if device.type == "cuda" else "cpu"
