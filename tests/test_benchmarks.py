"""The memory/speed benchmark, end to end on the tiny experiment: exact byte counts, ratios, outputs.

The CLI runs in a fresh interpreter: its workers are forked, and a process that has already run torch's
parallel kernels (this pytest process) must not fork.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lockedopd.bench.memory.config import DEFAULTS

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TINY = BENCH / "experiments" / "tiny.yaml"
LOCKED_RIGHT = (
    "locked_right",
    "locked_right_chunked",
    "locked_right_ckpt",
    "locked_right_ckpt_chunked",
    "locked_right_adamw",
)
LOCKED = (*LOCKED_RIGHT, "locked_two_sided")
FACTORED = ("locked_right", "locked_right_chunked", "locked_right_ckpt", "locked_right_ckpt_chunked")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "memory_speed.py"), str(TINY), "--out", str(out), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


def _tiny_shapes() -> list[tuple[int, int]]:
    """(out, in) of every target weight of the tiny experiment, from its config (not from the run)."""
    defaults = yaml.safe_load((DEFAULTS).read_text())
    model = {**defaults["model"], **(yaml.safe_load(TINY.read_text()).get("model") or {})}
    h, f = model["hidden_size"], model["intermediate_size"]
    per_layer = [(h, h)] * 4 + [(f, h), (f, h), (h, f)]  # q k v o (no GQA), gate up, down
    return per_layer * model["num_layers"]


def _rank() -> int:
    return yaml.safe_load(TINY.read_text())["rank"]


def test_outputs_written(tiny_report):
    out, report = tiny_report
    md = (out / "results.md").read_text()
    for record in report["results"].values():
        assert f"| {record['label']} |" in md
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["config"]["name"] == "tiny"
    assert set(report["results"]) | set(report["skipped"]) == set(report["config"]["methods"])
    assert set(report["skipped"]) <= {"galore"}  # only the optional package may be missing


def test_target_shapes_match_config(tiny_report):
    _, report = tiny_report
    assert sorted(map(tuple, report["target_shapes"].values())) == sorted(_tiny_shapes())
    assert report["model"]["target_weights"] == sum(o * i for o, i in _tiny_shapes())


def test_exact_trainable_and_gradient_sizes(tiny_report):
    _, report = tiny_report
    res, shapes, r = report["results"], _tiny_shapes(), _rank()
    n = len(shapes)
    expected = {
        "full": sum(o * i for o, i in shapes),
        **{method: sum(o * r for o, _ in shapes) for method in LOCKED_RIGHT},
        "locked_two_sided": n * r * r,
        "inference": 0,
        "lora": sum(r * (o + i) for o, i in shapes),
        "projected_right": sum(o * i for o, i in shapes),
    }
    for method, count in expected.items():
        assert res[method]["trainable_params"] == count, method
        assert res[method]["grad_bytes"] == 4 * count, method  # float32 gradients of exactly these tensors
    # the projected optimizers train the full weights but work in r-dimensional coordinates
    assert res["projected_right"]["adam_coords"] == sum(o * r for o, _ in shapes)
    if "galore" in res:
        assert res["galore"]["grad_bytes"] == 4 * expected["full"]
        assert res["galore"]["adam_coords"] == sum(r * max(o, i) for o, i in shapes)


def test_exact_optimizer_state_bytes(tiny_report):
    _, report = tiny_report
    res, shapes, r = report["results"], _tiny_shapes(), _rank()
    n = len(shapes)
    # AdamW: two float32 moments per weight + one float32 step tensor per param
    assert res["full"]["optimizer_state_bytes"] == 2 * 4 * sum(o * i for o, i in shapes) + 4 * n
    # LockedAdamW: two float32 moments per coefficient
    assert res["locked_right_adamw"]["optimizer_state_bytes"] == 2 * 4 * sum(o * r for o, _ in shapes) + 4 * n
    # the library default (FactoredSubspaceAdamW): m of the coefficients + row (out) and column (in) sums of v_W;
    # it projects with the adapter's own V (and U two-sided), so it holds no second copy of the bases
    for method in FACTORED:
        assert res[method]["moment_bytes"] == 4 * sum(o * r + o + i for o, i in shapes), method
        assert res[method]["optimizer_basis_bytes"] == 0, method
        assert res[method]["options"]["optimizer"] == "FactoredSubspaceAdamW"
    assert res["locked_two_sided"]["moment_bytes"] == 4 * sum(r * r + o + i for o, i in shapes)
    assert res["locked_two_sided"]["optimizer_basis_bytes"] == 0
    assert res["inference"]["optimizer_state_bytes"] == 0 and res["inference"]["grad_bytes"] == 0
    assert res["lora"]["optimizer_state_bytes"] == 2 * 4 * sum(r * (o + i) for o, i in shapes) + 4 * 2 * n
    # projected: moments out x r plus the basis V (in x r) held in the optimizer
    assert res["projected_right"]["moment_bytes"] == 2 * 4 * sum(o * r for o, _ in shapes)
    assert res["projected_right"]["optimizer_basis_bytes"] == 4 * sum(i * r for _, i in shapes)
    assert res["projected_right"]["optimizer_state_bytes"] == (
        2 * 4 * sum(o * r for o, _ in shapes) + 4 * sum(i * r for _, i in shapes) + 4 * n
    )
    if "galore" in res:  # projects the smaller side; its projector matrix is r x min(out, in)
        assert res["galore"]["moment_bytes"] == 2 * 4 * sum(r * max(o, i) for o, i in shapes)
        assert res["galore"]["optimizer_basis_bytes"] == 4 * sum(r * min(o, i) for o, i in shapes)


def test_bases_and_parameter_bytes(tiny_report):
    _, report = tiny_report
    res, shapes, r = report["results"], _tiny_shapes(), _rank()
    full_params = res["full"]["param_bytes"]
    for method in ("projected_right", "galore"):
        if method in res:
            assert res[method]["param_bytes"] == full_params  # same model, nothing added
    # adapters add their coefficients as parameters and their frozen bases as buffers
    for method in LOCKED_RIGHT:
        assert res[method]["param_bytes"] == full_params + 4 * sum(o * r for o, _ in shapes)
        assert res[method]["adapter_buffer_bytes"] == 4 * sum(i * r for _, i in shapes)  # V only
    assert res["locked_two_sided"]["param_bytes"] == full_params + 4 * len(shapes) * r * r
    assert res["locked_two_sided"]["adapter_buffer_bytes"] == 4 * sum((o + i) * r for o, i in shapes)  # U and V
    assert res["lora"]["param_bytes"] == full_params + 4 * sum(r * (o + i) for o, i in shapes)
    assert res["full"]["basis_bytes"] == 0 and res["lora"]["basis_bytes"] == 0
    for record in res.values():
        assert record["training_state_bytes"] == (
            record["param_bytes"]
            + record["grad_bytes"]
            + record["optimizer_state_bytes"]
            + record["adapter_buffer_bytes"]
        )


def test_ratios_to_full(tiny_report):
    _, report = tiny_report
    res = report["results"]
    assert all(v == 1.0 for k, v in res["full"]["ratios_to_full"].items() if v is not None)
    for method in (*LOCKED, "lora"):
        q = res[method]["ratios_to_full"]
        for key in (
            "trainable_params",
            "grad_bytes",
            "optimizer_state_bytes",
            "train_overhead_bytes",
            "training_state_bytes",
        ):
            assert q[key] < 1, (method, key)
    for method in ("projected_right", "galore"):
        if method in res:
            q = res[method]["ratios_to_full"]
            assert q["grad_bytes"] == 1.0 and q["trainable_params"] == 1.0
            assert q["optimizer_state_bytes"] < 0.2 and q["training_state_bytes"] < 1
    # two-sided trains r x r per matrix: far fewer coordinates than right-sided
    assert res["locked_two_sided"]["trainable_params"] < res["locked_right"]["trainable_params"]
    expected = res["locked_right"]["optimizer_state_bytes"] / res["full"]["optimizer_state_bytes"]
    assert res["locked_right"]["ratios_to_full"]["optimizer_state_bytes"] == pytest.approx(expected)


def test_same_student_same_batch_and_steps_move(tiny_report):
    _, report = tiny_report
    res = report["results"]
    first = res["full"]["losses"][0]
    steps = report["config"]["steps"]
    for method, record in res.items():
        if method == "inference":
            assert record["losses"] == [] and len(record["mean_token_logprobs"]) == sum(steps.values())
            assert len(set(record["mean_token_logprobs"])) == 1  # no step changes the model
            continue
        # adapters start at ΔW = 0, so every method sees the same loss before its first update
        assert record["losses"][0] == pytest.approx(first, rel=1e-5, abs=1e-6), method
        assert len(record["losses"]) == steps["warmup"] + steps["timed"]
        assert record["losses"][-1] != record["losses"][0], method  # the optimizer changed the model
        assert len(record["step_s"]) == steps["timed"] and record["mean_step_s"] > 0
        if record["peak_rss_delta_bytes"] is not None:
            assert record["peak_rss_delta_bytes"] > 0


def test_unknown_config_key_is_rejected(tmp_path):
    from lockedopd.bench import memory as memory_speed

    bad = tmp_path / "bad.yaml"
    bad.write_text("batch:\n  batch_sise: 4\n")
    with pytest.raises(ValueError, match="batch.batch_sise"):
        memory_speed.load_config(bad)
    bad.write_text("methods: [full, adafactor]\n")
    with pytest.raises(ValueError, match="adafactor"):
        memory_speed.load_config(bad)
    assert memory_speed.load_config(TINY)["rank"] == _rank()


def test_checkpointing_and_chunking_change_memory_not_the_training(tiny_report):
    _, report = tiny_report
    res = report["results"]
    reference = res["locked_right"]["losses"]
    for method in ("locked_right_chunked", "locked_right_ckpt", "locked_right_ckpt_chunked"):
        assert res[method]["losses"] == pytest.approx(reference, rel=1e-5, abs=1e-7), method
    defaults = yaml.safe_load((DEFAULTS).read_text())
    model = {**defaults["model"], **(yaml.safe_load(TINY.read_text()).get("model") or {})}
    batch = {**defaults["batch"], **(yaml.safe_load(TINY.read_text()).get("batch") or {})}
    tokens = batch["batch_size"] * (batch["prompt_tokens"] + batch["completion_tokens"])
    parts = {method: res[method]["saved_bytes_by_component"] for method in LOCKED_RIGHT}
    for method in ("locked_right_ckpt", "locked_right_ckpt_chunked"):
        # checkpointing keeps each decoder layer's input (tokens x hidden float32) and nothing inside the layers
        assert parts[method]["layer_inputs"] == model["num_layers"] * tokens * model["hidden_size"] * 4
        assert parts[method]["attention"] == 0 and parts[method]["mlp"] == 0
    assert parts["locked_right"]["layer_inputs"] == 0
    # unchunked the loss keeps the (B, C, V) float32 log-softmax; chunked no vocabulary-sized tensor
    one_copy = batch["batch_size"] * batch["completion_tokens"] * model["vocab_size"] * 4
    assert parts["locked_right"]["logits_loss"] >= one_copy
    assert parts["locked_right_chunked"]["logits_loss"] < one_copy
    assert res["locked_right_ckpt_chunked"]["saved_bytes"] < res["locked_right"]["saved_bytes"] / 4
    for method in LOCKED:  # the full model's weights keep their inputs for their gradients; frozen ones do not
        assert res[method]["saved_bytes_by_component"]["mlp"] < res["full"]["saved_bytes_by_component"]["mlp"]


def test_inference_row_is_the_floor_and_ratios_to_it(tiny_report):
    _, report = tiny_report
    res = report["results"]
    floor = res["inference"]
    assert floor["saved_bytes"] == 0 and floor["saved_bytes_by_component"] is None
    for method, record in res.items():
        expected = record["peak_live_bytes"] / floor["peak_live_bytes"]
        assert record["ratios_to_inference"]["peak_live_bytes"] == pytest.approx(expected), method
    assert res["full"]["peak_live_bytes"] > res["locked_right"]["peak_live_bytes"] > floor["peak_live_bytes"]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_mmap_threshold_methods_change_the_allocator_not_the_training(tmp_path):
    out = tmp_path / "mmap"
    methods = "full,locked_right,full_mmap,locked_right_mmap"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "memory_speed.py"), str(TINY), "--out", str(out), "--no-progress",
         "--methods", methods],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())["results"]
    for method in ("full", "locked_right"):
        lean, default = res[method + "_mmap"], res[method]
        assert lean["losses"] == default["losses"], method  # the allocator changes no arithmetic
        assert lean["optimizer_state_bytes"] == default["optimizer_state_bytes"]
        assert lean["ratios_to_default_malloc"]["mean_step_s"] == pytest.approx(
            lean["mean_step_s"] / default["mean_step_s"]
        )
        assert "ratios_to_default_malloc" not in default
    # each allocator setting is compared with full OPD under the same setting
    lean_locked = res["locked_right_mmap"]["ratios_to_full"]["optimizer_state_bytes"]
    assert lean_locked == pytest.approx(
        res["locked_right_mmap"]["optimizer_state_bytes"] / res["full_mmap"]["optimizer_state_bytes"]
    )
    assert "mmap threshold fixed at 65,536 bytes" in (out / "results.md").read_text()


def test_make_resident_reads_each_storage_once():
    import torch

    from lockedopd.bench.memory.accounting import make_resident

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 8))
    model[1].weight = torch.nn.Parameter(model[0].weight.t())  # tied: one storage, counted once
    model.register_buffer("table", torch.zeros(3, dtype=torch.bfloat16))
    expected = 4 * (8 * 4 + 4 + 8) + 2 * 3
    assert make_resident(model) == expected
