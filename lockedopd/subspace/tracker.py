"""Watch the top-r subspace of each cumulative update ΔW_t = W_t - W_0 during full-parameter warmup."""

from __future__ import annotations

import re
import statistics
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..runtime.distributed import full_tensor
from .basis import check_rank_fits
from .sketch import (
    LowRankFactors,
    default_sketch_sizes,
    draw_test_matrices,
    reconstruct_top_subspaces,
    sketch_matrix,
    subspace_similarity,
)

__all__ = ["SubspaceTracker"]

_STATE_VERSION = 1
_ZERO_REL_TOL = 1e-12  # ‖sketch of ΔW‖ <= this · ‖sketch of W_0‖ counts as "no update yet"
_EXCLUDED_NAME_PARTS = ("lm_head", "embed", "wte", "wpe")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SubspaceTracker:
    """Track the top-`rank` right subspace of every target matrix's cumulative update during warmup.

    Memory.  No copy of W_0 is kept.  At construction, for each target matrix W_0 (out x in) the tracker draws
    Gaussian test matrices Ω (in x k) and Ψ (l x out) from a CPU generator seeded with a per-matrix seed
    (derived from `seed` and the module's position) and stores only the float64 sketches Y_0 = W_0·Ω (out x k)
    and Z_0 = Ψ·W_0 (l x in) (Tropp, Yurtsever, Udell & Cevher 2017, single-pass sketch).  Ω and Ψ are *not*
    stored: they are regenerated from the seed at each check (cheap next to the matmuls).  Per matrix the state
    is therefore 8·(out·k + l·in) bytes of sketches plus 8·in·r bytes for the previous check's right basis,
    against 4·out·in bytes for an fp32 copy.  For a square n x n matrix with the defaults r = 16, k = 2r+1 = 33,
    l = 2k+1 = 67 that is 8·n·100 + 8·n·16 = 928·n bytes vs 4·n², i.e. 232/n of an fp32 copy: 40% at n = 576,
    5.7% at n = 4096.  `memory_bytes()` reports the exact total, `fp32_copy_bytes()` the comparison value.

    At each check the sketches of ΔW_t are Y = W_t·Ω - Y_0 and Z = Ψ·W_t - Z_0; then Q = orth(Y),
    X = lstsq(Ψ·Q, Z), ΔŴ = Q·X, and the SVD of X gives the top-r U (out x r), singular values and V (in x r).
    The estimate is exact when rank(ΔW) <= k and approximate otherwise (error ~ the tail beyond rank k).

    Call `observe(step)` after each optimizer step with the 1-based number of completed steps.  Every
    `check_every` steps it re-estimates the bases and computes, per matrix, the right-subspace similarity
    (1/r)·‖V_r(prev)ᵀ·V_r(now)‖_F² to the previous check.  The first check has nothing to compare with, so with
    a subspace that is fixed from step 1 stability is declared at check number `patience + 1`.  A matrix
    counts as stable when its similarity >= `threshold`; matrices whose ΔW is still zero (or non-finite)
    count as not stable.  `stable` becomes True (reason "stable") once the fraction of stable matrices is
    >= `min_fraction` on `patience` consecutive checks and step >= `min_warmup_steps`, or (reason
    "max_warmup_steps") once step >= `max_warmup_steps`.  After that, `observe` does no more work and
    returns True.

    Weights are read in whatever dtype/device they live in and cast to float64 one matrix at a time; sketches
    live on the weight's device.  FSDP2 shards (``DTensor``) are gathered one matrix at a time (a collective: every
    process must run the tracker); other sharded parameters (FSDP1, ZeRO-3) must be gathered by the caller.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: Sequence[str] | str | None = None,
        rank: int = 16,
        threshold: float = 0.9,
        patience: int = 2,
        check_every: int = 2,
        min_warmup_steps: int = 2,
        max_warmup_steps: int | None = None,
        min_fraction: float = 0.9,
        sketch_size: int | None = None,
        co_sketch_size: int | None = None,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value, low in (
            ("rank", rank, 1),
            ("patience", patience, 1),
            ("check_every", check_every, 1),
            ("min_warmup_steps", min_warmup_steps, 0),
            ("seed", seed, 0),
        ):
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if max_warmup_steps is not None and (not _is_int(max_warmup_steps) or max_warmup_steps < 1):
            raise ValueError(f"max_warmup_steps must be None or an int >= 1, got {max_warmup_steps!r}")
        for name, value in (("threshold", threshold), ("min_fraction", min_fraction)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 < value <= 1.0):
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
        if sketch_size is not None and (not _is_int(sketch_size) or sketch_size < rank):
            raise ValueError(f"sketch_size must be None or an int >= rank ({rank}), got {sketch_size!r}")
        k_nominal = sketch_size if sketch_size is not None else 2 * rank + 1
        if co_sketch_size is not None and (not _is_int(co_sketch_size) or co_sketch_size < k_nominal):
            raise ValueError(
                f"co_sketch_size must be None or an int >= sketch_size ({k_nominal}), got {co_sketch_size!r}"
            )

        self.model = model
        self.rank = rank
        self.threshold = float(threshold)
        self.patience = patience
        self.check_every = check_every
        self.min_warmup_steps = min_warmup_steps
        self.max_warmup_steps = max_warmup_steps
        self.min_fraction = float(min_fraction)
        self.sketch_size = sketch_size
        self.co_sketch_size = co_sketch_size
        self.seed = seed

        self.module_names: list[str] = self._select_modules(target_modules)
        check_rank_fits(rank, {name: tuple(self.model.get_submodule(name).weight.shape) for name in self.module_names})
        self._seeds: dict[str, int] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._y0: dict[str, torch.Tensor] = {}
        self._z0: dict[str, torch.Tensor] = {}
        self._prev_v: dict[str, torch.Tensor] = {}
        for index, name in enumerate(self.module_names):
            weight = self._weight(name)
            out_f, in_f = weight.shape
            k, ell = default_sketch_sizes(rank, out_f, in_f, sketch_size, co_sketch_size)
            self._sizes[name] = (k, ell)
            self._seeds[name] = (seed * 1_000_003 + index) % (2**63 - 1)
            omega, psi = draw_test_matrices(out_f, in_f, k, ell, self._seeds[name], device=weight.device)
            self._y0[name], self._z0[name] = sketch_matrix(weight, omega, psi)

        self.history: list[dict] = []
        self.stable: bool = False
        self.reason: str | None = None
        self.stable_step: int | None = None
        self.last_step: int = 0
        self._consecutive: int = 0

    # ------------------------------------------------------------------ module selection
    def _select_modules(self, target_modules) -> list[str]:
        linears = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear) and n]
        if target_modules is None:
            embedding_weights = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
            names = [
                n
                for n, m in linears
                if not any(part in n.split(".")[-1] for part in _EXCLUDED_NAME_PARTS)
                and id(m.weight) not in embedding_weights
            ]
        elif isinstance(target_modules, str):
            try:
                pattern = re.compile(target_modules)
            except re.error as exc:
                raise ValueError(f"target_modules is not a valid regex: {exc}") from exc
            names = [n for n, _ in linears if pattern.fullmatch(n)]
        elif isinstance(target_modules, Sequence) and all(isinstance(s, str) and s for s in target_modules):
            suffixes = list(target_modules)
            if not suffixes:
                raise ValueError("target_modules must not be an empty list")
            names = [n for n, _ in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
        else:
            raise ValueError(
                "target_modules must be None, a regex string or a list of module-name suffixes, "
                f"got {target_modules!r}"
            )
        if not names:
            raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear module of the model")
        return names

    def _weight(self, name: str) -> torch.Tensor:
        weight = self.model.get_submodule(name).weight
        if weight.dim() != 2:
            raise ValueError(f"module {name!r} has a {weight.dim()}-D weight; expected a 2-D matrix")
        return full_tensor(weight.detach())  # an FSDP2 shard is gathered here, one matrix at a time

    # ------------------------------------------------------------------ estimation
    def _estimate_one(self, name: str) -> LowRankFactors | None:
        weight = self._weight(name)
        out_f, in_f = weight.shape
        k, ell = self._sizes[name]
        y0, z0 = self._y0[name], self._z0[name]
        if tuple(y0.shape) != (out_f, k) or tuple(z0.shape) != (ell, in_f):
            raise ValueError(f"module {name!r}: weight shape {tuple(weight.shape)} does not match its stored sketch")
        omega, psi = draw_test_matrices(out_f, in_f, k, ell, self._seeds[name], device=y0.device)
        y, z = sketch_matrix(weight, omega, psi)
        y -= y0
        z -= z0
        ref = max(float(torch.linalg.matrix_norm(y0)), float(torch.linalg.matrix_norm(z0)))
        return reconstruct_top_subspaces(y, z, psi, self.rank, zero_tol=_ZERO_REL_TOL * ref)

    @torch.no_grad()
    def estimate(self) -> dict[str, LowRankFactors | None]:
        """Re-estimate (U, S, V) (float64) of every target matrix's ΔW from the current weights.

        Entries are None for matrices whose ΔW is still (numerically) zero or non-finite.
        """
        return {name: self._estimate_one(name) for name in self.module_names}

    def bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Current top-r bases {module name: (U out x r, V in x r)}, float32 with orthonormal columns.

        Estimated from the current weights (not cached).  Matrices whose ΔW is still zero have no defined
        subspace and are left out, with a warning.  r = min(rank, k) per matrix (smaller only for tiny matrices).
        """
        result, missing = {}, []
        for name, factors in self.estimate().items():
            if factors is None:
                missing.append(name)
                continue
            result[name] = (factors.U.to(torch.float32).contiguous(), factors.V.to(torch.float32).contiguous())
        if missing:
            warnings.warn(
                f"{len(missing)} target matrices have no update yet and are left out of the bases: {missing[:5]}",
                stacklevel=2,
            )
        return result

    def singular_values(self) -> dict[str, torch.Tensor]:
        """Top-r singular values (float64) of each ΔW estimate; matrices with no update are left out."""
        return {n: f.S for n, f in self.estimate().items() if f is not None}

    # ------------------------------------------------------------------ stability
    def observe(self, step: int) -> bool:
        """Record that `step` optimizer steps (1-based) are done; check the subspace every `check_every` steps.

        Returns `self.stable`.  Steps must strictly increase between calls.
        """
        if not _is_int(step) or step < 1:
            raise ValueError(f"step must be an int >= 1, got {step!r}")
        if step <= self.last_step:
            raise ValueError(f"step must increase between observe() calls: got {step} after {self.last_step}")
        self.last_step = step
        if self.stable:
            return True
        if step % self.check_every == 0:
            self._check(step)
        if not self.stable and self.max_warmup_steps is not None and step >= self.max_warmup_steps:
            self._declare(step, "max_warmup_steps")
        return self.stable

    @torch.no_grad()
    def _check(self, step: int) -> None:
        sims: dict[str, float | None] = {}
        n_zero = 0
        for name in self.module_names:
            factors = self._estimate_one(name)
            prev = self._prev_v.get(name)
            if factors is None:
                n_zero += 1
                sims[name] = None
                self._prev_v.pop(name, None)
                continue
            v = factors.V
            sims[name] = subspace_similarity(prev, v) if prev is not None and prev.shape == v.shape else None
            self._prev_v[name] = v.contiguous()
        defined = [s for s in sims.values() if s is not None]
        n_stable = sum(1 for s in defined if s >= self.threshold)
        fraction = n_stable / len(self.module_names)
        if defined and fraction >= self.min_fraction:
            self._consecutive += 1
        else:
            self._consecutive = 0
        entry = {
            "step": step,
            "check": len(self.history) + 1,
            "median_similarity": statistics.median(defined) if defined else None,
            "mean_similarity": sum(defined) / len(defined) if defined else None,
            "min_similarity": min(defined) if defined else None,
            "fraction_stable": fraction,
            "n_matrices": len(self.module_names),
            "n_compared": len(defined),
            "n_zero_update": n_zero,
            "consecutive": self._consecutive,
        }
        self.history.append(entry)
        if self._consecutive >= self.patience and step >= self.min_warmup_steps:
            self._declare(step, "stable")

    def _declare(self, step: int, reason: str) -> None:
        self.stable = True
        self.reason = reason
        self.stable_step = step

    # ------------------------------------------------------------------ saving
    def save_basis(self, path, step: int | None = None, metadata: dict | None = None) -> dict:
        """Write the current bases with `lockedopd.subspace.basis_io.save_basis`; returns the metadata written.

        Metadata: rank (the bases' r), step (default: last observed step), reason, sketch size, seed, source;
        mode-agnostic (the file holds both U and V).  Extra `metadata` entries are merged in.
        """
        from .basis_io import save_basis as _save_basis  # written by the adapter engineer; imported lazily

        bases = self.bases()
        if not bases:
            raise ValueError("no target matrix has been updated yet; there is no basis to save")
        ranks = sorted({v.shape[1] for _, v in bases.values()})
        meta = {
            "rank": ranks[0] if len(ranks) == 1 else self.rank,
            "step": self.last_step if step is None else int(step),
            "reason": self.reason if self.reason is not None else "not_stable",
            "sketch_size": self.sketch_size if self.sketch_size is not None else 2 * self.rank + 1,
            "seed": self.seed,
            "threshold": self.threshold,
            "source": "SubspaceTracker",
        }
        if metadata:
            meta.update(metadata)
        _save_basis(path, bases, meta)
        return meta

    def memory_bytes(self) -> int:
        """Bytes held by the tracker: float64 sketches Y_0, Z_0 plus the previous check's V bases."""
        tensors = [*self._y0.values(), *self._z0.values(), *self._prev_v.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def fp32_copy_bytes(self) -> int:
        """Bytes an fp32 copy of all target matrices would take (the alternative the sketch avoids)."""
        return sum(4 * self._weight(n).numel() for n in self.module_names)

    def _config(self) -> dict:
        return {
            "rank": self.rank,
            "threshold": self.threshold,
            "patience": self.patience,
            "check_every": self.check_every,
            "min_warmup_steps": self.min_warmup_steps,
            "max_warmup_steps": self.max_warmup_steps,
            "min_fraction": self.min_fraction,
            "sketch_size": self.sketch_size,
            "co_sketch_size": self.co_sketch_size,
            "seed": self.seed,
        }

    def state_dict(self) -> dict:
        """Everything needed to resume: tensors and plain Python values only (torch.load(weights_only=True) safe)."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "module_names": list(self.module_names),
            "seeds": dict(self._seeds),
            "sizes": {n: list(s) for n, s in self._sizes.items()},
            "y0": {n: t.detach().cpu().clone() for n, t in self._y0.items()},
            "z0": {n: t.detach().cpu().clone() for n, t in self._z0.items()},
            "prev_v": {n: t.detach().cpu().clone() for n, t in self._prev_v.items()},
            "history": [dict(h) for h in self.history],
            "stable": self.stable,
            "reason": self.reason,
            "stable_step": self.stable_step,
            "last_step": self.last_step,
            "consecutive": self._consecutive,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`.  The module set, shapes, rank, sketch sizes and seed must match."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("not a SubspaceTracker state dict (missing or unknown 'version')")
        if list(state["module_names"]) != self.module_names:
            raise ValueError("state dict tracks a different set of modules than this tracker")
        ours = self._config()
        for key in ("rank", "sketch_size", "co_sketch_size", "seed"):
            if state["config"].get(key) != ours[key]:
                raise ValueError(f"state dict has {key}={state['config'].get(key)!r}, this tracker {ours[key]!r}")
        for name in self.module_names:
            if tuple(state["sizes"][name]) != self._sizes[name] or int(state["seeds"][name]) != self._seeds[name]:
                raise ValueError(f"module {name!r}: sketch sizes or seed differ from the state dict")
            for key, mine in (("y0", self._y0), ("z0", self._z0)):
                if tuple(state[key][name].shape) != tuple(mine[name].shape):
                    raise ValueError(f"module {name!r}: stored {key} has shape {tuple(state[key][name].shape)}")
        # behaviour settings (threshold, patience, ...) may legitimately change on resume: keep this tracker's
        dev = {n: self._y0[n].device for n in self.module_names}
        self._y0 = {n: state["y0"][n].to(device=dev[n], dtype=torch.float64).clone() for n in self.module_names}
        self._z0 = {n: state["z0"][n].to(device=dev[n], dtype=torch.float64).clone() for n in self.module_names}
        self._prev_v = {n: v.to(device=dev[n], dtype=torch.float64).clone() for n, v in state["prev_v"].items()}
        self.history = [dict(h) for h in state["history"]]
        self.stable = bool(state["stable"])
        self.reason = state["reason"]
        self.stable_step = state["stable_step"]
        self.last_step = int(state["last_step"])
        self._consecutive = int(state["consecutive"])

    def __repr__(self) -> str:
        ratio = self.memory_bytes() / max(self.fp32_copy_bytes(), 1)
        return (
            f"SubspaceTracker(n_matrices={len(self.module_names)}, rank={self.rank}, stable={self.stable}, "
            f"reason={self.reason!r}, checks={len(self.history)}, memory={ratio:.1%} of an fp32 copy)"
        )
