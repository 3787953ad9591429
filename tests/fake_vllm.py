"""A loopback HTTP server that answers like a vLLM 0.32 OpenAI server, computing log-probs with a HF model."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeVLLM:
    """A loopback HTTP server answering ``/v1/models``, ``/v1/completions`` and ``/tokenize`` like vLLM 0.32."""

    def __init__(self, model, tokenizer, name="fake/teacher", max_model_len=65, fail_first=0):
        self.model, self.tokenizer, self.name, self.max_model_len = model.eval(), tokenizer, name, max_model_len
        self.vocab = model.config.vocab_size
        self.fail_first = fail_first  # answer this many requests with 503 first
        self.requests: list[tuple[str, dict | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                fake.requests.append((self.path, None))
                if self.path == "/v1/models":
                    card = {
                        "id": fake.name,
                        "object": "model",
                        "root": "/models/x",
                        "max_model_len": fake.max_model_len,
                    }
                    self._send(200, {"object": "list", "data": [card]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, payload))
                if fake.fail_first > 0:
                    fake.fail_first -= 1
                    return self._send(503, {"error": {"message": "busy"}})
                if self.path == "/tokenize":
                    ids = fake.tokenizer.encode(payload["prompt"], add_special_tokens=payload["add_special_tokens"])
                    return self._send(200, {"count": len(ids), "max_model_len": fake.max_model_len, "tokens": ids})
                if self.path != "/v1/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                prompts = payload["prompt"]
                prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
                bad = [t for p in prompts for t in p if t >= fake.vocab or t < 0]
                if bad:
                    return self._send(
                        400, {"error": {"message": f"Token id {bad[0]} is out of vocabulary", "code": 400}}
                    )
                k = payload.get("prompt_logprobs")
                choices = [fake.choice(i, p, k) for i, p in enumerate(prompts)]
                self._send(200, {"object": "text_completion", "model": fake.name, "choices": choices})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @torch.no_grad()
    def choice(self, index, prompt, k):
        entry = {"index": index, "text": "x", "finish_reason": "length", "prompt_logprobs": None}
        if k is None:
            return entry
        lp = torch.log_softmax(self.model(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
        positions = [None]
        for p in range(1, len(prompt)):
            row, target = lp[p - 1], prompt[p]
            d = {}
            if k:
                values, ids = row.topk(k)
                for r, (v, t) in enumerate(zip(values.tolist(), ids.tolist()), 1):
                    d[str(t)] = {"logprob": v, "rank": r, "decoded_token": "?"}
            rank = int((row > row[target]).sum()) + 1
            d.setdefault(str(target), {"logprob": row[target].item(), "rank": rank, "decoded_token": "?"})
            positions.append(d)
        entry["prompt_logprobs"] = positions
        return entry

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
