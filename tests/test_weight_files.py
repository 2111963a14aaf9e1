"""Weight files a user hands in: a pickle that would run code, or a damaged file, is refused with an
error that names the file (issue 12.6)."""

from __future__ import annotations

import os

import pytest
import torch

from bunny.model.files import read_tensors


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_malicious_pickle_bin_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "pytorch_model.bin"
    torch.save({"w": _Evil()}, bad)  # pickles os.system into the file (never run: we refuse it)
    with pytest.raises(ValueError) as err:
        read_tensors(bad)
    assert str(bad) in str(err.value) and "weights_only" in str(err.value)


def test_a_truncated_safetensors_names_the_file_and_good_files_load(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2, 3)}, str(good))
    assert torch.equal(read_tensors(good)["w"], torch.ones(2, 3))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ValueError, match=str(cut)):
        read_tensors(cut)
    plain = tmp_path / "plain.bin"
    torch.save({"w": torch.zeros(2)}, plain)
    assert torch.equal(read_tensors(plain)["w"], torch.zeros(2))
