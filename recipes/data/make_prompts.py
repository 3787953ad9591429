"""Generate the prompt sets that the SmolLM2 recipes ship (``prompts_train.jsonl``, ``prompts_eval.jsonl``).

Run: ``python recipes/data/make_prompts.py`` (needs ``reasoning-gym``, Apache-2.0, installed by ``make install``).
Mixes GSM-style word problems and arithmetic with answers (from reasoning-gym) and short open instructions, so
the student is distilled on varied chat prompts. Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = [
    "the moon",
    "a rainy day",
    "coffee",
    "trains",
    "the ocean",
    "a library",
    "bicycles",
    "winter",
    "music",
    "gardening",
    "volcanoes",
    "honey bees",
    "the internet",
    "a lighthouse",
    "chess",
    "bread",
    "rivers",
    "owls",
    "mountains",
    "friendship",
    "recycling",
    "a museum",
    "clouds",
    "electricity",
    "maps",
    "tea",
    "deserts",
]
TEMPLATES = [
    "Write one sentence about {t}.",
    "Give me three facts about {t}.",
    "Explain {t} to a child in two sentences.",
    "Write a short poem about {t}.",
    "What is interesting about {t}?",
    "Describe {t} in one short paragraph.",
]
GYM_TASKS = {"gsm_symbolic": 0.4, "basic_arithmetic": 0.25, "chain_sum": 0.1, "leg_counting": 0.1}


def make_prompts(total: int, seed: int) -> list[dict]:
    """``total`` prompt records: 85% reasoning-gym tasks with answers, the rest open instructions."""
    import reasoning_gym

    rng = random.Random(seed)
    records = []
    for offset, (task, share) in enumerate(GYM_TASKS.items()):
        count = int(total * share)
        for item in reasoning_gym.create_dataset(task, size=count, seed=seed + offset):
            records.append({"prompt": item["question"], "answer": str(item["answer"]), "source": task})
    while len(records) < total:
        text = rng.choice(TEMPLATES).format(t=rng.choice(TOPICS))
        records.append({"prompt": text, "answer": None, "source": "instruction"})
    rng.shuffle(records)
    return records


def main() -> None:
    """Write the train and held-out eval JSONL files next to this script."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total", type=int, default=360)
    parser.add_argument("--eval", type=int, default=40, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    records = make_prompts(args.total, args.seed)
    splits = {"prompts_eval.jsonl": records[: args.eval], "prompts_train.jsonl": records[args.eval :]}
    for name, rows in splits.items():
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} prompts to {args.out / name}")


if __name__ == "__main__":
    main()
