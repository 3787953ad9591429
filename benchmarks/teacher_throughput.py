"""Teacher-scoring throughput: HF in-process vs vLLM engines vs vLLM OpenAI server, same sequences, one run.

Backends: ``hf`` (transformers), ``hidden`` (vLLM pooling engine returning hidden states, the output layer run
here: exact full-vocabulary log-probs), ``engine`` (vLLM prompt log-probs: top-k only), ``server`` (the same
over HTTP).

Run from the vLLM environment (the HF and server rows also work without the engine):

    .venv/bin/python benchmarks/teacher_throughput.py                # SmolLM2 if available, else tiny
    .venv/bin/python benchmarks/teacher_throughput.py --model tiny --num-seqs 32

Writes ``teacher_throughput.json`` and ``teacher_throughput.md`` to ``--out-dir`` (default
``runs/bench/teacher_throughput``) and prints the markdown table. Tokens/s counts every token the teacher
processes (prompt + completion); "scored tok/s" counts completion tokens only. Each backend is timed on
``--repeats`` full passes after one warm-up call; the best pass is reported. Backends run one after the other
(HF first: vLLM lowers the process's torch thread count when it starts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from lockedopd.models import build_tiny_llama, build_tiny_tokenizer, default_cache_dir, load_smollm2
from lockedopd.teachers.hf import HFTeacher


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    p.add_argument("--num-seqs", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--backends", default="hf,hidden,engine,server", help="comma list of hf, hidden, engine, server")
    p.add_argument("--server-wait-s", type=float, default=600)
    p.add_argument("--out-dir", default="runs/bench/teacher_throughput")
    return p.parse_args()


def prepare_model(choice: str):
    """(name, HF model, tokenizer, HF model dir) — SmolLM2 from the cache, or a tiny model saved to a temp dir."""
    if choice in ("auto", "smollm2"):
        try:
            model, tok = load_smollm2()
            return "SmolLM2-135M-Instruct", model, tok, str(default_cache_dir() / "smollm2-135m-instruct")
        except (FileNotFoundError, ImportError, ValueError) as exc:
            if choice == "smollm2":
                raise
            print(f"SmolLM2 unavailable ({exc}); using the tiny model", file=sys.stderr)
    tok = build_tiny_tokenizer()
    # head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... (not the default tiny's 8)
    model = build_tiny_llama(
        len(tok),
        num_layers=4,
        hidden_size=128,
        num_heads=4,
        intermediate_size=256,
        max_position_embeddings=1024,
        tokenizer=tok,
    )
    path = tempfile.mkdtemp(prefix="lockedopd-bench-tiny-")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return "tiny-llama (4x128)", model, tok, path


def make_batch(vocab: int, n: int, prompt_len: int, completion_len: int, seed: int = 0):
    """Ragged random sequences: prompt and completion lengths vary in [50%, 100%] of the given sizes."""
    g = torch.Generator().manual_seed(seed)
    seqs, plens = [], []
    for _ in range(n):
        p = int(torch.randint(prompt_len // 2, prompt_len + 1, (1,), generator=g))
        c = int(torch.randint(completion_len // 2, completion_len + 1, (1,), generator=g))
        seqs.append(torch.randint(0, vocab, (p + c,), generator=g).tolist())
        plens.append(p)
    return seqs, plens


def time_teacher(teacher, seqs, plens, top_k: int, repeats: int):
    teacher.score(seqs[:2], plens[:2], top_k=top_k)  # warm-up
    best, scores = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        scores = teacher.score(seqs, plens, top_k=top_k)
        best = min(best, time.perf_counter() - start)
    return best, scores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name, model, tok, model_dir = prepare_model(args.model)
    vocab = model.config.vocab_size
    seqs, plens = make_batch(vocab, args.num_seqs, args.prompt_len, args.completion_len)
    total_tokens = sum(len(s) for s in seqs)
    scored_tokens = sum(len(s) - p for s, p in zip(seqs, plens))
    max_model_len = max(len(s) for s in seqs) + 1
    results, reference = [], None

    def record(backend: str, seconds: float, scores, startup_s: float | None, note: str = "") -> None:
        nonlocal reference
        row = {
            "backend": backend,
            "seconds": round(seconds, 4),
            "tokens_per_s": round(total_tokens / seconds, 1),
            "scored_tokens_per_s": round(scored_tokens / seconds, 1),
            "startup_s": None if startup_s is None else round(startup_s, 1),
            # HF's intra-op threads; vLLM's CPU worker binds its own OpenMP threads (see its log)
            "torch_threads": torch.get_num_threads() if backend.startswith("hf") else None,
            "note": note,
        }
        if reference is None:
            reference = scores
        else:
            m = reference.mask
            row["max_abs_diff_vs_first"] = float((scores.token_logprobs - reference.token_logprobs)[m].abs().max())
            if args.top_k:
                row["topk_max_abs_diff_vs_first"] = float(
                    (scores.topk_logprobs - reference.topk_logprobs)[m].abs().max()
                )
        results.append(row)
        print(json.dumps(row), flush=True)

    if "hf" in backends:
        teacher = HFTeacher(model, batch_size=args.hf_batch_size)
        seconds, scores = time_teacher(teacher, seqs, plens, args.top_k, args.repeats)
        record("hf (transformers, fp32)", seconds, scores, None, f"batch_size={args.hf_batch_size}")

    if "hidden" in backends:
        from lockedopd.teachers.vllm_hidden import VLLMHiddenStateTeacher

        start = time.perf_counter()
        hidden = VLLMHiddenStateTeacher(model_dir, max_model_len=max_model_len)
        startup = time.perf_counter() - start
        seconds, scores = time_teacher(hidden, seqs, plens, args.top_k, args.repeats)
        record("vllm hidden states (in-process, fp32)", seconds, scores, startup, "exact full vocabulary")
        del hidden

    if "engine" in backends:
        from lockedopd.teachers.vllm_engine import VLLMTeacher

        start = time.perf_counter()
        engine = VLLMTeacher(model_dir, top_k_max=max(args.top_k, 1), max_model_len=max_model_len - 1)
        startup = time.perf_counter() - start
        seconds, scores = time_teacher(engine, seqs, plens, args.top_k, args.repeats)
        record("vllm engine (in-process, fp32)", seconds, scores, startup, "one LLM.generate per batch")

    if "server" in backends:
        from lockedopd.teachers.vllm_server import VLLMServerTeacher, launch_server, stop_server

        port = free_port()
        proc, log, startup = launch_server(
            model_dir,
            port,
            out_dir / "server.log",
            max_logprobs=args.top_k,
            max_model_len=max_model_len,
            wait_s=args.server_wait_s,
        )
        try:
            client = VLLMServerTeacher(
                f"http://127.0.0.1:{port}", expected_vocab_size=vocab, tokenizer=tok, top_k_max=max(args.top_k, 1)
            )
            seconds, scores = time_teacher(client, seqs, plens, args.top_k, args.repeats)
            record(
                "vllm server (HTTP, fp32)",
                seconds,
                scores,
                startup,
                f"concurrency={client.concurrency}, {client.max_seqs_per_request} seqs/request",
            )
        finally:
            stop_server(proc, log)

    meta = {
        "model": name,
        "num_seqs": args.num_seqs,
        "total_tokens": total_tokens,
        "scored_tokens": scored_tokens,
        "top_k": args.top_k,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    (out_dir / "teacher_throughput.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        f"# Teacher scoring throughput — {name}",
        "",
        f"{args.num_seqs} sequences, {total_tokens} tokens ({scored_tokens} scored), top_k={args.top_k}, "
        f"{os.cpu_count()} CPU cores, best of {args.repeats}.",
        "",
        "| backend | seconds | tok/s | scored tok/s | startup s | torch threads | max abs diff vs first | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        diff = r.get("max_abs_diff_vs_first")
        lines.append(
            f"| {r['backend']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['scored_tokens_per_s']:.0f} | "
            f"{'' if r['startup_s'] is None else r['startup_s']} | {r['torch_threads'] or ''} | "
            f"{'' if diff is None else f'{diff:.2e}'} | {r['note']} |"
        )
    markdown = "\n".join(lines) + "\n"
    (out_dir / "teacher_throughput.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
