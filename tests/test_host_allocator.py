"""glibc's mmap threshold (runtime.host_allocator): values checked, freed blocks leave, the trainer sets it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lockedopd.opd import OPDTrainer, load_config
from lockedopd.runtime import host_allocator
from tests.conftest import TINY_CONFIG

needs_glibc = pytest.mark.skipif(host_allocator.glibc() is None, reason="mallopt needs glibc")

# Fragment the heap the way a training step does: 1 MiB tensors (activations) interleaved with 16 KiB tensors that
# stay alive; free the large ones and report how much of them stays resident.
_FRAGMENT = """
import json, sys, torch
from lockedopd.runtime.host_allocator import set_malloc_mmap_threshold
def rss():
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:'))
threshold = int(sys.argv[1])
set = set_malloc_mmap_threshold(threshold) if threshold else False
warm = torch.ones(1 << 18)   # a freed 1 MiB mapping: glibc's dynamic threshold rises to 1 MiB (as after a step)
del warm
big, small = [], []
before = rss()
for _ in range(160):
    big.append(torch.ones(1 << 18))   # 1 MiB of float32, written: resident
    small.append(torch.ones(1 << 12))  # 16 KiB: too big for glibc's free lists, cut from the heap's top
peak = rss()
del big
print(json.dumps({"set": set, "grown": peak - before, "kept": rss() - before}))
"""


def _fragment(threshold: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, str(threshold)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bad", [1, 4095, 64 * 1024 * 1024, -65536, 65536.0, True])
def test_bad_thresholds_are_refused_with_the_range(bad):
    with pytest.raises(ValueError, match="malloc_mmap_threshold"):
        host_allocator.check_mmap_threshold(bad)


def test_config_refuses_a_bad_threshold_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"config: malloc_mmap_threshold=100 is outside \[4096, 33554432\]"):
        load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "malloc_mmap_threshold=100"])
    assert load_config(TINY_CONFIG, [f"output_dir={tmp_path}"]).malloc_mmap_threshold == 0


def test_zero_keeps_the_default():
    assert host_allocator.set_malloc_mmap_threshold(0) is False


@needs_glibc
def test_freed_blocks_leave_the_process_only_with_the_threshold():
    default, lean = _fragment(0), _fragment(65536)
    assert lean["set"] is True
    for run in (default, lean):  # both made 160 MiB resident
        assert run["grown"] > 150 * 2**20, run
    # glibc's dynamic threshold serves the 1 MiB blocks from the heap after the first free; the small live tensors
    # between them pin the heap, so the freed blocks stay resident. With the threshold each was its own mapping.
    assert default["kept"] > 100 * 2**20, default
    assert lean["kept"] < 8 * 2**20, lean


def test_the_trainer_sets_the_configured_threshold(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("lockedopd.opd.trainer.set_malloc_mmap_threshold", calls.append)
    OPDTrainer.from_config(load_config(TINY_CONFIG, [f"output_dir={tmp_path / 'a'}", "progress=false"]))
    assert calls == []
    OPDTrainer.from_config(
        load_config(TINY_CONFIG, [f"output_dir={tmp_path / 'b'}", "progress=false", "malloc_mmap_threshold=65536"])
    )
    assert calls == [65536]
