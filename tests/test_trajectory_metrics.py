"""Trajectory metrics on synthetic runs with known answers, plus the trajectory CLI."""

import argparse
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lockedopd.cli.diagnostics import add_trajectory_parser, run_trajectory
from lockedopd.diagnostics import discover_run_checkpoints, final_update_similarity, trajectory_metrics

SHAPES = {"model.layers.0.q.weight": (24, 20), "model.layers.1.q.weight": (18, 20)}
SV = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # rank-4 update spectrum
SCALES = {10: 0.2, 20: 0.5, 30: 1.0}


def _orth(n, k, g):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


def _make_run(root, seed=0, right=None, adapter_step=None):
    """W_t = W_0 + c_t · U_t diag(SV) Vᵀ: left basis changes every step, right subspace V fixed (rank 4)."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    base["model.norm.weight"] = torch.ones(20, dtype=torch.float64)
    vs = right or {n: _orth(s[1], 4, g) for n, s in SHAPES.items()}
    ck = root / "checkpoints"

    def save(step, sd):
        d = ck / f"step-{step:06d}"
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))

    save(0, base)
    for step, c in SCALES.items():
        sd = dict(base)
        for n, s in SHAPES.items():
            u = _orth(s[0], 4, g)
            sd[n] = base[n] + c * (u * SV) @ vs[n].T
        save(step, sd)
    if adapter_step is not None:
        d = ck / f"step-{adapter_step:06d}"
        d.mkdir(parents=True)
        save_file({"lora_A": torch.zeros(2, 2)}, str(d / "adapter.safetensors"))
    return root, vs


def test_fixed_rank4_subspace(tmp_path):
    run, _ = _make_run(tmp_path / "run", adapter_step=40)
    found = discover_run_checkpoints(run)
    assert [s for s, _ in found["checkpoints"]] == [10, 20, 30]
    assert found["base"].name == "step-000000"
    assert len(found["notes"]) == 1 and "step-000040" in found["notes"][0]
    res = trajectory_metrics(found["base"], found["checkpoints"], top_k=16, progress=False)
    assert res["steps"] == [10, 20, 30]
    sr = float((SV**2).sum() / SV[0] ** 2)  # 30/16
    hill = 3 / math.log(4 * 3 * 2)  # top-4 (rank-capped): 1 / mean(log 4, log 3, log 2)
    for rec, c in zip(res["per_step"], SCALES.values()):
        assert rec["subspace_similarity_mean"] == pytest.approx(1.0, abs=1e-9)
        assert rec["stable_rank_median"] == pytest.approx(sr, abs=1e-9)
        assert rec["hill_alpha_median"] == pytest.approx(hill, abs=1e-9)
        assert rec["update_fro_norm"] == pytest.approx(c * math.sqrt(2 * float((SV**2).sum())), rel=1e-9)
        assert rec["n_matrices"] == 2
    assert set(res["matrices"]) == set(SHAPES)
    assert res["skipped"] == {}


def test_partial_overlap_and_reference(tmp_path):
    g = torch.Generator().manual_seed(7)
    q = {n: _orth(s[1], 8, g) for n, s in SHAPES.items()}
    run_a, _ = _make_run(tmp_path / "a", seed=1, right={n: v[:, :4] for n, v in q.items()})
    run_b, _ = _make_run(tmp_path / "b", seed=1, right={n: v[:, [0, 1, 4, 5]] for n, v in q.items()})
    fa, fb = discover_run_checkpoints(run_a), discover_run_checkpoints(run_b)
    ref = final_update_similarity(
        fa["base"], fa["checkpoints"][-1][1], fb["base"], fb["checkpoints"][-1][1], progress=False
    )
    assert ref["mean"] == pytest.approx(0.5, abs=1e-9)
    assert all(v == pytest.approx(0.5, abs=1e-9) for v in ref["matrices"].values())
    # an explicit final from another run: sim(t) = 0.5 for every t
    res = trajectory_metrics(fa["base"], fa["checkpoints"], final=fb["checkpoints"][-1][1], progress=False)
    assert [r["subspace_similarity_mean"] for r in res["per_step"]] == pytest.approx([0.5] * 3, abs=1e-9)


def test_skips_and_include(tmp_path):
    run, _ = _make_run(tmp_path / "run")
    found = discover_run_checkpoints(run)
    res = trajectory_metrics(found["base"], found["checkpoints"], include=r"layers\.1\.", progress=False)
    assert set(res["matrices"]) == {"model.layers.1.q.weight"}
    # a checkpoint lacking a matrix -> skipped with the reason
    odd = tmp_path / "odd"
    odd.mkdir()
    save_file({"model.layers.0.q.weight": torch.zeros(24, 20, dtype=torch.float64)}, str(odd / "model.safetensors"))
    res = trajectory_metrics(found["base"], [*found["checkpoints"], (40, odd)], progress=False)
    assert "missing in checkpoint step 40" in res["skipped"]["model.layers.1.q.weight"]
    assert set(res["matrices"]) == {"model.layers.0.q.weight"}


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_trajectory_parser(parser.add_subparsers())
    return parser.parse_args(["trajectory", *map(str, argv), "--no-progress"])


def test_cli_defaults_and_reference(tmp_path, capsys):
    run, vs = _make_run(tmp_path / "run", adapter_step=40)
    ref, _ = _make_run(tmp_path / "ref", seed=3, right=vs)
    assert run_trajectory(_args(run, "--reference", ref)) == 0
    out = capsys.readouterr()
    assert "| step |" in out.out and "step-000040" in out.err
    res = json.loads((run / "trajectory_metrics.json").read_text())
    assert (run / "trajectory_metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert res["reference"]["mean"] == pytest.approx(1.0, abs=1e-9)
    assert res["notes"] and res["steps"] == [10, 20, 30]
    custom = tmp_path / "o" / "t.json"
    assert run_trajectory(_args(run, "--json", custom, "--plot", tmp_path / "t.png", "--top-k", "2")) == 0
    assert json.loads(custom.read_text())["settings"]["top_k"] == 2


def test_cli_errors(tmp_path, capsys):
    assert run_trajectory(_args(tmp_path / "missing")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "missing" in err
    (tmp_path / "r" / "checkpoints" / "step-000000").mkdir(parents=True)
    assert run_trajectory(_args(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "step-000000" in err
