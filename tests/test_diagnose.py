"""End-to-end tests of the streaming diagnose driver, the checkpoint reader and the diagnose CLI."""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from lockedopd.cli.diagnostics import add_diagnose_parser, run_diagnose
from lockedopd.diagnostics import CheckpointReader, diagnose, format_markdown, plot_diagnostics, tensor_counter
from lockedopd.diagnostics import geometry as G


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _model(seed=0):
    return {
        "model.layers.0.self_attn.q_proj.weight": _rand((24, 16), seed),
        "model.layers.0.mlp.down_proj.weight": _rand((16, 32), seed + 1),
        "model.layers.1.self_attn.q_proj.weight": _rand((24, 16), seed + 2),
        "model.layers.1.mlp.down_proj.weight": _rand((16, 32), seed + 3),
        "model.layers.0.input_layernorm.weight": _rand((16,), seed + 4),
        "model.norm.weight": _rand((16,), seed + 5),
    }


def _perturb(sd, seed=100, frac=0.5, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        mask = torch.rand(v.shape, generator=g) < frac
        out[k] = v + scale * torch.randn(v.shape, generator=g) * mask
    return out


def _save_dir(sd, d):
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d


def _save_sharded(sd, d):
    d.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(d / fname))
        weight_map.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _args(base, ft, **kw):
    parser = argparse.ArgumentParser()
    add_diagnose_parser(parser.add_subparsers())
    argv = ["diagnose", str(base), str(ft), "--no-progress"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return parser.parse_args(argv)


def test_identical_checkpoints(tmp_path):
    sd = _model()
    a, b = _save_dir(sd, tmp_path / "a"), _save_dir(sd, tmp_path / "b")
    res = diagnose(a, b, progress=False)
    s = res["summary"]
    assert s["bf16_sparsity"] == 1.0
    assert s["update_density"] == 0.0
    assert s["nss"] == 0.0
    assert s["principal_angle_max_deg"] < 1e-6
    assert s["stable_rank"] is None
    assert s["principal_mask_overlap"] is None and s["low_magnitude_overlap"] is None
    assert s["n_matrices"] == 4
    assert s["n_params"] == sum(v.numel() for v in sd.values())
    assert res["skipped"] == {}
    for m in res["matrices"].values():
        assert m["principal_mask_overlap"] is None and m["nss"] == 0.0
    assert set(res["tensors"]) == {"model.layers.0.input_layernorm.weight", "model.norm.weight"}


def test_doubled_checkpoint(tmp_path):
    sd = _model()
    a = _save_dir(sd, tmp_path / "a")
    b = _save_dir({k: 2 * v for k, v in sd.items()}, tmp_path / "b")
    res = diagnose(a, b, k=8, progress=False)
    s = res["summary"]
    assert abs(s["nss"] - 1.0) < 1e-12
    assert s["principal_angle_max_deg"] < 1e-5
    assert s["bf16_sparsity"] == 0.0
    assert s["update_density"] == 1.0


def test_doubled_stable_rank_equals_base(tmp_path):
    sd = {"w": _rand((20, 12), 3)}
    a = _save_dir(sd, tmp_path / "a")
    b = _save_dir({"w": 2 * sd["w"]}, tmp_path / "b")
    res = diagnose(a, b, progress=False)
    assert res["matrices"]["w"]["stable_rank"] == pytest.approx(G.stable_rank(sd["w"]), rel=1e-9)


def test_rank_r_update_float64(tmp_path):
    r = 3
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(30, 20, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(30, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, r, generator=g, dtype=torch.float64))
    a = _save_dir({"w": w0}, tmp_path / "a")
    b = _save_dir({"w": w0 + u @ v.T}, tmp_path / "b")
    m = diagnose(a, b, progress=False)["matrices"]["w"]
    assert m["stable_rank"] == pytest.approx(r, abs=1e-6)
    # float64 storage: the update is exactly rank r with equal singular values, Hill undefined
    assert m["hill_alpha"] is None


def test_update_on_low_magnitude_and_principal_masks(tmp_path):
    w0 = _rand((40, 24), 5)
    alpha = 0.3
    low = G.low_magnitude_mask(w0, alpha)
    pm = G.principal_mask(w0, rank=8, alpha=alpha)
    w_low = w0.clone()
    w_low[low] += 0.5
    w_pr = w0.clone()
    w_pr[pm] *= 1.5
    base = _save_dir({"w": w0}, tmp_path / "a")
    r = diagnose(base, _save_dir({"w": w_low}, tmp_path / "low"), mask_rank=8, alpha=alpha, progress=False)
    assert r["summary"]["low_magnitude_overlap"] == 1.0
    assert r["matrices"]["w"]["low_magnitude_overlap"] == 1.0
    assert r["summary"]["bf16_sparsity"] == pytest.approx(1 - alpha, abs=1 / w0.numel())
    r = diagnose(base, _save_dir({"w": w_pr}, tmp_path / "pr"), mask_rank=8, alpha=alpha, progress=False)
    assert r["summary"]["principal_mask_overlap"] == 1.0


def test_sharded_equals_unsharded(tmp_path):
    sd = _model()
    ft = _perturb(sd)
    single = _save_dir(sd, tmp_path / "single")
    sharded = _save_sharded(sd, tmp_path / "sharded")
    ft_dir = _save_sharded(ft, tmp_path / "ft")
    r_single = CheckpointReader(single)
    r_sharded = CheckpointReader(sharded)
    assert len(r_sharded.files) == 2
    assert sorted(r_single.keys()) == sorted(r_sharded.keys())
    for k in r_single.keys():
        assert torch.equal(r_single.get(k), r_sharded.get(k))
    a = diagnose(single, ft_dir, k=8, progress=False)
    b = diagnose(sharded, ft_dir, k=8, progress=False)
    assert a["summary"] == b["summary"]
    assert a["matrices"] == b["matrices"]
    # a single .safetensors file path works too
    c = diagnose(single / "model.safetensors", ft_dir, k=8, progress=False)
    assert c["summary"] == a["summary"]
    s = a["summary"]
    assert 0.3 < s["bf16_sparsity"] < 0.7 and 0.3 < s["update_density"] < 0.7
    assert s["nss"] > 0 and s["principal_angle_max_deg"] > 0 and s["stable_rank"] > 1


def test_missing_and_shape_mismatch_are_skipped(tmp_path):
    sd = _model()
    ft = dict(sd)
    del ft["model.norm.weight"]
    ft["model.layers.1.mlp.down_proj.weight"] = _rand((16, 30), 9)
    ft["lm_head.weight"] = _rand((10, 16), 10)
    sd["position_ids"] = torch.arange(8)
    ft["position_ids"] = torch.arange(8)
    res = diagnose(_save_dir(sd, tmp_path / "a"), _save_dir(ft, tmp_path / "b"), progress=False)
    sk = res["skipped"]
    assert sk["model.norm.weight"] == "missing in fine-tuned checkpoint"
    assert sk["lm_head.weight"] == "missing in base checkpoint"
    assert sk["model.layers.1.mlp.down_proj.weight"].startswith("shape mismatch")
    assert "[16, 32]" in sk["model.layers.1.mlp.down_proj.weight"]
    assert sk["position_ids"].startswith("non-floating")
    assert res["summary"]["n_matrices"] == 3
    assert "model.layers.1.mlp.down_proj.weight" not in res["matrices"]
    md = format_markdown(res)
    assert "missing in fine-tuned checkpoint" in md


def test_include_filters(tmp_path):
    sd = _model()
    a, b = _save_dir(sd, tmp_path / "a"), _save_dir(_perturb(sd), tmp_path / "b")
    res = diagnose(a, b, include=r"q_proj", progress=False)
    assert set(res["matrices"]) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    assert res["tensors"] == {} and res["skipped"] == {}
    assert res["settings"]["include"] == "q_proj"
    with pytest.raises(ValueError, match="regex"):
        diagnose(a, b, include="(", progress=False)


def test_cli_json_markdown_and_plot(tmp_path, capsys):
    sd = _model()
    a, b = _save_dir(sd, tmp_path / "a"), _save_dir(_perturb(sd), tmp_path / "b")
    out, png = tmp_path / "out" / "diag.json", tmp_path / "diag.png"
    rc = run_diagnose(_args(a, b, json=out, plot=png, k=8, mask_rank=4, include="layers"))
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "bf16 update sparsity" in stdout and "| matrix |" in stdout
    res = json.loads(out.read_text())
    assert set(res) >= {"summary", "matrices", "skipped", "settings"}
    for key in (
        "bf16_sparsity",
        "update_density",
        "principal_mask_overlap",
        "low_magnitude_overlap",
        "principal_angle_max_deg",
        "nss",
        "stable_rank",
        "n_matrices",
        "n_params",
    ):
        assert key in res["summary"]
    for m in res["matrices"].values():
        for key in (
            "bf16_sparsity",
            "update_density",
            "principal_angle_max_deg",
            "principal_angle_mean_deg",
            "nss",
            "stable_rank",
            "hill_alpha",
            "principal_mask_overlap",
            "low_magnitude_overlap",
        ):
            assert key in m
        assert 0 <= m["bf16_sparsity"] <= 1 and 0 <= m["principal_mask_overlap"] <= 1
    assert res["settings"]["k"] == 8 and res["settings"]["mask_rank"] == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # per-matrix plot path (no layer indices)
    plot_diagnostics(diagnose(a, b, include="norm", progress=False), tmp_path / "p2.png")


def _assert_clean_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0]
    return lines[0]


def test_corrupt_file_clean_error(tmp_path, capsys):
    sd = _model()
    a = _save_dir(sd, tmp_path / "a")
    b = _save_dir(sd, tmp_path / "b")
    f = b / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="model.safetensors"):
        CheckpointReader(b)
    _assert_clean_error(capsys, run_diagnose(_args(a, b)), str(f))
    f.write_bytes(b"\x00garbage")
    _assert_clean_error(capsys, run_diagnose(_args(a, b)), str(f))


def test_missing_path_and_bad_index(tmp_path, capsys):
    sd = _model()
    a = _save_dir(sd, tmp_path / "a")
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        CheckpointReader(missing)
    _assert_clean_error(capsys, run_diagnose(_args(a, missing)), str(missing), "expected")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CheckpointReader(empty)
    sh = _save_sharded(sd, tmp_path / "sh")
    idx = sh / "model.safetensors.index.json"
    idx.write_text("{not json")
    with pytest.raises(ValueError, match="index"):
        CheckpointReader(sh)
    _assert_clean_error(capsys, run_diagnose(_args(a, sh)), str(idx))
    idx.write_text(json.dumps({"weight_map": {"x": "model-00009-of-00009.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009"):
        CheckpointReader(sh)
    idx.write_text(json.dumps({"weight_map": {"not.there": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="not.there"):
        CheckpointReader(sh)
    _assert_clean_error(capsys, run_diagnose(_args(a, a, include="(")), "regex")


def test_streaming_peak_live_tensors(tmp_path):
    sd = {f"model.layers.{i}.w": _rand((64, 48), i) for i in range(12)}
    a, b = _save_dir(sd, tmp_path / "a"), _save_dir(_perturb(sd), tmp_path / "b")
    tensor_counter.reset()
    diagnose(a, b, k=8, progress=False)
    assert tensor_counter.loaded == 24
    assert tensor_counter.peak <= 2


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from lockedopd.diagnostics import diagnose, tensor_counter
    torch.set_num_threads(1)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    torch.linalg.svd(torch.randn(64, 64, dtype=torch.float64))  # load LAPACK
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark (VmHWM)
    except OSError:
        pass
    before = status("VmRSS")
    tensor_counter.reset()
    res = diagnose(sys.argv[1], sys.argv[2], k=64, mask_rank=16, progress=False)
    print(json.dumps({"growth_kib": status("VmHWM") - before, "peak_live": tensor_counter.peak,
                      "peak_live_bytes": tensor_counter.peak_bytes, "loaded": tensor_counter.loaded,
                      "n_tensors": res["summary"]["n_tensors"]}))
    """
)


def _measure(a, b):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(a), str(b)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_memory_stays_at_a_few_tensors(tmp_path):
    """~80 MiB checkpoints (80 x 1 MiB tensors + 4 small matrices): peak RSS growth << one model."""
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.v": torch.randn(262144, generator=g) for i in range(80)}
    base.update({f"model.layers.{i}.w": torch.randn(128, 128, generator=g) for i in range(4)})
    a = _save_dir(base, tmp_path / "a")
    b = _save_dir({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / "b")
    model_bytes = sum(v.numel() * 4 for v in base.values())
    del base
    stats = _measure(a, b)
    print(f"\nmemory: {stats}, one model = {model_bytes / 2**20:.1f} MiB")
    assert stats["n_tensors"] == 84 and stats["loaded"] == 168
    assert stats["peak_live"] <= 2
    assert stats["peak_live_bytes"] <= 2 * 262144 * 4
    # measured ~11-25 MiB whatever the model size (20-120 MiB): the per-tensor working set + allocator slack
    assert stats["growth_kib"] * 1024 < 0.5 * model_bytes


@pytest.mark.skipif(not os.environ.get("LOCKEDOPD_DIAG_BENCH"), reason="benchmark: set LOCKEDOPD_DIAG_BENCH=1 (~30 s)")
def test_memory_benchmark_40_matrices_512(tmp_path):
    """The benchmark-note case: 40 tensors of 512x512 float32 per checkpoint (40 MiB each)."""
    n, shape = 40, (512, 512)
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.w": torch.randn(*shape, generator=g) for i in range(n)}
    a = _save_dir(base, tmp_path / "a")
    b = _save_dir({k: v + 0.01 * torch.randn(*shape, generator=g) for k, v in base.items()}, tmp_path / "b")
    del base
    stats = _measure(a, b)
    print(f"\nmemory: {stats}, one model = {n * shape[0] * shape[1] * 4 / 2**20:.0f} MiB")
    assert stats["peak_live"] <= 2


def test_bf16_checkpoints(tmp_path):
    w0 = _rand((20, 16), 21).to(torch.bfloat16)
    w1 = w0.clone()
    w1[0, :4] = w1[0, :4] * 2  # 4 entries changed
    b = _rand((16,), 22).to(torch.bfloat16)
    res = diagnose(_save_dir({"w": w0, "b": b}, tmp_path / "a"), _save_dir({"w": w1, "b": b}, tmp_path / "b"))
    s = res["summary"]
    assert s["bf16_sparsity"] == pytest.approx((20 * 16 + 16 - 4) / (20 * 16 + 16))
    assert s["update_density"] == pytest.approx(4 / 320)
    assert res["matrices"]["w"]["nss"] > 0
