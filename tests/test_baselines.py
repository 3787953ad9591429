"""The quality benchmark's baselines run in the same training loop: LoRA (from step 0 and after the warmup), a random
basis, projected full AdamW and GaLore each train, lower held-out KL, count their optimizer state exactly and
resume to the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lockedopd.subspace import SubspaceBasis, subspace_similarity
from tests.test_trainer import final_weights, run

RANK = 4
# the tiny student: 2 layers x (q, k, v, o: 32x32; gate, up: 64x32; down: 32x64)
SHAPES = [(32, 32)] * 8 + [(64, 32)] * 4 + [(32, 64)] * 2

METHODS = {
    "lora": ["lock.adapter=lora", "lock.at_step=0", "lock.lr_scale=10"],
    "lora_after_warmup": ["lock.adapter=lora"],
    "random_basis": ["lock.basis_source=random"],
    "projected_full": ["lock.optimizer=projected_full"],
    "galore": ["lock.enabled=false", "optimizer=galore"],
}
STATE_BYTES = {  # Adam moments (2 x fp32) + one fp32 step per tensor (+ the V bases LockedAdamW keeps)
    "lora": sum(2 * 4 * RANK * (o + i) + 2 * 4 for o, i in SHAPES),
    "lora_after_warmup": sum(2 * 4 * RANK * (o + i) + 2 * 4 for o, i in SHAPES),
    "random_basis": sum(4 * (o * RANK + o + i) + 4 for o, i in SHAPES),  # factored: m, row and column sums, step
    "projected_full": sum(2 * 4 * o * i + 4 * i * RANK + 4 for o, i in SHAPES),
}


def _galore_available() -> bool:
    from lockedopd.optim.galore import load_galore_adamw

    return load_galore_adamw()[0] is not None


GALORE_MISSING = "galore-torch is not installed here (`make install` adds it with pip install --no-deps galore-torch)"


def _skip_without_galore(method: str) -> None:
    if method == "galore" and not _galore_available():
        pytest.skip(GALORE_MISSING)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for method, overrides in METHODS.items():
        if method == "galore" and not _galore_available():
            continue
        path = tmp_path_factory.mktemp(method)
        out[method] = (path, run(path, "save_steps=3", *overrides))
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_every_baseline_trains_and_lowers_held_out_kl(runs, method):
    _skip_without_galore(method)
    path, summary = runs[method]
    assert summary["steps"] == 12
    assert summary["final_reverse_kl"] < summary["initial_reverse_kl"] - 0.05, summary
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    if method in STATE_BYTES:
        assert records[-1]["phase"] == "locked"
        assert records[-1]["optimizer_state_bytes"] == STATE_BYTES[method]
    if method == "lora":
        assert summary["lock_step"] == 0 and {r["phase"] for r in records[1:]} == {"locked"}
    if method == "galore":
        assert (
            records[-1]["phase"] == "full"
            and records[-1]["optimizer_state_bytes"] < records[1].get("trainable_params", 0) * 8
        )  # low-rank moments: far below full AdamW's 8 bytes per weight


def test_lora_baselines_save_a_plain_lora_adapter(runs):
    for method in ("lora", "lora_after_warmup"):
        config = json.loads((runs[method][0] / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == RANK


def test_random_basis_is_random_and_projected_full_stays_in_its_subspace(runs, reference_run_basis):
    random_bases, meta = SubspaceBasis.load_all(runs["random_basis"][0] / "basis.safetensors")
    assert meta["source"] == "random"
    tracked, _ = reference_run_basis
    sims = [subspace_similarity(random_bases[n].V.double(), tracked[n].V.double()) for n in tracked]
    assert max(sims) < 0.6  # a 4-of-32 random subspace: expected similarity 4/32; the tracker's is not that

    path, summary = runs["projected_full"]
    assert summary["lock_step"] == 6
    bases, _ = SubspaceBasis.load_all(path / "basis.safetensors")
    at_lock = load_file(path / "checkpoints" / "step-000006" / "model.safetensors")
    final = final_weights(path)
    for name, basis in bases.items():
        delta = (final[f"{name}.weight"] - at_lock[f"{name}.weight"]).double()
        assert delta.norm() > 0, name
        assert (delta - basis.project(delta)).norm() <= 1e-6 * max(1.0, float(delta.norm())), name


@pytest.fixture(scope="module")
def reference_run_basis(tmp_path_factory):
    path = tmp_path_factory.mktemp("tracked")
    run(path, "max_steps=6", "eval_steps=0")
    return SubspaceBasis.load_all(path / "basis.safetensors")


@pytest.mark.parametrize("method", ["lora", "projected_full", "galore"])
def test_killed_baseline_resumes_to_the_same_weights(runs, tmp_path, method):
    _skip_without_galore(method)
    reference = final_weights(runs[method][0])
    run(tmp_path, "save_steps=3", *METHODS[method], kill_at=8)
    run(tmp_path, "save_steps=3", *METHODS[method], "resume=true")
    resumed = final_weights(tmp_path)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lock.at_step=0"], "0 = lock before the first step needs no warmup update"),
        (["lock.adapter=lora", "lock.mode=two_sided"], "lock.adapter=lora trains a fresh LoRA"),
        (["optimizer=galore"], "optimizer=galore cannot warm up a lock: it is a whole-run baseline"),
        (["lock.adapter=lora", "rollout.backend=vllm"], "set rollout.vllm_locked_sync=full"),
        (["galore.proj_type=full"], "galore.proj_type='full' is not one of"),
    ],
)
def test_baseline_settings_that_cannot_work_are_refused(overrides, message, tmp_path):
    from lockedopd.opd import load_config
    from tests.conftest import TINY_CONFIG

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", *overrides])


def test_the_lock_builds_what_trains_from_the_methods_registry(tmp_path, monkeypatch):
    """The controller enters (and on resume re-enters) whatever ``LOCK_METHODS`` holds under the selected name; the
    lock itself has no branch per baseline."""
    from lockedopd.lock import methods
    from lockedopd.lock.methods import LOCK_METHODS, lock_method_name

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, []
            self.needs_basis, self.frozen_base = inner.needs_basis, inner.frozen_base

        def enter(self, request):
            self.calls.append(("enter", request.lr))
            return self.inner.enter(request)

        def resume(self, request):
            self.calls.append(("resume", request.lr))
            return self.inner.resume(request)

    counting = Counting(LOCK_METHODS["lora"])
    monkeypatch.setitem(LOCK_METHODS, "lora", counting)
    run(tmp_path / "run", *METHODS["lora_after_warmup"], kill_at=9)
    run(tmp_path / "run", *METHODS["lora_after_warmup"], "resume=true")
    assert [kind for kind, _ in counting.calls] == ["enter", "resume"]
    assert counting.calls[0][1] > 0
    lock = json.loads((tmp_path / "run" / "lock.json").read_text())
    assert lock["lock_step"] == 6  # locked once, by the registry's entry, and resumed from the checkpoint after it

    names = {lock_method_name(type("S", (), {"adapter": a, "optimizer": o})()) for a, o in
             [("subspace", "factored"), ("subspace", "coefficients"), ("lora", "factored"),
              ("subspace", "projected_full")]}  # fmt: skip
    assert names == {"subspace", "lora", "projected_full"} == set(methods.LOCK_METHODS)
    with pytest.raises(ValueError, match=r"lock method='nope' is not one of \['subspace', 'lora', 'projected_full'\]"):
        LOCK_METHODS.lookup("nope")
