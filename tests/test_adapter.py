"""Tests for the subspace-locked PEFT tuner (lockedopd.adapter)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft import PeftConfig, PeftModel, PeftType, get_peft_model
from torch import nn

import lockedopd.adapter as la
from lockedopd.adapter import SubspaceLockedConfig, SubspaceLockedLayer, SubspaceLockedModel, export_lora
from lockedopd.adapter.registration import extend_enum, register_subspace_locked
from lockedopd.models import build_tiny_llama
from lockedopd.subspace.basis_io import save_basis

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 4


class TwoLinear(nn.Module):
    """Tiny two-layer MLP used for the fast tests."""

    def __init__(self, out_b: int = 5) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(6, out_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def orth(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    """A random n x r matrix with orthonormal columns."""
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0].to(torch.float32).contiguous()


def make_bases(model: nn.Module, suffixes, r: int, seed: int = 0) -> dict:
    """Random orthonormal (U, V) for every nn.Linear whose name ends in one of ``suffixes``."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (orth(m.out_features, r, g), orth(m.in_features, r, g))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] in suffixes
    }


def two_linear(seed: int = 0, **kw) -> TwoLinear:
    """A deterministic TwoLinear."""
    torch.manual_seed(seed)
    return TwoLinear(**kw)


@pytest.fixture
def mlp_basis(tmp_path):
    """Path of a rank-3 basis file for TwoLinear's ``a`` and ``b``."""
    path = tmp_path / "basis.safetensors"
    save_basis(path, make_bases(two_linear(), ["a", "b"], 3), {"step": 1})
    return str(path)


def wrap_mlp(basis_path: str, mode: str = "right", init_scale: float = 0.0, **kw) -> peft.PeftModel:
    """TwoLinear wrapped with a rank-3 subspace-locked adapter on ``a`` and ``b``."""
    cfg = SubspaceLockedConfig(
        r=3, mode=mode, target_modules=["a", "b"], basis_path=basis_path, init_scale=init_scale, **kw
    )
    return get_peft_model(two_linear(), cfg)


def locked_layers(model: nn.Module) -> list[tuple[str, SubspaceLockedLayer]]:
    """All subspace-locked layers of ``model`` with their names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SubspaceLockedLayer)]


def test_enum_extension_and_registration_idempotent():
    member = PeftType.SUBSPACE_LOCKED
    assert member.value == "SUBSPACE_LOCKED" and member == "SUBSPACE_LOCKED"
    assert PeftType("SUBSPACE_LOCKED") is member and PeftType["SUBSPACE_LOCKED"] is member
    assert member in list(PeftType) and list(PeftType).count(member) == 1
    assert pickle.loads(pickle.dumps(member)) is member
    n = len(PeftType)
    assert extend_enum(PeftType, "SUBSPACE_LOCKED", "SUBSPACE_LOCKED") is member and len(PeftType) == n
    register_subspace_locked()
    register_subspace_locked()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is SubspaceLockedConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is SubspaceLockedModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "locked_" == SubspaceLockedModel.prefix
    with pytest.raises(ValueError, match="already exists with value 'SUBSPACE_LOCKED'"):
        extend_enum(PeftType, "SUBSPACE_LOCKED", "OTHER")
    with pytest.raises(ValueError, match="already used by PeftType.LORA"):
        extend_enum(PeftType, "MY_LORA", "LORA")
    assert sorted(la.__all__) == la.__all__


def test_config_validation_and_roundtrip(tmp_path):
    with pytest.raises(ValueError, match=r"mode='left' is invalid; allowed values are \['right', 'two_sided'\]"):
        SubspaceLockedConfig(mode="left")
    with pytest.raises(ValueError, match="r=0 is invalid"):
        SubspaceLockedConfig(r=0)
    with pytest.raises(ValueError, match="init_scale=-1"):
        SubspaceLockedConfig(init_scale=-1.0)
    cfg = SubspaceLockedConfig(r=5, mode="two_sided", target_modules=["q_proj"], basis_path="x.safetensors")
    assert cfg.peft_type is PeftType.SUBSPACE_LOCKED and (cfg.r, cfg.save_basis, cfg.init_scale) == (5, True, 0.0)
    cfg.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SUBSPACE_LOCKED"
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, SubspaceLockedConfig) and loaded.mode == "two_sided" and loaded.r == 5


@pytest.mark.parametrize("mode", ["right", "two_sided"])
def test_tiny_llama_param_count_identity_and_subspace(tmp_path, mode):
    model = build_tiny_llama(vocab_size=48, tokenizer=None)
    bases = make_bases(model, LLAMA_TARGETS, R)
    save_basis(tmp_path / "basis.safetensors", bases, {"step": 7})
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    cfg = SubspaceLockedConfig(
        r=R, mode=mode, target_modules=LLAMA_TARGETS, basis_path=str(tmp_path / "basis.safetensors")
    )
    pm = get_peft_model(model, cfg)
    expected = sum((U.shape[0] * R if mode == "right" else R * R) for U, _ in bases.values())
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert len(bases) == 14 and trainable == expected == (2304 if mode == "right" else 224)
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, ref)  # zero coefficients: exactly the base model

    torch.manual_seed(1)
    for _, layer in locked_layers(pm):
        for p in list(layer.locked_A.values()) + list(layer.locked_C.values()):
            nn.init.normal_(p, std=0.1)
    for name, layer in locked_layers(pm):
        U, V = bases[name.removeprefix("base_model.model.")]
        dW = layer.get_delta_weight("default")
        assert dW.shape == (U.shape[0], V.shape[0]) and dW.norm() > 0.1
        assert (dW - dW @ V @ V.T).norm() < 1e-5
        if mode == "two_sided":
            assert (dW - U @ U.T @ dW).norm() < 1e-5
        W0 = layer.get_base_layer().weight.detach().clone()
        layer.merge()
        assert ((layer.get_base_layer().weight - W0 - dW) @ (torch.eye(V.shape[0]) - V @ V.T)).norm() < 1e-5
        layer.unmerge()
        assert torch.allclose(layer.get_base_layer().weight, W0, atol=1e-6)


@pytest.mark.parametrize("mode", ["right", "two_sided"])
def test_gradient_is_projected_full_gradient(mlp_basis, mode):
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    base = two_linear()
    base(x).pow(2).sum().backward()
    pm = wrap_mlp(mlp_basis, mode=mode)
    pm(x).pow(2).sum().backward()
    for name, layer in locked_layers(pm):
        G = getattr(base, name.split(".")[-1]).weight.grad  # full gradient of W at the same point
        V = layer.locked_V["default"]
        if mode == "right":
            gA = layer.locked_A["default"].grad
            assert torch.allclose(gA, G @ V, atol=1e-5)
            assert torch.allclose(gA @ V.T, G @ V @ V.T, atol=1e-5)  # SGD step in W-space = projected gradient
        else:
            U = layer.locked_U["default"]
            gC = layer.locked_C["default"].grad
            assert torch.allclose(gC, U.T @ G @ V, atol=1e-5)
            assert torch.allclose(U @ gC @ V.T, U @ U.T @ G @ V @ V.T, atol=1e-5)


def test_merge_unload_disable_and_dtype(mlp_basis):
    x = torch.randn(4, 8)
    base_out = two_linear()(x)
    pm = wrap_mlp(mlp_basis, mode="two_sided", init_scale=0.3)
    out = pm(x)
    assert not torch.allclose(out, base_out, atol=1e-3)
    with pm.disable_adapter():
        assert torch.allclose(pm(x), base_out, atol=1e-6)
    pm.base_model.merge_adapter()
    assert torch.allclose(pm(x), out, atol=1e-5)
    pm.base_model.unmerge_adapter()
    assert torch.allclose(pm.base_model.model.a.base_layer.weight, two_linear().a.weight, atol=1e-6)
    merged = wrap_mlp(mlp_basis, mode="two_sided", init_scale=0.3)
    merged.load_state_dict(pm.state_dict())
    merged = merged.merge_and_unload(safe_merge=True)
    assert isinstance(merged.a, nn.Linear) and torch.allclose(merged(x), out, atol=1e-5)
    assert torch.allclose(wrap_mlp(mlp_basis, init_scale=0.3).unload()(x), base_out, atol=1e-6)
    broken = wrap_mlp(mlp_basis, init_scale=0.3)
    with torch.no_grad():
        broken.base_model.model.a.locked_A["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf detected"):
        broken.base_model.model.a.merge(safe_merge=True)

    bf = get_peft_model(
        two_linear().to(torch.bfloat16),
        SubspaceLockedConfig(r=3, target_modules=["a", "b"], basis_path=mlp_basis, init_scale=0.1),
    )
    layer = bf.base_model.model.a
    assert layer.locked_A["default"].dtype == torch.float32 and layer.locked_V["default"].dtype == torch.float32
    assert bf(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_multiple_adapters_set_delete(mlp_basis, tmp_path):
    x = torch.randn(4, 8)
    pm = wrap_mlp(mlp_basis, init_scale=0.3)
    out_default = pm(x)
    other = tmp_path / "other.safetensors"
    save_basis(other, make_bases(two_linear(), ["a", "b"], 2, seed=5), {"step": 2})
    torch.manual_seed(3)
    pm.add_adapter(
        "other",
        SubspaceLockedConfig(r=2, mode="two_sided", target_modules=["a"], basis_path=str(other), init_scale=0.3),
    )
    assert torch.allclose(pm(x), out_default)  # new adapter inactive
    pm.set_adapter("other")
    out_other = pm(x)
    assert not torch.allclose(out_other, out_default, atol=1e-4)
    assert pm.base_model.model.a.locked_C["other"].requires_grad
    assert not pm.base_model.model.a.locked_A["default"].requires_grad
    assert "default" not in pm.base_model.model.a.locked_U  # right mode keeps no U
    pm.delete_adapter("default")
    assert list(pm.peft_config) == ["other"] and "default" not in pm.base_model.model.a.locked_V
    assert torch.allclose(pm(x), out_other)
    with pytest.raises(ValueError, match="same save_basis"):
        pm.add_adapter(
            "third", SubspaceLockedConfig(r=3, target_modules=["a"], basis_path=mlp_basis, save_basis=False)
        )


def test_bad_inputs_raise_clear_errors(tmp_path, mlp_basis):
    g = torch.Generator().manual_seed(0)
    path = str(tmp_path / "bad.safetensors")

    def attempt(bases, r=3, target_modules=("a", "b"), model=None, **kw):
        save_basis(path, bases, {"step": 0}, check=False)
        model = model or two_linear()
        cfg = SubspaceLockedConfig(r=r, target_modules=list(target_modules), basis_path=path, **kw)
        try:
            get_peft_model(model, cfg)
        finally:
            assert not any(isinstance(m, SubspaceLockedLayer) for m in model.modules())  # never half-wrapped

    good = {"a": (orth(6, 3, g), orth(8, 3, g)), "b": (orth(5, 3, g), orth(6, 3, g))}
    with pytest.raises(ValueError, match=r"module 'a'.*U must be \(6, 3\) and V \(8, 3\), got U \(7, 3\)"):
        attempt({**good, "a": (orth(7, 3, g), orth(8, 3, g))})
    with pytest.raises(ValueError, match=r"module 'a'.*U must be \(6, 3\) and V \(8, 3\), got U \(6, 3\) and V \(9"):
        attempt({**good, "a": (orth(6, 3, g), orth(9, 3, g))})
    with pytest.raises(ValueError, match=r"'a' has rank 3 .*config r=2"):
        attempt(good, r=2)
    with pytest.raises(ValueError, match=r"no entry for target module\(s\) \['b'\]"):
        attempt({"a": good["a"]})
    with pytest.raises(ValueError, match=r"module\(s\) that do not exist in the model: \['zzz'\]"):
        attempt({**good, "zzz": good["a"]})
    with pytest.raises(ValueError, match=r"'b\.V'.*orthonormal columns: max"):
        attempt({**good, "b": (good["b"][0], good["b"][1] * 2)})
    with pytest.raises(ValueError, match=r"r=3 is larger than min\(out, in\) = min\(2, 6\) of module 'b'"):
        attempt({**good, "b": (torch.zeros(2, 3), orth(6, 3, g))}, model=two_linear(out_b=2))
    with pytest.raises(ValueError, match="matched no nn.Linear module"):
        attempt(good, target_modules=["nope"])
    with pytest.raises(ValueError, match="basis_path is None"):
        get_peft_model(two_linear(), SubspaceLockedConfig(r=3, target_modules=["a"]))
    with pytest.raises(FileNotFoundError):
        get_peft_model(two_linear(), SubspaceLockedConfig(r=3, target_modules=["a"], basis_path=path + ".missing"))


def test_save_basis_false_reads_basis_file_on_load(tmp_path, mlp_basis):
    x = torch.randn(3, 8)
    pm = wrap_mlp(mlp_basis, mode="two_sided", init_scale=0.3, save_basis=False)
    pm.save_pretrained(str(tmp_path / "ad"))
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert keys == ["base_model.model.a.locked_C", "base_model.model.b.locked_C"]
    loaded = PeftModel.from_pretrained(two_linear(), str(tmp_path / "ad"))
    assert torch.allclose(loaded(x), pm(x), atol=1e-6)


FRESH_PROCESS = """
import sys, torch
from peft import PeftConfig, PeftModel
from transformers import LlamaForCausalLM
d = sys.argv[1]
ids = torch.load(d + "/ids.pt")
out = {}
with torch.no_grad():
    for mode in ("right", "two_sided"):  # 1) plain PEFT loads the LoRA export without lockedopd
        pm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(d + "/base"), f"{d}/lora_{mode}")
        out[f"lora_{mode}"] = pm(ids).logits
    assert not any(m.startswith("lockedopd") for m in sys.modules), "plain PEFT must not need lockedopd"
    import lockedopd.adapter  # 2) registering the method makes the locked adapter loadable
    from lockedopd.adapter import SubspaceLockedConfig
    for mode in ("right", "two_sided"):
        assert isinstance(PeftConfig.from_pretrained(f"{d}/adapter_{mode}"), SubspaceLockedConfig)
        pm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(d + "/base"), f"{d}/adapter_{mode}")
        out[f"loaded_{mode}"] = pm(ids).logits
        out[f"merged_{mode}"] = pm.merge_and_unload()(ids).logits
torch.save(out, d + "/fresh.pt")
"""


def test_save_load_fresh_process_merge_and_export_lora(tmp_path):
    model = build_tiny_llama(vocab_size=48, tokenizer=None)
    model.save_pretrained(str(tmp_path / "base"))
    basis = tmp_path / "basis.safetensors"
    save_basis(basis, make_bases(model, LLAMA_TARGETS, R), {"step": 3})
    ids = torch.randint(0, 48, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    refs = {}
    for mode in ("right", "two_sided"):
        torch.manual_seed(2)
        cfg = SubspaceLockedConfig(r=R, mode=mode, target_modules=LLAMA_TARGETS, basis_path=str(basis), init_scale=0.2)
        pm = get_peft_model(build_tiny_llama(vocab_size=48, tokenizer=None), cfg)
        with torch.no_grad():
            refs[mode] = pm(ids).logits
            with pm.disable_adapter():
                assert (pm(ids).logits - refs[mode]).abs().max() > 1e-3  # the adapter really changes the model
        pm.save_pretrained(str(tmp_path / f"adapter_{mode}"))
        export_lora(pm, tmp_path / f"lora_{mode}")
        export_lora(pm, tmp_path / f"lora_{mode}")  # overwriting an existing export works
        lora_cfg = json.loads((tmp_path / f"lora_{mode}" / "adapter_config.json").read_text())
        assert lora_cfg["peft_type"] == "LORA" and lora_cfg["r"] == R == lora_cfg["lora_alpha"]
        assert len(lora_cfg["target_modules"]) == 14
    basis.unlink()  # the loaded models must use the bases saved inside the adapters
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRESH_PROCESS), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(tmp_path / "fresh.pt")
    for mode, ref in refs.items():
        for kind in ("loaded", "merged", "lora"):
            err = (fresh[f"{kind}_{mode}"] - ref).abs().max().item()
            assert err < 1e-5, (mode, kind, err)


def test_without_target_modules_the_basis_file_decides(tmp_path):
    import peft

    from lockedopd.adapter import SubspaceLockedConfig
    from lockedopd.models import build_tiny_llama
    from lockedopd.subspace import save_basis

    model = build_tiny_llama(50, num_layers=2, hidden_size=32, intermediate_size=64)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    bases = {}
    for i, name in enumerate(names):
        out_f, in_f = model.get_submodule(name).weight.shape
        g = torch.Generator().manual_seed(i)
        bases[name] = (
            torch.linalg.qr(torch.randn(out_f, 3, generator=g))[0],
            torch.linalg.qr(torch.randn(in_f, 3, generator=g))[0],
        )
    save_basis(tmp_path / "basis.safetensors", bases, {"step": 1})
    wrapped = peft.get_peft_model(model, SubspaceLockedConfig(r=3, basis_path=str(tmp_path / "basis.safetensors")))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert trainable == 3 * (32 + 32 + 64)  # out x r for q_proj (32), down_proj (32), up_proj (64)


def test_locked_layer_saves_only_its_r_dimensional_projection(mlp_basis):
    """The memory-lean linear: with the base frozen, backward needs x·V (batch x r) from each locked layer, not x."""
    from lockedopd.diagnostics.memory import SavedTensorBytes

    pm = wrap_mlp(mlp_basis, mode="right")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    frozen = [*pm.parameters(), *pm.buffers()]
    with SavedTensorBytes(exclude=frozen) as saved:
        pm(x)
    r, fp32 = 3, 4
    # a: x·V_a (16 x r); tanh keeps its output h (16 x 6); b: h·V_b (16 x r). A trainable W would add x (16 x 8).
    assert sorted(saved.by_storage.values()) == sorted([16 * r * fp32, 16 * 6 * fp32, 16 * r * fp32])


@pytest.mark.parametrize("mode", ["right", "two_sided"])
def test_a_merged_export_loads_as_a_plain_model_with_the_locked_models_logits(tmp_path, mode):
    from transformers import AutoModelForCausalLM

    from lockedopd.adapter import export_merged

    model = build_tiny_llama(vocab_size=48, tokenizer=None)
    basis = tmp_path / "basis.safetensors"
    save_basis(basis, make_bases(model, LLAMA_TARGETS, R), {"step": 3})
    torch.manual_seed(2)
    cfg = SubspaceLockedConfig(r=R, mode=mode, target_modules=LLAMA_TARGETS, basis_path=str(basis), init_scale=0.2)
    locked = get_peft_model(model, cfg)
    ids = torch.randint(0, 48, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = locked(ids).logits
        with locked.disable_adapter():
            assert (locked(ids).logits - expected).abs().max() > 1e-3  # the update is not nothing
    export_merged(locked, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k or "subspace" in k for k in plain.state_dict())  # no adapter left: a plain model
    with torch.no_grad():
        assert (plain(ids).logits - expected).abs().max() < 1e-5
        assert torch.equal(locked(ids).logits, expected)  # the exported model was a copy: the locked one is intact
