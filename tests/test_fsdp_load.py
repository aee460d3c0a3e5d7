"""The FSDP load's reads of a target's safetensors files fail with one line naming the file and the fix (in-process;
the 2-process run in tests/test_distributed.py checks that every rank ends with it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_fuse.errors import error_line
from lightning_fuse.fsdp_load import WeightsFileError, _cast, _file_entries, _file_tensors


def test_a_safetensors_file_cut_short_names_the_file_and_the_fix(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64), "b": torch.randn(64)}, file)
    assert sorted(_file_entries([file])) == ["a", "b"]
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 100)
    for read in (lambda: _file_entries([file]), lambda: _file_tensors([file], ["a"], torch.float32)):
        with pytest.raises(WeightsFileError) as err:
            read()
        line = error_line(err.value)
        assert line.startswith(f"target: cannot read {file} (SafetensorError: "), line
        assert line.endswith("re-save the model with from_pretrained + save_pretrained.") and "\n" not in line


def test_a_cast_that_fails_names_the_tensor_and_the_file():
    packed = torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)  # torch cannot copy it into float32
    with pytest.raises(WeightsFileError, match=r"^target: cannot cast `lm_head.weight` \(torch.float4_e2m1fn_x2\) "
                                               r"of /x/model.safetensors to torch.float32 \(NotImplementedError: "):
        _cast(packed, torch.float32, "lm_head.weight", Path("/x/model.safetensors"))
    assert _cast(torch.ones(2, dtype=torch.int64), torch.float32, "ids", Path("/x")).dtype == torch.int64
