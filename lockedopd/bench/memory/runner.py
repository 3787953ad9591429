"""Memory and speed of OPD training methods, side by side in one run, on one student and one fixed batch.

    python benchmarks/memory_speed.py benchmarks/experiments/smollm2.yaml [--out DIR] [--methods full,lora]

Methods (:data:`~lockedopd.bench.memory.methods.METHOD_SPECS`, ``defaults.yaml``): full OPD (the ``adamw`` entry
of ``FULL_OPTIMIZERS`` on every target weight); the subspace-locked adapter, right-sided and two-sided, with the
default ``lock.optimizer=factored`` (``locked_right_adamw``: ``coefficients``, :class:`~lockedopd.LockedAdamW`),
alone, with the loss over chunks of ``objective.chunk_size`` tokens (``_chunked``), with activation checkpointing of
the decoder layers (``_ckpt``) or both; LoRA on the same targets (the ``lora`` entry of ``LOCK_METHODS``);
GaLore-style projected full-parameter training (``LockedAdamW`` projected mode, fixed basis); the real GaLore AdamW
(the ``galore`` entry) when ``galore-torch`` imports; ``inference``, the floor: the same forward under ``no_grad``,
no optimizer; and ``full_<name>`` / ``lock_<name>`` for any registered full-parameter optimizer or lock method.
Each method runs in a fresh process (``isolation: fork``) that builds the student and the synthetic OPD batch from
the same seed, then runs ``steps.warmup`` untimed and ``steps.timed`` timed optimizer steps (forward + the library's
exact reverse-KL loss against a fixed teacher log-prob tensor + backward + optimizer step), then one instrumented
step.

Measured per method: trainable parameters, Adam coordinates (entries of one moment tensor), parameter, gradient,
optimizer-state and basis bytes (counted from the tensors themselves, after the steps), their sum (training state);
peak RSS growth over the steps (``VmHWM`` reset through ``/proc/self/clear_refs``; the weights, memory-mapped from
the checkpoint, are read once before the baseline so that it does not count loading them) and the same without
file-backed pages (``peak anon``: code pages the first step maps in); from the instrumented step, the bytes autograd
saves for backward by component (attention, MLP, norms, checkpointed layer inputs, logits and loss) and the peak of
the live tensors the step creates; seconds per step; ratios to full OPD and to the inference row; and ``lockedopd
plan``'s prediction of the same bytes (measured / planned). Writes ``results.json``, ``results.md`` and
``memory.png`` to ``--out`` (default ``benchmarks/results/<experiment>/``). Timings on a shared CPU are noisy:
compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
from pathlib import Path
from typing import Any

from lockedopd.bench.memory.config import BENCH_DIR, ISOLATIONS, load_config
from lockedopd.bench.memory.methods import METHODS
from lockedopd.bench.memory.plan import add_plan
from lockedopd.bench.memory.plot import plot_memory
from lockedopd.bench.memory.report import add_ratios, markdown_report
from lockedopd.bench.memory.workers import preload_modules, run_method

__all__ = ["build_report", "environment", "main", "model_summary", "run", "write_outputs"]


def model_summary(config: dict, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """The student in one line, its number of target matrices and their weights."""
    m = config["model"]
    if m["source"] == "tiny":
        description = (
            f"random Llama ({m['num_layers']} layers, hidden {m['hidden_size']}, "
            f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']})"
        )
    else:
        layers = len({n.split(".layers.")[1].split(".")[0] for n in shapes})
        d = m["drop_every"]
        drop = f"; layers {d}, {2 * d}, ... (1-based) dropped" if d else ""
        description = f"SmolLM2-135M-Instruct ({layers} of 30 layers{drop})"
    return {
        "description": description,
        "num_targets": len(shapes),
        "target_weights": sum(o * i for o, i in shapes.values()),
    }


def environment() -> dict[str, Any]:
    """Versions, machine and allocator setting of this run."""
    from lockedopd.runtime.provenance import package_versions

    galore = importlib.util.find_spec("galore_torch")
    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        **package_versions(("torch", "transformers", "peft")),  # python, torch, transformers, peft
        "galore_torch_installed": galore is not None,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        # glibc's allocator: unset = dynamic mmap threshold (freed mid-sized blocks stay resident); a number = fixed
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def write_outputs(report: dict, out_dir: Path) -> None:
    """Write ``results.json``, ``results.md`` and ``memory.png`` of ``report`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_report(report))
    plot_memory(report, out_dir / "memory.png")


def build_report(config: dict, env: dict, results: dict[str, dict], shapes: dict, skipped: dict, failed: dict) -> dict:
    """The report of the methods measured so far: their records with ratios and plan, and what did not run."""
    add_ratios(results)
    add_plan(results, config)
    report = {
        "config": config,
        "environment": env,
        "model": model_summary(config, shapes),
        "target_shapes": shapes,
        "results": results,
        "skipped": skipped,
    }
    if failed:
        report["failed"] = failed
    return report


def run(config: dict, out_dir: Path, progress: bool = True, keep_going: bool = False) -> dict:
    """Run every configured method, write results.json / results.md / memory.png to ``out_dir``; return the report.

    The outputs are rewritten after every method, so a run stopped part-way keeps what it measured. A method that
    fails stops the run (``RuntimeError`` with its traceback), unless ``keep_going``: then its last error line is
    recorded under ``failed`` and the run goes on.

    With ``isolation: fork`` call this from a process that has not run torch kernels yet (e.g. the CLI): forking
    after OpenMP has started hangs the workers. Use ``spawn`` otherwise.
    """
    from tqdm.auto import tqdm

    if config["isolation"] == "fork":
        preload_modules()
    env = environment()
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    bar = tqdm(config["methods"], desc=f"memory/speed {config['name']}", unit="method", disable=not progress)
    for method in bar:
        bar.set_postfix(method=method)
        status, payload = run_method(method, config)
        if status == "skipped":
            skipped[method] = payload
        elif status == "error" and not keep_going:
            raise RuntimeError(f"benchmark method {method!r} failed:\n{payload}")
        elif status == "error":
            failed[method] = payload.strip().splitlines()[-1]
        else:
            shapes = payload.pop("target_shapes")
            results[method] = payload
        if results:
            write_outputs(build_report(config, env, results, shapes, skipped, failed), out_dir)
    bar.close()
    if not results:
        raise RuntimeError(f"no method was measured: skipped {skipped}, failed {failed}")
    return build_report(config, env, results, shapes, skipped, failed)


def main(argv: list[str] | None = None, bench_dir: Path = BENCH_DIR) -> int:
    """The command line of ``benchmarks/memory_speed.py`` (and ``lockedopd bench EXPERIMENT.yaml``).

    ``bench_dir`` holds, under ``results/``, the default output directories."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="experiment YAML (overrides of lockedopd/bench/memory/defaults.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results/<experiment>/)")
    p.add_argument("--methods", default=None, help=f"comma list, a subset of {','.join(METHODS)}")
    p.add_argument("--isolation", choices=ISOLATIONS, default=None, help="override the config's isolation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--keep-going", action="store_true", help="record a failing method under `failed` and go on")
    p.add_argument("--rerender", action="store_true", help="only rewrite results.md and memory.png from results.json")
    args = p.parse_args(argv)
    if args.rerender:
        out_dir = Path(args.out) if args.out else bench_dir / "results" / Path(args.experiment).stem
        report = json.loads((out_dir / "results.json").read_text())
        (out_dir / "results.md").write_text(markdown_report(report))
        plot_memory(report, out_dir / "memory.png")
        print(markdown_report(report))
        return 0
    methods = args.methods.split(",") if args.methods else None
    config = load_config(args.experiment, methods)
    if args.isolation:
        config["isolation"] = args.isolation
    out_dir = Path(args.out) if args.out else bench_dir / "results" / config["name"]
    report = run(config, out_dir, progress=not args.no_progress, keep_going=args.keep_going)
    print(markdown_report(report))
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'memory.png'}")
    return 0
