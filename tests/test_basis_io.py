"""Tests for lockedopd.subspace.basis_io: the basis.safetensors format."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from lockedopd.subspace.basis_io import check_orthonormal, load_basis, save_basis


def _orth(n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0].to(torch.float32).contiguous()


def _bases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        "model.layers.0.self_attn.q_proj": (_orth(8, 3, 1), _orth(6, 3, 2)),
        "model.layers.0.mlp.down_proj": (_orth(6, 3, 3), _orth(10, 3, 4)),
    }


def test_roundtrip_keys_metadata_and_atomic_overwrite(tmp_path):
    path = tmp_path / "basis.safetensors"
    bases = _bases()
    save_basis(path, bases, {"step": 100})
    save_basis(path, bases, {"step": 200, "rank": 3})  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["basis.safetensors"]  # no temporary file left behind
    loaded, meta = load_basis(path)
    assert meta["rank"] == "3" and meta["step"] == "200" and meta["format"] == "lockedopd.basis.v1"
    assert list(loaded) == sorted(bases)
    for name, (U, V) in bases.items():
        assert loaded[name][0].dtype == torch.float32
        assert torch.equal(loaded[name][0], U) and torch.equal(loaded[name][1], V)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"{n}.{s}" for n in bases for s in "UV")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_basis(tmp_path / "nope.safetensors")


def test_corrupt_file(tmp_path):
    path = tmp_path / "basis.safetensors"
    save_basis(path, _bases(), {"step": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_basis(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_basis(path)


def test_key_without_partner(tmp_path):
    path = tmp_path / "basis.safetensors"
    save_file({"lin.U": _orth(4, 2)}, str(path), metadata={"rank": "2", "step": "1"})
    with pytest.raises(ValueError, match=r"'lin\.V'.*missing"):
        load_basis(path)


def test_bad_suffix_and_rank_disagreement(tmp_path):
    path = tmp_path / "basis.safetensors"
    save_file({"lin.W": _orth(4, 2)}, str(path), metadata={"step": "1"})
    with pytest.raises(ValueError, match=r"not ending in '\.U' or '\.V'"):
        load_basis(path)
    save_file({"lin.U": _orth(4, 2), "lin.V": _orth(5, 3)}, str(path), metadata={"step": "1"})
    with pytest.raises(ValueError, match=r"module 'lin' disagree on the rank: U has shape \(4, 2\).*\(5, 3\)"):
        load_basis(path)
    save_file({"lin.U": _orth(4, 2), "lin.V": _orth(5, 2)}, str(path), metadata={"rank": "3", "step": "1"})
    with pytest.raises(ValueError, match="metadata says rank=3"):
        load_basis(path)


def test_non_orthonormal_rejected_on_load_and_save(tmp_path):
    path = tmp_path / "basis.safetensors"
    U = _orth(8, 3) * 1.5
    with pytest.raises(ValueError, match=r"'lin\.U'.*not have orthonormal columns: max \|MᵀM - I\| = 1\.25"):
        save_basis(path, {"lin": (U, _orth(6, 3))}, {"step": 1})
    save_basis(path, {"lin": (U, _orth(6, 3))}, {"step": 1}, check=False)
    with pytest.raises(ValueError, match=r"'lin\.U'.*orthonormal"):
        load_basis(path)
    bases, _ = load_basis(path, check=False)
    assert torch.allclose(bases["lin"][0], U)


def test_save_argument_errors(tmp_path):
    path = tmp_path / "basis.safetensors"
    with pytest.raises(ValueError, match="lacks 'step'"):
        save_basis(path, _bases(), {"rank": 3})
    with pytest.raises(ValueError, match="metadata rank='2' does not match the bases' rank 3"):
        save_basis(path, _bases(), {"rank": 2, "step": 0})
    with pytest.raises(ValueError, match="`bases` is empty"):
        save_basis(path, {}, {"step": 0})
    with pytest.raises(ValueError, match="share one rank"):
        save_basis(path, {"a": (_orth(4, 2), _orth(4, 2)), "b": (_orth(4, 3), _orth(4, 3))}, {"step": 0})
    assert not path.exists()


def test_check_orthonormal_reports_module_and_deviation():
    check_orthonormal("ok", _orth(16, 5))
    M = _orth(16, 5)
    M[:, 0] += 0.01 * M[:, 1]
    with pytest.raises(ValueError, match=r"'layers\.3\.V'.*max \|MᵀM - I\| = 0\.01"):
        check_orthonormal("layers.3.V", M)
    with pytest.raises(ValueError, match="cannot be orthonormal in dimension 2"):
        check_orthonormal("wide", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="orthonormal"):
        check_orthonormal("nan", torch.full((4, 2), float("nan")))
