"""The locked phase keeps one copy of its bases: the factored optimizer projects with the adapter's own buffers."""

from __future__ import annotations

import pytest
import torch

from lockedopd.adapter.model import locked_layers
from lockedopd.lock.params import select_target_linears
from lockedopd.lock.phases import enter_locked_phase
from lockedopd.models import build_tiny_llama
from lockedopd.subspace import load_basis, save_basis
from lockedopd.subspace.basis import SubspaceBasis

RANK = 4


def _orthonormal(rows: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, RANK, generator=generator))[0]


def _bases(model, mode: str):
    g = torch.Generator().manual_seed(0)
    targets = select_target_linears(model, ["q_proj", "v_proj", "down_proj"])
    pairs = {n: (_orthonormal(m.out_features, g), _orthonormal(m.in_features, g)) for n, m in targets.items()}
    return pairs, {n: SubspaceBasis(V, U, mode) for n, (U, V) in pairs.items()}


@pytest.mark.parametrize("mode", ["right", "two_sided"])
def test_factored_optimizer_uses_the_adapter_buffers(tmp_path, mode):
    model = build_tiny_llama(64, num_layers=1, seed=0)
    pairs, bases = _bases(model, mode)
    path = save_basis(tmp_path / "basis.safetensors", pairs, {"step": 0})
    phase = enter_locked_phase(model, bases, path, None, lr=1e-3, optimizer="factored")
    layers = locked_layers(phase.model)
    for name, basis in phase.optimizer.bases.items():
        layer = layers[name]
        assert basis.V.data_ptr() == layer.locked_V["default"].data_ptr(), name
        assert phase.bases[name].V.data_ptr() == layer.locked_V["default"].data_ptr(), name
        if mode == "two_sided":
            assert basis.U.data_ptr() == layer.locked_U["default"].data_ptr(), name
        else:  # a right-sided lock holds no U in memory (nor does its adapter); the basis file keeps it
            assert basis.U is None and phase.bases[name].U is None and "default" not in layer.locked_U
            assert torch.equal(load_basis(path)[0][name][0], pairs[name][0])
        assert torch.equal(basis.V, pairs[name][1])


def test_a_basis_file_that_differs_from_the_bases_is_refused(tmp_path):
    model = build_tiny_llama(64, num_layers=1, seed=0)
    pairs, bases = _bases(model, "right")
    other = {n: (U, torch.flip(V, dims=[1])) for n, (U, V) in pairs.items()}
    path = save_basis(tmp_path / "basis.safetensors", other, {"step": 0})
    with pytest.raises(ValueError, match="write the basis file from the same bases"):
        enter_locked_phase(model, bases, path, None, lr=1e-3, optimizer="factored")
