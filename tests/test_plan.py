"""`lockedopd plan`: per-device bytes from the model's sizes, checked against bytes counted on the tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from lockedopd.diagnostics.memory import SavedTensorBytes
from lockedopd.lock.params import optimizer_state_bytes
from lockedopd.opd import OPDTrainer, load_config
from lockedopd.opd.chunked_loss import rollout_opd_loss
from lockedopd.opd.rollout import rollout_from_completions
from lockedopd.plan import ARCHITECTURES, architecture_of, plan_memory
from tests.conftest import REPO, TINY_CONFIG

PROMPT, COMPLETION, BATCH = 16, 12, 4
SHAPE = [f"rollout.max_prompt_tokens={PROMPT}", f"rollout.max_new_tokens={COMPLETION}", f"batch_size={BATCH}"]


def full_length_rollout(vocab: int, seed: int = 0):
    """Every prompt and completion at its maximum length: the plan's bound is then the actual size."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (PROMPT,), generator=generator).tolist() for _ in range(BATCH)]
    completions = [torch.randint(3, vocab, (COMPLETION,), generator=generator).tolist() for _ in range(BATCH)]
    return rollout_from_completions(prompts, completions, None, 0, None)


def measured_phase(trainer: OPDTrainer, rollout) -> dict[str, int]:
    """Bytes counted on the live objects after one backward of the configured loss."""
    model = trainer.model
    scores = trainer.teacher.score(rollout.sequences(), rollout.prompt_lengths, **trainer.request)
    model.train()
    with SavedTensorBytes(exclude=[*model.parameters(), *model.buffers()]) as saved:
        out = rollout_opd_loss(model, rollout, scores, trainer.config.objective)
    out.loss.backward()
    trained = trainer.trainable_parameters()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return {
        "weights": sum(p.numel() * p.element_size() for p in trainer.base_model.parameters()),
        "gradients": sum(p.numel() * p.element_size() for p in trained),
        "optimizer_state": optimizer_state_bytes(trainer.optimizer),
        "saved_for_backward_bytes": saved.bytes,
    }


@pytest.mark.parametrize(
    "extra",
    [[], ["objective.chunk_size=8", "gradient_checkpointing=true"], ["objective.name=pg"]],
    ids=["exact-kl", "chunked-checkpointed", "pg"],
)
def test_plan_matches_bytes_counted_on_the_tiny_models(tmp_path, extra):
    overrides = [f"output_dir={tmp_path}", "progress=false", "lock.enabled=true", "lock.at_step=1", *SHAPE, *extra]
    config = load_config(TINY_CONFIG, overrides)
    plan = plan_memory(config)["phases"]
    trainer = OPDTrainer.from_config(config)
    rollout = full_length_rollout(len(trainer.tokenizer))
    measured = {"warmup": measured_phase(trainer, rollout)}
    trainer.step = 1
    _, change = trainer.lock.on_step_end(1, "warmup", trainer.base_model, trainer.optimizer)
    trainer.apply_phase_change(change)
    measured["locked"] = measured_phase(trainer, rollout)
    measured["locked"]["weights"] = sum(
        t.numel() * t.element_size() for t in [*trainer.model.parameters(), *trainer.model.buffers()]
    )
    planned_locked = plan["locked"]
    planned_locked_weights = planned_locked["weights"] + planned_locked["bases"] + planned_locked["adapter"]
    assert measured["warmup"]["weights"] == plan["warmup"]["weights"]
    assert measured["locked"]["weights"] == pytest.approx(planned_locked_weights, rel=0.02)
    for phase in ("warmup", "locked"):
        for key in ("gradients", "optimizer_state"):
            assert measured[phase][key] == pytest.approx(plan[phase][key], rel=0.02), (phase, key)
        saved, planned = measured[phase]["saved_for_backward_bytes"], plan[phase]["saved_for_backward_bytes"]
        assert planned == pytest.approx(saved, rel=0.2), (phase, saved, planned)


def test_architectures_give_the_published_parameter_counts():
    billions = {name: arch.num_parameters() / 1e9 for name, arch in ARCHITECTURES.items()}
    assert billions["smollm2-135m"] == pytest.approx(0.1349, abs=0.001)
    assert billions["qwen3-8b"] == pytest.approx(8.19, abs=0.01)
    assert billions["qwen3-32b"] == pytest.approx(32.76, abs=0.01)
    assert billions["llama-3.1-70b"] == pytest.approx(70.55, abs=0.01)
    assert billions["llama-3.1-405b"] == pytest.approx(405.85, abs=0.1)


def test_plan_of_the_qwen3_recipe_and_the_cli(tmp_path, capsys):
    from lockedopd.cli import main

    recipe = REPO / "recipes" / "configs" / "qwen3_8b_from_32b.yaml"
    config = load_config(recipe, [f"output_dir={tmp_path}"])
    assert architecture_of(config.student) == ARCHITECTURES["qwen3-8b"]
    one = plan_memory(config)
    eight = plan_memory(config, world_size=8, fsdp=True)
    for phase in ("warmup", "locked"):
        assert eight["phases"][phase]["total_bytes"] < one["phases"][phase]["total_bytes"]
    assert one["phases"]["locked"]["total_bytes"] < one["phases"]["warmup"]["total_bytes"]
    assert one["phases"]["warmup"]["teacher"] == 0 and one["teacher_separate_bytes"] > 60e9  # vLLM's own GPUs
    out = tmp_path / "plan.json"
    assert main(["plan", str(recipe), "--world-size", "8", "--fsdp", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["phases"]["locked"]["total_bytes"] == eight["phases"]["locked"]["total_bytes"]
    assert "locked" in capsys.readouterr().out


# ---------------------------------------------- against benchmarks/memory_speed.py (lockedopd.bench.memory)
BENCH = REPO / "benchmarks"
#: Methods whose step `lockedopd plan` models: full OPD (warmup) and the locked phase with each memory option.
PLANNED_METHODS = ("full", "locked_right", "locked_right_chunked", "locked_right_ckpt", "locked_right_ckpt_chunked")


def _memory_speed():
    from lockedopd.bench import memory

    return memory


def _ratios(memory_speed, config: dict, record: dict, method: str) -> dict[str, float]:
    planned = memory_speed.planned_bytes(config, method)
    return {key: record[key] / planned[plan_key] for key, plan_key in memory_speed.PLAN_KEYS.items()}


@pytest.mark.parametrize("method", PLANNED_METHODS)
def test_plan_matches_the_benchmark_step_on_the_tiny_model(method):
    """The benchmark's own step, measured here on its tiny experiment: saved-for-backward bytes within 20%,
    gradients and optimizer moments exact."""
    memory_speed = _memory_speed()
    config = memory_speed.load_config(BENCH / "experiments" / "tiny.yaml")
    config["steps"] = {"warmup": 1, "timed": 1}
    record = memory_speed.measure_method(method, config)
    ratios = _ratios(memory_speed, config, record, method)
    assert ratios["saved_bytes"] == pytest.approx(1.0, abs=0.2), ratios
    assert ratios["grad_bytes"] == pytest.approx(1.0, abs=1e-9) and ratios["moment_bytes"] == pytest.approx(1.0)


def smollm2_plan_ratios(results_json) -> dict[str, dict[str, float]]:
    """Measured / planned bytes of every planned method in a SmolLM2 ``memory_speed.py`` results file."""
    memory_speed = _memory_speed()
    report = json.loads(results_json.read_text())
    config = report["config"]
    assert config["model"]["source"] == "smollm2"
    return {
        method: _ratios(memory_speed, config, record, method)
        for method, record in report["results"].items()
        if method in PLANNED_METHODS and "saved_bytes" in record
    }


def test_plan_matches_the_committed_smollm2_measurement():
    """`lockedopd plan` on the SmolLM2 benchmark's config (sizes only, no weights) against the committed measured
    bytes of each method: saved for backward, gradients, optimizer moments and the live-tensor peak of a step."""
    ratios = smollm2_plan_ratios(BENCH / "results" / "smollm2" / "results.json")
    if not ratios:
        pytest.skip(
            "benchmarks/results/smollm2/results.json predates the saved-bytes columns; rerun "
            "benchmarks/memory_speed.py benchmarks/experiments/smollm2.yaml"
        )
    assert set(PLANNED_METHODS) <= set(ratios), sorted(ratios)
    for method, by_key in ratios.items():
        for key, ratio in by_key.items():
            assert ratio == pytest.approx(1.0, abs=0.2), (method, key, ratio)


def test_plan_counts_the_factored_full_optimizer_as_the_trainer_builds_it(tmp_path):
    """``optimizer: factored`` (full-parameter, Adafactor-factored second moment) is planned as what it holds:
    float32 m per weight plus a row and a column sum per matrix — the bytes the built optimizer reports."""
    overrides = [f"output_dir={tmp_path}", "lock.enabled=false", "optimizer=factored", "max_steps=1", "progress=false"]
    config = load_config(TINY_CONFIG, overrides)
    planned = plan_memory(config)["phases"]["warmup"]["optimizer_state"]
    trainer = OPDTrainer.from_config(config)
    trainer.train()
    assert planned == optimizer_state_bytes(trainer.optimizer) - 4 * len(trainer.trainable_parameters())  # (steps)
    adamw = plan_memory(load_config(TINY_CONFIG, [*overrides[:2], "optimizer=adamw"]))["phases"]["warmup"]
    assert planned < adamw["optimizer_state"]  # m in full, v as sums: about half of AdamW's two moments
