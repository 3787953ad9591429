"""Supervised fine-tuning in the loop, task accuracy, the matched full-parameter optimizer and built models."""

from __future__ import annotations

import json

import pytest
import torch

from lockedopd.opd import OPDTrainer, load_config
from lockedopd.opd.accuracy import evaluate_accuracy
from lockedopd.opd.objective_registry import ObjectiveInputs, get_objective
from lockedopd.opd.rollout import encode_completions, encode_prompts, rollout_from_completions
from lockedopd.optim import FactoredAdamW, FactoredSubspaceAdamW
from lockedopd.subspace.basis import SubspaceBasis
from lockedopd.tasks import COLUMN_ADDITION
from lockedopd.tasks.base import write_task_splits
from tests.conftest import TINY_CONFIG
from tests.test_trainer import read_metrics


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("column_addition")
    return write_task_splits(COLUMN_ADDITION, out, {"train": 64, "validation": 16, "test": 16}, seed=0)


def sft_config(out, files, *overrides):
    return load_config(
        TINY_CONFIG,
        [
            f"output_dir={out}", "progress=false", "objective.name=sft", "lock.enabled=false", "max_steps=8",
            f"data.train_path={files['train']}", f"data.eval_path={files['validation']}", "eval_steps=8",
            "accuracy.verifier=column_addition", f"accuracy.path={files['test']}", "accuracy.size=8",
            "accuracy.samples=1", "accuracy.batch_size=4", "rollout.max_new_tokens=8", *overrides,
        ],
    )  # fmt: skip


def test_sft_lowers_the_cross_entropy_of_the_given_completions(tmp_path, task_files):
    OPDTrainer.from_config(sft_config(tmp_path / "sft", task_files, "lr=1e-2")).train()
    records = read_metrics(tmp_path / "sft")
    evals = [r["eval_nll"] for r in records if "eval_nll" in r]
    train = [r["nll"] for r in records if "nll" in r]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.5  # held-out completions' NLL falls (4.6 -> ~2.5)
    assert train[-1] < train[0] - 0.5
    assert "reverse_kl" not in records[1] and records[1]["loss"] == pytest.approx(records[1]["nll"])
    assert all("eval_accuracy" in r for r in records if "eval_nll" in r)  # accuracy measured at each evaluation


def test_sft_trains_only_on_completion_tokens(tiny_student, tiny_tokenizer):
    """The loss is the mean NLL of the completion tokens (EOS included); prompt tokens carry none."""
    prompts = encode_prompts(tiny_tokenizer, ["What is 12 + 30?", "What is 5 + 6?"])
    completions = encode_completions(tiny_tokenizer, ["2+0=2\nThe answer is 42.", "11"])
    assert completions[1][-1] == tiny_tokenizer.eos_token_id
    rollout = rollout_from_completions(prompts, completions, None, tiny_tokenizer.pad_token_id,
                                       tiny_tokenizer.eos_token_id)  # fmt: skip
    logits = tiny_student(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits
    expected, count = 0.0, 0
    for row, completion in enumerate(completions):
        start = rollout.prompt_width - 1  # the logit at the last prompt position predicts the first completion token
        for j, token in enumerate(completion):
            expected -= float(torch.log_softmax(logits[row, start + j].detach(), -1)[token])
            count += 1
    from lockedopd.opd.rollout import student_completion_logprobs

    student_lp = student_completion_logprobs(tiny_student, rollout)
    token_lp = student_lp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    inputs = ObjectiveInputs(student_lp, token_lp, rollout.completion_ids, torch.zeros_like(token_lp), None, None,
                             None, torch.zeros_like(token_lp), rollout.completion_mask, None)  # fmt: skip
    loss = get_objective("sft").loss(inputs)
    assert int(rollout.completion_mask.sum()) == count == sum(len(c) for c in completions)
    assert float(loss) == pytest.approx(expected / count, rel=1e-5)
    assert not get_objective("sft").needs_teacher


def test_sft_refuses_records_without_completions_and_teacher_only_settings(tmp_path, task_files):
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "What is 1 + 2?", "answer": "3"}) + "\n")
    with pytest.raises(ValueError, match="have none"):
        OPDTrainer.from_config(sft_config(tmp_path / "x", {**task_files, "train": bare}))
    with pytest.raises(ValueError, match="eval_fixed_text"):
        sft_config(tmp_path / "y", task_files, "eval_fixed_text=true")
    assert not (tmp_path / "x").exists()


def _arith_verifier(completions, answers):
    """A verifier a random tiny model passes sometimes: the completion starts with a digit."""
    return [float(bool(text) and text[0].isdigit()) for text in completions]


def test_accuracy_is_deterministic_under_its_seed_at_any_batch_size(tiny_student, tiny_tokenizer):
    problems = COLUMN_ADDITION.problems("test", 12, seed=0)
    ids = encode_prompts(tiny_tokenizer, [p.prompt for p in problems])
    answers = [p.answer for p in problems]
    args = (tiny_student, tiny_tokenizer, ids, answers, _arith_verifier, 6)
    first = evaluate_accuracy(*args, batch_size=5, samples=4, seed=7)
    again = evaluate_accuracy(*args, batch_size=5, samples=4, seed=7)
    other_batches = evaluate_accuracy(*args, batch_size=16, samples=4, seed=7)
    other_seed = evaluate_accuracy(*args, batch_size=5, samples=4, seed=8)
    assert (first.greedy, first.sampled) == (again.greedy, again.sampled)
    assert (first.greedy, first.sampled) == (other_batches.greedy, other_batches.sampled)
    assert first.sampled != other_seed.sampled and first.greedy == other_seed.greedy
    assert 0.0 < first.sampled < 1.0 and first.problems == 12 and len(first.greedy_correct) == 12
    # the task's own verifier: a model that cannot add scores 0
    real = evaluate_accuracy(tiny_student, tiny_tokenizer, ids, answers, COLUMN_ADDITION.verify, 6, samples=1)
    assert real.greedy == 0.0 and real.sampled == 0.0


def _explicit_factored_adamw(w, grads, lr, b1, b2, eps):
    """The reference: full first moment, row/column sums of g∘g, step m̂ / ((√R̂ + ε)(√(Ĉ/ΣR̂) + ε))."""
    m = torch.zeros_like(w)
    rows, cols = torch.zeros(w.shape[0], dtype=w.dtype), torch.zeros(w.shape[1], dtype=w.dtype)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        rows = b2 * rows + (1 - b2) * (g * g).sum(1)
        cols = b2 * cols + (1 - b2) * (g * g).sum(0)
        r_hat, c_hat = rows / (1 - b2**t), cols / (1 - b2**t)
        denom = torch.outer(r_hat.sqrt() + eps, (c_hat / r_hat.sum()).sqrt() + eps)
        w = w - lr * (m / (1 - b1**t)) / denom
    return w


def test_factored_adamw_equals_the_explicit_reference_and_the_subspace_optimizer_with_a_full_basis():
    out_f, in_f, lr, betas, eps = 6, 9, 0.01, (0.9, 0.99), 1e-8
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2, in_f)
             for _ in range(5)]  # fmt: skip
    w0 = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    opt = FactoredAdamW([w], lr=lr, betas=betas, eps=eps)
    coef = torch.nn.Parameter(torch.zeros(out_f, in_f, dtype=torch.float64))  # ΔW = A·Iᵀ
    sub = FactoredSubspaceAdamW({"w": coef}, {"w": SubspaceBasis(torch.eye(in_f, dtype=torch.float64), None, "right")},
                                lr=lr, betas=betas, eps=eps)  # fmt: skip
    for g in grads:
        w.grad, coef.grad = g.clone(), g.clone()
        opt.step()
        sub.step()
    expected = _explicit_factored_adamw(w0, grads, lr, *betas, eps)
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-12)
    assert torch.allclose(w0 + coef.detach(), expected, rtol=0, atol=1e-12)
    assert float((expected - w0).abs().max()) > 2 * lr  # it moved
    state = opt.state[w]
    assert set(state) == {"step", "exp_avg", "row_sq", "col_sq"} and state["row_sq"].shape == (out_f,)


def test_optimizer_factored_in_the_full_phase_matches_the_reference_to_1e6(tmp_path):
    """The trainer's full phase with optimizer=factored takes FactoredAdamW's steps: replaying the run's own
    gradients through the explicit reference gives its weights to 1e-6."""
    config = load_config(TINY_CONFIG, [f"output_dir={tmp_path / 'f'}", "progress=false", "lock.enabled=false",
                                       "optimizer=factored", "max_steps=3", "lr_scheduler=constant",
                                       "max_grad_norm=0", "eval_steps=0"])  # fmt: skip
    trainer = OPDTrainer.from_config(config)
    assert isinstance(trainer.optimizer, FactoredAdamW)
    name, weight = next(iter(trainer.target_parameters().items()))
    start, grads = weight.detach().clone().double(), []
    original_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append(weight.grad.detach().clone().double())
        return original_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.train()
    expected = _explicit_factored_adamw(start, grads, config.lr, config.adam_beta1, config.adam_beta2,
                                        config.adam_eps)  # fmt: skip
    assert len(grads) == 3
    assert torch.allclose(weight.detach().double(), expected, rtol=0, atol=1e-6), name
    assert float((expected - start).abs().max()) > config.lr  # it moved
    with pytest.raises(ValueError, match="optimizer=factored"):
        load_config(TINY_CONFIG, ["optimizer=factored"])  # the tiny recipe locks: refused with the fix


def test_a_built_model_is_trained_once_and_named_by_its_recipe(tmp_path, task_files, monkeypatch):
    from lockedopd.opd.build import build_model_from_recipe
    from lockedopd.opd.builders import build_model
    from lockedopd.opd.built_models import build_key, built_dir, recipe_config
    from lockedopd.opd.config import ModelConfig

    monkeypatch.setenv("LOCKEDOPD_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text(TINY_CONFIG.read_text())
    overrides = ["objective.name=sft", "lock.enabled=false", "max_steps=4", f"data.train_path={task_files['train']}",
                 f"data.eval_path={task_files['validation']}", "progress=false"]  # fmt: skip
    source = f"built:{recipe}"
    with pytest.raises(FileNotFoundError, match="lockedopd build-model"):
        build_model(ModelConfig(source=source))
    # observing settings do not change the key; training settings do
    key = build_key(recipe_config(recipe, overrides))
    assert build_key(recipe_config(recipe, [*overrides, "eval_steps=1", "output_dir=elsewhere"])) == key
    assert build_key(recipe_config(recipe, [*overrides, "lr=1e-4"])) != key
    import yaml

    data = yaml.safe_load(TINY_CONFIG.read_text())  # the tiny recipe made a plain SFT recipe
    data.update(
        {
            "objective": {"name": "sft"},
            "lock": {"enabled": False},
            "max_steps": 4,
            "progress": False,
            "data": {"train_path": str(task_files["train"]), "eval_path": str(task_files["validation"])},
        }
    )
    data.pop("monitor")
    recipe.write_text(yaml.safe_dump(data))
    directory, record = build_model_from_recipe(recipe)
    assert directory == built_dir(recipe) and (directory / "model.safetensors").is_file()
    assert record["final_evaluation"]["step"] == 4 and "eval_nll" in record["final_evaluation"]
    # the build names the weights it gave and the versions that trained them (a recipe's key names only its inputs)
    from lockedopd.opd.built_models import built_model_identity
    from lockedopd.runtime.provenance import weights_digest

    assert record["weights_sha256"] == weights_digest(directory) and len(record["weights_sha256"]) == 16
    assert record["environment"]["torch"] == torch.__version__
    identity = {"key": directory.name.rsplit("-", 1)[1], "weights_sha256": record["weights_sha256"]}
    assert built_model_identity(source) == identity
    stamp = (directory / "build.json").stat().st_mtime_ns
    again, _ = build_model_from_recipe(recipe)  # cached: not trained again
    assert again == directory and (directory / "build.json").stat().st_mtime_ns == stamp
    model, _ = build_model(ModelConfig(source=source))
    assert model.config.num_hidden_layers == 2
    pruned, _ = build_model(ModelConfig(source=source, drop_every=2))
    assert pruned.config.num_hidden_layers == 1
    # an anchor trained from the built model, pruned: its key follows the inner recipe's, its export stays pruned
    anchor = tmp_path / "anchor.yaml"
    anchor.write_text(yaml.safe_dump({**data, "max_steps": 2, "student": {"source": source, "keep_layers": [1]}}))
    anchor_key = build_key(recipe_config(anchor))
    anchor_dir, _ = build_model_from_recipe(anchor)
    assert anchor_dir.name.endswith(anchor_key)
    student, _ = build_model(ModelConfig(source=f"built:{anchor}"))
    assert student.config.num_hidden_layers == 1
    recipe.write_text(yaml.safe_dump({**data, "lr": data.get("lr", 1e-3) * 2}))  # the inner model changes
    assert build_key(recipe_config(anchor)) != anchor_key
    with pytest.raises(FileNotFoundError, match=f"lockedopd build-model {anchor}"):
        build_model(ModelConfig(source=f"built:{anchor}"))


def test_lockedopd_eval_of_a_locked_run_scores_its_last_checkpoint_the_same_twice(tmp_path, task_files):
    import json

    from lockedopd.cli import main
    from lockedopd.opd.run_checkpoint import load_run_model

    run = tmp_path / "run"
    config = load_config(
        TINY_CONFIG,
        [f"output_dir={run}", "progress=false", "max_steps=6", "lock.at_step=4", "save_steps=3", "eval_steps=6",
         f"data.train_path={task_files['train']}", f"data.eval_path={task_files['validation']}",
         "rollout.max_new_tokens=8"],
    )  # fmt: skip
    trainer = OPDTrainer.from_config(config)
    trainer.train()
    model, _, step = load_run_model(run)
    ids = torch.tensor([trainer.train_ids[0]])
    with torch.no_grad():  # the locked update is folded into the checkpoint's weights
        assert step == 6 and (model(ids).logits - trainer.model(ids).logits).abs().max() < 1e-5
    argv = ["eval", str(run), "--data", str(task_files["test"]), "--verifier", "column_addition", "--size", "8",
            "--samples", "2", "--max-new-tokens", "8", "--batch-size", "4"]  # fmt: skip
    reports = []
    for name in ("a.json", "b.json"):
        assert main([*argv, "--json", str(tmp_path / name)]) == 0
        reports.append(json.loads((tmp_path / name).read_text()))
    assert reports[0] == reports[1] and reports[0]["checkpoint_step"] == 6 and reports[0]["problems"] == 8
    assert 0.0 <= reports[0]["greedy_accuracy"] <= 1.0 and reports[0]["samples"] == 2
    assert main([*argv, "--markdown", str(tmp_path / "eval.md")]) == 0
    table = (tmp_path / "eval.md").read_text().splitlines()
    assert table[0] == "| target | data | verifier | problems | greedy | sampled |" and len(table) == 3
    greedy, sampled = reports[0]["greedy_accuracy"], reports[0]["sampled_accuracy"]
    assert table[2].endswith(f"| 8 | {greedy:.3f} | mean@2: {sampled:.3f} |")
