"""``lockedopd build-model``: train a recipe once and export its final model into the built-model cache
(:mod:`lockedopd.opd.built_models`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lockedopd.opd.built_models import BUILD_FORMAT, build_key, built_dir, recipe_config
from lockedopd.opd.trainer import OPDTrainer
from lockedopd.runtime.atomic_io import atomic_write_text
from lockedopd.runtime.provenance import package_versions, weights_digest

logger = logging.getLogger(__name__)


def build_model_from_recipe(recipe: str | Path, overrides: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Train ``recipe`` unless its model is cached, and return ``(directory, build record)``.

    The run trains in ``<directory>.run`` (resumable: a killed build continues from its last checkpoint when the
    command is run again); its final model, tokenizer and ``build.json`` (the key, the run's summary and last
    evaluation, the weights' digest and the package versions that trained them) are then moved into place in one
    rename, and the run's checkpoints deleted.
    """
    config = recipe_config(recipe, overrides)
    if config.lock.enabled:  # refused before any training: the export is the plain model of a full-parameter run
        raise ValueError("build-model exports a full-parameter run; set lock.enabled=false in the recipe.")
    key = build_key(config)
    target = built_dir(recipe, config)
    if (target / "build.json").is_file():
        return target, json.loads((target / "build.json").read_text())
    run_dir = target.with_name(target.name + ".run")
    config = dataclasses.replace(config, output_dir=str(run_dir), resume=run_dir.is_dir())
    trainer = OPDTrainer.from_config(config)
    summary = trainer.train()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last_eval = next((r for r in reversed(records) if any(k.startswith("eval_") for k in r)), {})
    record = {
        "format": BUILD_FORMAT,
        "recipe": str(recipe),
        "key": key,
        "summary": summary,
        "final_evaluation": {k: v for k, v in last_eval.items() if k.startswith("eval_") or k == "step"},
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    trainer.base_model.save_pretrained(tmp, safe_serialization=True)
    trainer.tokenizer.save_pretrained(tmp)
    record["weights_sha256"] = weights_digest(tmp)  # the key names the recipe; this names the weights it gave here
    record["environment"] = package_versions()
    atomic_write_text(tmp / "build.json", json.dumps(record, indent=2))
    os.replace(tmp, target)
    shutil.rmtree(run_dir, ignore_errors=True)
    logger.info("built %s into %s", recipe, target)
    return target, record
