"""Whole training loops side by side: lockedopd's OPD loop against TRL's ``DistillationTrainer`` on the same work.

    python benchmarks/loop_vs_trl.py [--steps 6] [--out benchmarks/results/loop_vs_trl] [--runs trl_full,...]

The work (issue 14's anchor): the SmolLM2-135M-Instruct teacher (30 layers, in process, HF) and its layer-pruned
student (every third layer dropped, 20 layers), 8 prompts per step from the shipped prompt set, 48 sampled tokens
per completion, reverse KL on the student's samples, AdamW at lr 3e-6 (cosine), on-policy evaluation of 24 held-out
prompts every ``--eval-steps`` steps, one thread. Each run is a fresh interpreter (``--run NAME``), so one run's
allocations cannot hide in another's peak. Runs:

- ``trl_full`` / ``trl_locked``: ``trl.DistillationTrainer`` (``beta=1``: reverse KL; its loss is chunked over the
  vocabulary), full-parameter, or on the lockedopd locked phase (``enter_locked_phase``: the subspace adapter with
  the factored optimizer, passed as ``model=``, ``optimizers=``);
- ``lockedopd_full`` / ``lockedopd_locked``: ``OPDTrainer`` with the default recipe's settings (``chunk_size`` 0),
  locked = the lock at step 0 on a random basis of rank 16 (memory does not depend on which basis);
- ``lockedopd_full_chunked`` / ``lockedopd_locked_chunked``: the same with ``objective.chunk_size`` 64.

Both locked runs use random orthonormal bases of rank 16 (the warmup is not what is measured) and no trajectory
monitor (it takes full gradients every few steps, which TRL has no counterpart of).

Reported per run: peak RSS of the process (``VmHWM``), RSS once models and data are loaded, the peak's growth over
it (what training and evaluation add), seconds per training step and per evaluation. Timings are only comparable
when the runs ran alone on the machine; ``results.json`` records the load average at each run's start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's lockedopd, installed or not
from lockedopd.bench.tables import markdown_table  # noqa: E402

RECIPE = REPO / "recipes" / "configs" / "smollm2_pruned.yaml"
RUNS = ("trl_full", "trl_locked", "lockedopd_full", "lockedopd_locked", "lockedopd_full_chunked",
        "lockedopd_locked_chunked")  # fmt: skip
WORK = {"batch_size": 8, "max_new_tokens": 48, "lr": 3e-6, "eval_size": 24, "rank": 16, "chunk_size": 64, "threads": 1}


def proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} field (this benchmark needs Linux).")


def _lockedopd_overrides(run: str, out: Path, steps: int, eval_steps: int) -> list[str]:
    locked = run.startswith("lockedopd_locked")
    overrides = [
        f"output_dir={out}",
        f"max_steps={steps}",
        f"eval_steps={eval_steps}",
        f"save_steps={steps}",
        f"batch_size={WORK['batch_size']}",
        f"lr={WORK['lr']}",
        f"rollout.max_new_tokens={WORK['max_new_tokens']}",
        f"data.eval_size={WORK['eval_size']}",
        "teacher.backend=hf",
        "eval_sampling_seeds=1",
        "eval_fixed_text=false",
        "monitor.enabled=false",
        "progress=false",
        f"objective.chunk_size={WORK['chunk_size'] if run.endswith('_chunked') else 0}",
        f"lock.enabled={'true' if locked else 'false'}",
    ]
    if locked:
        overrides += ["lock.at_step=0", "lock.basis_source=random", f"lock.rank={WORK['rank']}"]
    return overrides


def run_lockedopd(run: str, out: Path, steps: int, eval_steps: int) -> dict[str, Any]:
    """One ``OPDTrainer`` run; step and evaluation times from its ``metrics.jsonl``."""
    from lockedopd.opd import OPDTrainer, load_config
    from lockedopd.opd.builders import build_run_inputs

    config = load_config(RECIPE, _lockedopd_overrides(run, out, steps, eval_steps))
    inputs = build_run_inputs(config)
    loaded = proc_status_bytes("VmRSS")
    trainer = OPDTrainer(
        config, inputs.student, inputs.tokenizer, inputs.teacher, inputs.train_prompts, inputs.eval_prompts,
        eval_teacher=inputs.eval_teacher,
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_times = [r["step_time_s"] for r in records if "step_time_s" in r]
    evals = [r for r in records if "eval_reverse_kl" in r]
    return {
        "loaded_rss_bytes": loaded,
        "wall_s": wall,
        "step_s": sum(step_times) / len(step_times),
        "evaluations": len(evals),
        "eval_s": (wall - sum(step_times)) / max(len(evals), 1),
        "final_eval_loss": evals[-1]["eval_reverse_kl"] if evals else None,
    }


def _chat(prompts: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def run_trl(run: str, out: Path, steps: int, eval_steps: int) -> dict[str, Any]:
    """One ``DistillationTrainer`` run on the same models, prompts and settings; times from a callback."""
    import warnings

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from lockedopd.lock.params import select_target_linears
    from lockedopd.lock.phases import enter_locked_phase, write_lock_files
    from lockedopd.opd import load_config
    from lockedopd.opd.builders import build_model, build_prompts
    from lockedopd.subspace import SubspaceBasis

    warnings.filterwarnings("ignore", module="trl")
    config = load_config(RECIPE, _lockedopd_overrides("lockedopd_full", out, steps, eval_steps))
    student, tokenizer = build_model(config.student)
    teacher, _ = build_model(config.teacher.model)
    tokenizer.padding_side = "left"
    train, held_out = build_prompts(config)
    train_set = Dataset.from_dict({"prompt": _chat([r.prompt for r in train])})
    eval_set = Dataset.from_dict({"prompt": _chat([r.prompt for r in held_out])})
    optimizers: tuple = (None, None)
    if run == "trl_locked":
        generator = torch.Generator().manual_seed(0)
        targets = select_target_linears(student, config.target_modules)
        bases = {
            name: SubspaceBasis.random(*module.weight.shape, WORK["rank"], "right", generator)
            for name, module in sorted(targets.items())
        }
        basis_path = out / "basis.safetensors"
        write_lock_files(basis_path, bases, {"step": 0, "rank": WORK["rank"], "mode": "right"})
        phase = enter_locked_phase(student, bases, basis_path, None, lr=WORK["lr"], optimizer="factored")
        student, optimizers = phase.model, (phase.optimizer, None)
    loaded = proc_status_bytes("VmRSS")

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.evals: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self._t)

        def on_evaluate(self, args, state, control, **kwargs):
            self.evals.append(time.perf_counter())

    timer = Timer()
    args = DistillationConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=WORK["batch_size"],
        per_device_eval_batch_size=WORK["batch_size"], max_completion_length=WORK["max_new_tokens"],
        learning_rate=WORK["lr"], lr_scheduler_type="cosine", max_grad_norm=1.0, beta=1.0, temperature=1.0,
        eval_strategy="steps", eval_steps=eval_steps, save_strategy="no", logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train_set, eval_dataset=eval_set,
        processing_class=tokenizer, optimizers=optimizers, callbacks=[timer],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    eval_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    return {
        "loaded_rss_bytes": loaded,
        "wall_s": wall,
        "step_s": sum(timer.steps) / len(timer.steps),
        "evaluations": len(timer.evals),
        "eval_s": (wall - sum(timer.steps)) / max(len(timer.evals), 1),
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
    }


def run_one(run: str, out: Path, steps: int, eval_steps: int) -> dict[str, Any]:
    """Run ``run`` in this process and return its measurements (peak RSS read last)."""
    import torch

    torch.set_num_threads(WORK["threads"])
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    result = (run_trl if run.startswith("trl_") else run_lockedopd)(run, out, steps, eval_steps)
    result["peak_rss_bytes"] = proc_status_bytes("VmHWM")
    result["peak_growth_bytes"] = result["peak_rss_bytes"] - result["loaded_rss_bytes"]
    return result


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """``results.md``: one row per run, and lockedopd's peaks as ratios to TRL's on the same phase."""
    rows = report["runs"]
    lines = [
        "# Whole training loops: lockedopd vs TRL's DistillationTrainer",
        "",
        f"Work: {report['work']}; {report['steps']} steps, evaluation every {report['eval_steps']} steps. "
        "Peak = VmHWM of the run's own process; growth = peak minus RSS once models and data are loaded.",
        "",
    ]
    head = ["run", "peak RSS GiB", "loaded RSS GiB", "growth GiB", "s / step", "s / evaluation", "evaluations",
            "load avg at start"]  # fmt: skip
    lines += markdown_table(head, [
        [name, _gib(r["peak_rss_bytes"]), _gib(r["loaded_rss_bytes"]), _gib(r["peak_growth_bytes"]),
         f"{r['step_s']:.1f}", f"{r['eval_s']:.1f}", r["evaluations"], f"{r['load_average']:.2f}"]
        for name, r in rows.items()
    ])  # fmt: skip
    busiest = max(r["load_average"] for r in rows.values()) if rows else 0.0
    if busiest > (os.cpu_count() or 1) * 0.75:
        lines += ["", f"Runs started at load averages up to {busiest:.1f} on {os.cpu_count()} cores: the timings are "
                  "contended (compare them only within this table); the memory figures are not affected."]  # fmt: skip
    ratios = report.get("ratios_to_trl", {})
    if ratios:
        head = ["lockedopd run", "peak / TRL's peak (same phase)"]
        lines += ["", *markdown_table(head, [[name, f"{value:.3f}"] for name, value in ratios.items()])]
    return "\n".join(lines) + "\n"


def ratios_to_trl(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each lockedopd run's peak RSS over TRL's run of the same phase (full or locked)."""
    out = {}
    for name, row in rows.items():
        if not name.startswith("lockedopd_"):
            continue
        phase = "locked" if "_locked" in name else "full"
        trl = rows.get(f"trl_{phase}")
        if trl:
            out[name] = row["peak_rss_bytes"] / trl["peak_rss_bytes"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval-steps", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loop_vs_trl"))
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # child mode: one run, JSON to --json
    parser.add_argument("--json", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.steps < 1 or opts.eval_steps < 1:
        parser.error("--steps and --eval-steps must be >= 1")
    if opts.run:
        result = run_one(opts.run, Path(opts.json).parent / opts.run, opts.steps, opts.eval_steps)
        Path(opts.json).write_text(json.dumps(result, indent=2))
        return 0
    runs = [r.strip() for r in opts.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    out = Path(opts.out)
    work_dir = out / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    report = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    report.update(work=WORK, steps=opts.steps, eval_steps=opts.eval_steps)
    from tqdm import tqdm

    for run in tqdm(runs, desc="loops", unit="run"):
        child_json = work_dir / f"{run}.json"
        load = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--run", run, "--json", str(child_json), "--steps", str(opts.steps),
               "--eval-steps", str(opts.eval_steps)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        report["runs"][run] = {**json.loads(child_json.read_text()), "load_average": load}
        report["ratios_to_trl"] = ratios_to_trl(report["runs"])
        from lockedopd.runtime.atomic_io import atomic_write_text

        atomic_write_text(results_path, json.dumps(report, indent=2))
        atomic_write_text(out / "results.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
