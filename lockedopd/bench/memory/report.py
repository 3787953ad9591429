"""Ratios between methods, and the results as markdown (rendered from a results dict alone)."""

from __future__ import annotations

from collections.abc import Iterable

from lockedopd.bench.memory.methods import LEAN_MALLOC_SUFFIX, method_spec
from lockedopd.bench.memory.plan import PLAN_KEYS
from lockedopd.bench.tables import markdown_table

__all__ = [
    "CUDA_KEYS",
    "INFERENCE_RATIO_KEYS",
    "MALLOC_RATIO_KEYS",
    "MIB",
    "RATIO_KEYS",
    "add_ratios",
    "markdown_report",
    "on_cuda",
]

RATIO_KEYS = (
    "trainable_params",
    "grad_bytes",
    "optimizer_state_bytes",
    "train_overhead_bytes",
    "training_state_bytes",
    "peak_rss_delta_bytes",
    "peak_anon_delta_bytes",
    "peak_live_bytes",
    "saved_bytes",
    "mean_step_s",
    "min_step_s",
)
#: Measured on a CUDA student only (``device: cuda``): the caching allocator's peak over the steps, its growth first
CUDA_KEYS = ("cuda_peak_delta_bytes", "cuda_peak_bytes")
CUDA_COLUMNS = ["GPU peak Δ", "GPU peak"]
MALLOC_RATIO_KEYS = ("peak_rss_delta_bytes", "peak_anon_delta_bytes", "mean_step_s", "min_step_s")
INFERENCE_RATIO_KEYS = ("peak_rss_delta_bytes", "peak_anon_delta_bytes", "peak_live_bytes")
MIB = 2**20
FULL_RATIO_COLUMNS = ["trainable", "grads", "optimizer state", "training overhead", "training state", "peak RSS Δ",
                      "peak anon Δ", "peak live", "saved", "s/step mean", "s/step min"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- ratios
def _ratios(record: dict, ref: dict, keys: Iterable[str]) -> dict[str, float | None]:
    return {key: (record[key] / ref[key] if record.get(key) is not None and ref.get(key) else None) for key in keys}


def add_ratios(results: dict[str, dict]) -> None:
    """Add ``ratios_to_full`` (value / full OPD's value) when full OPD ran, and ``ratios_to_inference`` (peaks over
    the inference row's) when the inference row ran, each against the reference under the same allocator setting
    (``*_mmap`` methods against ``full_mmap`` / ``inference_mmap``); and for each ``*_mmap`` method whose twin ran,
    ``ratios_to_default_malloc`` (with the mmap threshold / without: memory and seconds per step)."""
    for method, record in results.items():
        lean = method_spec(method).lean_malloc
        suffix = LEAN_MALLOC_SUFFIX if lean else ""
        for reference, keys, field in (
            ("full", RATIO_KEYS, "ratios_to_full"),
            ("inference", INFERENCE_RATIO_KEYS, "ratios_to_inference"),
        ):
            ref = results.get(reference + suffix)
            if ref is not None:
                record[field] = _ratios(record, ref, (*keys, *(key for key in CUDA_KEYS if key in ref)))
        twin = results.get(method.removesuffix(LEAN_MALLOC_SUFFIX)) if lean else None
        if twin is not None:
            record["ratios_to_default_malloc"] = _ratios(record, twin, MALLOC_RATIO_KEYS)


# -------------------------------------------------------------------------------------------------- markdown
def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.2f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else (f"{value:.4f}" if value < 0.01 else f"{value:.3f}")


def on_cuda(results: dict[str, dict]) -> bool:
    """Whether the run measured a CUDA student (its records carry the allocator's peak)."""
    return any("cuda_peak_bytes" in r for r in results.values())


def _device_sentence(report: dict) -> str:
    names = sorted({r["device_name"] for r in report["results"].values() if r.get("device_name")})
    return (
        f" The student trains on the GPU ({', '.join(names)}): *GPU peak* is the CUDA caching allocator's peak over "
        "the steps (torch.cuda.max_memory_allocated, the weights included), *GPU peak Δ* its growth over the bytes "
        "allocated before them; each step's seconds end at a torch.cuda.synchronize (GPU time, not the CPU's). Peak "
        "RSS is the host process's."
    )


def _setup_paragraph(report: dict) -> str:
    c, model, env = report["config"], report["model"], report["environment"]
    b = c["batch"]
    device = _device_sentence(report) if on_cuda(report["results"]) else ""
    return (
        f"Student: {model['description']}; {model['num_targets']} target matrices "
        f"({', '.join(c['target_modules'])}), {model['target_weights']:,} target weights. Rank r = {c['rank']}. "
        f"One fixed synthetic OPD batch: {b['batch_size']} sequences x ({b['prompt_tokens']} prompt + "
        f"{b['completion_tokens']} completion) tokens, exact reverse KL (the library's loss) against a fixed teacher "
        f"log-prob tensor; chunked methods use objective.chunk_size = {c['objective']['chunk_size']}. "
        f"{c['steps']['warmup']} untimed + {c['steps']['timed']} timed steps per method, each method in a fresh "
        f"process ({c['isolation']}); torch {env['torch']}, {c['threads']} torch thread(s), {env['cpu_count']} CPUs "
        f"(load average {env['load_average']} at start), glibc MALLOC_MMAP_THRESHOLD_ "
        f"{env.get('malloc_mmap_threshold') or 'unset (dynamic)'}. Memory is counted from the tensors; seconds are "
        "wall time on a shared CPU (the minimum over the timed steps is the least disturbed), so compare ratios."
        + device
    )


def _absolute_table(results: dict[str, dict]) -> str:
    header = ["method", "trainable params", "Adam coords", "params MiB", "grads MiB", "optimizer state MiB",
              "bases MiB", "training state MiB", "saved MiB", "peak live MiB", "peak RSS Δ MiB", "peak anon Δ MiB",
              "s/step mean", "s/step min"]  # fmt: skip
    rows = [
        [r["label"], f"{r['trainable_params']:,}", f"{r['adam_coords']:,}", _mib(r["param_bytes"]),
         _mib(r["grad_bytes"]), _mib(r["optimizer_state_bytes"]), _mib(r["basis_bytes"]),
         _mib(r["training_state_bytes"]), _mib(r.get("saved_bytes")), _mib(r.get("peak_live_bytes")),
         _mib(r["peak_rss_delta_bytes"]), _mib(r.get("peak_anon_delta_bytes")), f"{r['mean_step_s']:.3f}",
         f"{r['min_step_s']:.3f}"]
        for r in results.values()
    ]  # fmt: skip
    if on_cuda(results):
        header += [f"{column} MiB" for column in CUDA_COLUMNS]
        for row, r in zip(rows, results.values()):
            row += [_mib(r.get(key)) for key in CUDA_KEYS]
    return "\n".join(markdown_table(header, rows, numbers_right=True))


def _section(intro: str, header: list[str], rows: list[list[str]]) -> list[str]:
    return ["", intro, "", *markdown_table(header, rows, numbers_right=True)] if rows else []


def _ratio_rows(results: dict[str, dict], field: str, keys: tuple[str, ...]) -> list[list[str]]:
    return [[r["label"], *(_ratio(r[field].get(k)) for k in keys)] for r in results.values() if r.get(field)]


def _ratio_sections(report: dict) -> list[str]:
    results, threshold = report["results"], report["config"].get("malloc_mmap_threshold")
    threshold = "n/a" if threshold is None else f"{threshold:,}"
    cuda_keys, cuda_columns = (CUDA_KEYS, CUDA_COLUMNS) if on_cuda(results) else ((), [])
    return [
        *_section(
            "Ratios to full OPD (training overhead = gradients + optimizer state + adapter bases; rows with the mmap "
            "threshold against full OPD with it):",
            ["method", *FULL_RATIO_COLUMNS, *cuda_columns],
            _ratio_rows(results, "ratios_to_full", (*RATIO_KEYS, *cuda_keys)),
        ),
        *_section(
            "Ratios to the inference row (the floor: the same forward under no_grad, no optimizer; rows with the mmap "
            "threshold against the inference row with it):",
            ["method", "peak RSS Δ", "peak anon Δ", "peak live", *cuda_columns],
            _ratio_rows(results, "ratios_to_inference", (*INFERENCE_RATIO_KEYS, *cuda_keys)),
        ),
        *_section(
            f"glibc's mmap threshold fixed at {threshold} bytes (`malloc_mmap_threshold`) against "
            "the same method with glibc's default dynamic threshold, same run:",
            ["method", "peak RSS Δ", "peak anon Δ", "s/step mean", "s/step min"],
            _ratio_rows(results, "ratios_to_default_malloc", MALLOC_RATIO_KEYS),
        ),
    ]


def _component_section(results: dict[str, dict]) -> list[str]:
    from lockedopd.diagnostics.components import COMPONENTS

    rows = [
        [r["label"], *(_mib(r["saved_bytes_by_component"][name]) for name in COMPONENTS), _mib(r["saved_bytes"]),
         _mib(r["optimizer_state_bytes"])]
        for r in results.values()
        if r.get("saved_bytes_by_component")
    ]  # fmt: skip
    return _section(
        "Saved for backward by component (MiB, by storage, one forward + loss; *layer inputs* = what activation "
        "checkpointing keeps per decoder layer) and the optimizer state:",
        ["method", *(name.replace("_", " ") for name in COMPONENTS), "saved total", "optimizer"],
        rows,
    )


def _plan_section(results: dict[str, dict]) -> list[str]:
    rows = [
        [r["label"], *(f"{_mib(r[key])} / {_mib(r['plan'][plan_key])} ({_ratio(r['plan_ratio'][key])})"
                       for key, plan_key in PLAN_KEYS.items())]
        for r in results.values()
        if r.get("plan")
    ]  # fmt: skip
    return _section(
        "`lockedopd plan` against the measured step (MiB measured / planned; *step peak* = live tensors one step "
        "creates: activations, loss tensors, gradients):",
        ["method", "saved for backward", "gradients", "optimizer moments", "step peak (live)"],
        rows,
    )


COLUMNS_NOTE = (
    "Columns: *Adam coords* = entries of one Adam moment tensor (the dimension the optimizer works in); "
    "*optimizer state* = moments (factored: m and the row and column sums of v) + step counters + bases the "
    "optimizer holds (projected, GaLore, factored); *bases* = frozen projection matrices wherever they live "
    "(adapter buffers or optimizer state); *training state* = all parameters (frozen included) + gradients + "
    "optimizer state + adapter buffers; *saved* = bytes autograd saves for backward in one forward + loss; *peak "
    "live* = peak of the tensors one step creates (after the first step: the optimizer state already exists); "
    "*peak RSS Δ* = peak resident memory during the steps minus the resident memory before them, with the "
    "weights already resident (activations, gradients, optimizer state, allocator slack, code pages the first "
    "step maps in); *peak anon Δ* = peak RSS Δ minus the growth of file-backed resident pages: the process's own "
    "memory."
)


def markdown_report(report: dict) -> str:
    """The results as markdown: set-up, an absolute table, ratios to full OPD and to inference, saved-for-backward
    bytes by component, and ``lockedopd plan`` against the measured bytes."""
    results = report["results"]
    lines = [
        f"# Memory and speed of OPD methods: `{report['config']['name']}`",
        "",
        _setup_paragraph(report),
        "",
        *_absolute_table(results).split("\n"),
        *_ratio_sections(report),
        *_component_section(results),
        *_plan_section(results),
    ]
    for method, reason in report["skipped"].items():
        lines += ["", f"Skipped `{method}`: {reason}."]
    for method, error in report.get("failed", {}).items():
        lines += ["", f"Failed `{method}`: {error}"]
    accounted = {*results, *report["skipped"], *report.get("failed", {})}
    missing = [m for m in report["config"]["methods"] if m not in accounted]
    if missing:
        lines += ["", f"Not measured (the run stopped before them): {', '.join(f'`{m}`' for m in missing)}."]
    lines += ["", COLUMNS_NOTE, ""]
    return "\n".join(lines)
