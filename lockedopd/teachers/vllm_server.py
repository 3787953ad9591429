"""Remote teacher: scores student completions through a vLLM OpenAI-compatible server.

Only the standard library is used (``urllib.request`` + a thread pool), so this module imports and runs in the
client process; the server runs wherever vLLM is installed (``make install`` puts it in ``.venv``), e.g.::

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m vllm.entrypoints.openai.api_server \\
        --model ~/.cache/lockedopd/smollm2-135m-instruct --host 127.0.0.1 --port 8000 \\
        --dtype float32 --max-logprobs 20 --enforce-eager

(``scripts/start_vllm_server.sh`` wraps this.) Each sequence is sent as a token-id prompt to
``POST /v1/completions`` with ``max_tokens=1`` and ``prompt_logprobs=top_k``; vLLM answers per choice with
``prompt_logprobs``: one ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` object per prompt position
(``null`` at position 0), the actual token always included, ``-inf`` sent as ``-9999.0``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lockedopd.opd.values import check_server_url
from lockedopd.runtime.vllm_runtime import SERVER_ENV_DEFAULTS
from lockedopd.teachers.prompt_logprobs import PositionLogprobs, PromptLogprobScorer

logger = logging.getLogger(__name__)

#: Text whose tokenization is compared with the server's when a local tokenizer is given.
TOKENIZER_PROBE = "Hello, world! The quick brown fox jumps over 13 lazy dogs.\n  def f(x): return x**2  # ok?"
_OOV_MARKER = "out of vocabulary"
_CLAMPED_NEG_INF = -9999.0  # vLLM's OpenAI server sends -inf prompt log-probs as this value


class VLLMServerUnavailable(ConnectionError):
    """The vLLM server could not be reached (after the bounded retries)."""


class VLLMServerError(RuntimeError):
    """The vLLM server kept answering with a server-side (5xx) error, or sent an unreadable response."""


class _HTTPStatusError(VLLMServerError):
    def __init__(self, status: int, body: str, url: str = "") -> None:
        super().__init__(f"{url} answered HTTP {status}: {' '.join(body.split())[:300]}".strip())
        self.status, self.body = status, body


MAX_RESPONSE_BYTES = 64 << 20
"""Default bound on one response body: a scoring answer is a few MiB at most; more is a wrong server or an attack."""
MAX_LOGPROB = 1e-3
"""A log-probability above this (beyond float rounding of 0) is not one: the answer is refused."""


def server_args(
    model_dir: str, port: int = 8000, max_logprobs: int = 20, max_model_len: int | None = None, dtype: str = "float32"
) -> list[str]:
    """Python arguments that start a vLLM OpenAI server this client can score against (loopback only)."""
    args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1"]
    args += ["--port", str(port), "--dtype", dtype, "--max-logprobs", str(max(max_logprobs, 1)), "--enforce-eager"]
    if max_model_len is not None:
        args += ["--max-model-len", str(max_model_len)]
    return args


def start_command(model_dir: str = "DIR", port: int = 8000) -> str:
    """The shell command that starts a matching vLLM server (for error messages and docs)."""
    env = " ".join(f"{key}={value}" for key, value in SERVER_ENV_DEFAULTS.items())
    return f"{env} .venv/bin/python {shlex.join(server_args(model_dir, port))}"


def launch_server(
    model_dir: str,
    port: int,
    log_path: str | os.PathLike,
    max_logprobs: int = 20,
    max_model_len: int | None = None,
    env: dict[str, str] | None = None,
    wait_s: float = 600.0,
) -> tuple[subprocess.Popen, Any, float]:
    """Start a local vLLM server (this interpreter, output to ``log_path``) and wait until it answers.

    Returns ``(process, log file, seconds to ready)``; stop it with :func:`stop_server`. Raises ``RuntimeError``
    naming the log if the server exits or does not answer ``/v1/models`` within ``wait_s``.
    """
    env = {**SERVER_ENV_DEFAULTS, **os.environ, **(env or {})}
    log = open(log_path, "w")
    args = server_args(model_dir, port, max_logprobs, max_model_len)
    proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"vLLM server exited with {proc.returncode}; see {log_path}")
        try:
            with opener.open(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc, log, time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > wait_s:
            stop_server(proc, log)
            raise RuntimeError(f"vLLM server not ready after {wait_s:.0f} s; see {log_path}")
        time.sleep(1)


def stop_server(proc: subprocess.Popen, log: Any) -> None:
    """Terminate a server from :func:`launch_server` (kill after 30 s) and close its log."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def parse_prompt_logprobs(raw: Sequence[dict[str, Any] | None] | None) -> list[PositionLogprobs | None] | None:
    """One choice's ``prompt_logprobs`` JSON → ``[{token_id: (logprob, rank)} | None]``.

    Keys are token ids as strings (``"123"``); the ``"token_id:123"`` form is accepted too.
    """
    if raw is None:
        return None
    out: list[PositionLogprobs | None] = []
    for position in raw:
        if position is None:
            out.append(None)
            continue
        entry = {}
        for key, value in position.items():
            try:
                token_id = int(str(key).rsplit(":", 1)[-1])
                if isinstance(value, dict):
                    logprob, rank = float(value["logprob"]), value.get("rank")
                else:  # a bare number
                    logprob, rank = float(value), None
            except (KeyError, TypeError, ValueError) as exc:
                raise VLLMServerError(f"unreadable prompt_logprobs entry {key!r}: {value!r} ({exc})") from None
            if logprob <= _CLAMPED_NEG_INF:
                logprob = -math.inf
            elif not math.isfinite(logprob) or logprob > MAX_LOGPROB:
                raise VLLMServerError(
                    f"the server sent log-prob {logprob} for token {token_id} at prompt position {len(out)}; a "
                    "log-probability is finite and <= 0, so the teacher's answer is refused (check the served model "
                    "and its dtype)."
                )
            entry[token_id] = (logprob, None if rank is None else int(rank))
        out.append(entry)
    return out


class VLLMServerTeacher(PromptLogprobScorer):
    """Scores student completions with a running vLLM OpenAI-compatible server (top-k log-probs only).

    Args:
        base_url: the server's root URL (``/v1/...`` is appended).
        model: the served model name; ``None`` picks the only served model. A name that the server does not
            serve (neither as its id nor as its root path) is a ``ValueError``.
        timeout_s: per-request timeout in seconds.
        max_retries: retries after a connection error, a timeout or a 5xx answer (4xx answers are not retried).
        backoff_s: first retry delay; it doubles on every retry.
        concurrency: requests in flight at once.
        max_seqs_per_request: sequences packed into one ``/v1/completions`` request (as a list of prompts).
        expected_vocab_size: the student's vocabulary size; checked against the server's by probing token ids
            ``V - 1`` (must be accepted) and ``V`` (must be rejected as out of vocabulary). ``None``: the
            server's vocabulary size is found by bisection with such probes.
        tokenizer: optional local tokenizer (anything with ``encode(text, add_special_tokens=False)``); if given,
            a probe text is tokenized both locally and by the server's ``/tokenize`` and must match.
        top_k_max: the largest ``top_k`` to allow (the server's ``--max-logprobs``, 20 by default).
        max_response_bytes: a longer response body is refused (:data:`MAX_RESPONSE_BYTES` by default).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        model: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        concurrency: int = 4,
        max_seqs_per_request: int = 16,
        expected_vocab_size: int | None = None,
        tokenizer: Any = None,
        top_k_max: int = 20,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        if concurrency < 1 or max_seqs_per_request < 1:
            raise ValueError("VLLMServerTeacher: concurrency and max_seqs_per_request must be >= 1.")
        if max_retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("VLLMServerTeacher: need max_retries >= 0, backoff_s >= 0 and timeout_s > 0.")
        self.base_url = check_server_url(base_url)
        self.max_response_bytes = int(max_response_bytes)
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.concurrency, self.max_seqs_per_request, self.top_k_max = concurrency, max_seqs_per_request, top_k_max
        # never route loopback/cluster traffic through an HTTP(S)_PROXY from the environment
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        try:
            served = self._request("GET", "/v1/models").get("data", [])
        except _HTTPStatusError as exc:
            raise VLLMServerError(
                f"{self.base_url} is not a vLLM OpenAI server ({exc}); point teacher.server_url at one, started with "
                f"{start_command(port=_port_of(self.base_url))}"
            ) from None
        if not served:
            raise VLLMServerError(f"the vLLM server at {self.base_url} lists no models under /v1/models.")
        if model is None:
            if len(served) > 1:
                names = [card.get("id") for card in served]
                raise ValueError(f"VLLMServerTeacher: {self.base_url} serves {names}; pass model=<one of them>.")
            card = served[0]
        else:
            matches = [c for c in served if model in (c.get("id"), c.get("root"))]
            if not matches:
                names = [(c.get("id"), c.get("root")) for c in served]
                raise ValueError(
                    f"VLLMServerTeacher: the vLLM server at {self.base_url} serves {names}, not {model!r}: "
                    "the teacher must be the model you configured; restart the server with "
                    f"`--model {model}` or point teacher.base_url at the right server."
                )
            card = matches[0]
        self.model = str(card["id"])
        max_model_len = card.get("max_model_len")
        # vLLM needs room for the one sampled token after the prompt
        self.max_length = int(max_model_len) - 1 if max_model_len else None

        if expected_vocab_size is not None:
            if not (self._accepts_token(expected_vocab_size - 1) and not self._accepts_token(expected_vocab_size)):
                server_vocab = self._find_vocab_size()
                raise ValueError(
                    f"VLLMServerTeacher: the model served at {self.base_url} ({self.model}) has a vocabulary of "
                    f"{server_vocab} tokens but the student's has {expected_vocab_size}: teacher and student must "
                    "share one tokenizer/vocabulary."
                )
            self.vocab_size = int(expected_vocab_size)
        else:
            self.vocab_size = self._find_vocab_size()
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        """One JSON request with bounded retries on connection errors, timeouts and 5xx answers."""
        url = self.base_url + path
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with self._opener.open(req, timeout=self.timeout_s) as resp:
                    body = resp.read(self.max_response_bytes + 1)
            except urllib.error.HTTPError as exc:
                text = exc.read(64 << 10).decode(errors="replace")
                if exc.code < 500:
                    raise _HTTPStatusError(exc.code, text, url) from None
                last = _HTTPStatusError(exc.code, text, url)
                logger.warning("vLLM server %s answered %s (attempt %d)", url, exc.code, attempt + 1)
                continue
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                last = exc
                logger.debug("vLLM server %s unreachable (attempt %d): %s", url, attempt + 1, exc)
                continue
            if len(body) > self.max_response_bytes:
                raise VLLMServerError(
                    f"{url} answered with more than {self.max_response_bytes} bytes; not a scoring answer (raise "
                    "max_response_bytes only if you send very long sequences)."
                )
            try:
                answer = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise VLLMServerError(f"{url} answered with non-JSON: {body[:200]!r}") from exc
            if not isinstance(answer, dict):
                raise VLLMServerError(f"{url} answered with JSON that is not an object: {body[:200]!r}")
            return answer
        tries = f"{self.max_retries + 1} attempt(s)"
        if isinstance(last, _HTTPStatusError):
            raise VLLMServerError(f"the vLLM server at {url} failed {tries}: {last}") from None
        raise VLLMServerUnavailable(
            f"no vLLM server at {self.base_url} ({url}: {last}; {tries}). Start it from the vLLM environment "
            f"with:\n  {start_command(port=_port_of(self.base_url))}\nor `scripts/start_vllm_server.sh DIR "
            f"{_port_of(self.base_url)}`, or use teacher.backend=hf."
        ) from None

    def _completions(self, prompts: list[list[int]], top_k: int) -> list[list[PositionLogprobs | None] | None]:
        payload = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": top_k,
        }
        try:
            response = self._request("POST", "/v1/completions", payload)
        except _HTTPStatusError as exc:
            hint = ""
            if "logprob" in exc.body:
                hint = f" (is top_k={top_k} above the server's --max-logprobs?)"
            raise ValueError(f"VLLMServerTeacher: the vLLM server rejected the scoring request{hint}: {exc}") from None
        choices = sorted(response.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise VLLMServerError(f"sent {len(prompts)} prompts but the server returned {len(choices)} choices.")
        return [parse_prompt_logprobs(c.get("prompt_logprobs")) for c in choices]

    # ------------------------------------------------------------------ checks
    def _accepts_token(self, token_id: int) -> bool:
        """Whether the server takes ``token_id`` as a prompt token (False if it is out of its vocabulary)."""
        if token_id < 0:
            return False
        payload = {"model": self.model, "prompt": [int(token_id)], "max_tokens": 1, "temperature": 0.0}
        try:
            self._request("POST", "/v1/completions", payload)
        except _HTTPStatusError as exc:
            if exc.status == 400 and _OOV_MARKER in exc.body:
                return False
            raise VLLMServerError(f"vocabulary probe with token {token_id} failed: {exc}") from None
        return True

    def _find_vocab_size(self, upper: int = 1 << 24) -> int:
        """The server's vocabulary size (first rejected token id), found by bisection."""
        if not self._accepts_token(0):
            raise VLLMServerError(f"the vLLM server at {self.base_url} rejects token id 0.")
        lo, hi = 0, upper  # lo accepted; hi assumed rejected
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._accepts_token(mid):
                lo = mid
            else:
                hi = mid
        return hi

    def _check_tokenizer(self, tokenizer: Any) -> None:
        local = [int(t) for t in tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)]
        payload = {"model": self.model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
        try:
            remote = [int(t) for t in self._request("POST", "/tokenize", payload)["tokens"]]
        except _HTTPStatusError as exc:
            logger.warning("VLLMServerTeacher: cannot compare tokenizers, /tokenize failed: %s", exc)
            return
        if local != remote:
            raise ValueError(
                f"VLLMServerTeacher: the server's tokenizer ({self.model}) differs from the local one: "
                f"{TOKENIZER_PROBE!r} → {remote[:12]}… on the server vs {local[:12]}… locally; teacher and student "
                "must share one tokenizer."
            )

    # ------------------------------------------------------------------ scoring
    def _fetch_prompt_logprobs(self, sequences: list[list[int]], top_k: int) -> list:
        """``max_seqs_per_request`` sequences per POST, up to ``concurrency`` requests in flight."""
        step = self.max_seqs_per_request
        chunks = [sequences[s : s + step] for s in range(0, len(sequences), step)]
        if len(chunks) == 1:
            results = [self._completions(chunks[0], top_k)]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks))) as pool:
                results = list(pool.map(lambda chunk: self._completions(chunk, top_k), chunks))
        return [positions for result in results for positions in result]


def _port_of(url: str) -> int:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)
