"""Prompts from `datasets`: a save_to_disk directory and a parquet file with their own column names train the tiny
recipe; a chat `messages` column stands in for prompt and completion."""

from __future__ import annotations

import datasets
import pytest

from lockedopd.data import (
    DatasetPrompts,
    PromptFields,
    PromptRecord,
    count_missing_completions,
    load_records,
    split_prompts,
)
from lockedopd.opd import OPDTrainer, load_config
from tests.conftest import TINY_CONFIG
from tests.test_trainer import read_metrics

ROWS = [{"question": f"{a}+{b}=", "solution": str(a + b), "id": a} for a in range(1, 25) for b in (3, 7)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("datasets")
    train, held = datasets.Dataset.from_list(ROWS[:40]), datasets.Dataset.from_list(ROWS[40:])
    datasets.DatasetDict({"train": train, "test": held}).save_to_disk(str(out / "disk"))
    train.to_parquet(str(out / "train.parquet"))
    held.to_parquet(str(out / "held.parquet"))
    return out


def test_records_read_through_the_named_columns(sources):
    fields = PromptFields(prompt="question", answer="solution")
    from_disk = load_records(sources / "disk", fields, split="test")
    from_parquet = load_records(sources / "held.parquet", fields)
    assert list(from_disk) == list(from_parquet) and len(from_disk) == len(ROWS) - 40
    assert (from_disk[0].prompt, from_disk[0].answer, from_disk[0].completion) == ("21+3=", "24", None)
    with pytest.raises(ValueError, match='has no non-empty "prompt" string.*data.prompt_field'):
        load_records(sources / "held.parquet")
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\], not 'validation'; set data.split"):
        load_records(sources / "disk", fields, split="validation")


def test_a_chat_messages_column_gives_prompt_and_completion(tmp_path):
    chats = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="},
                           {"role": "assistant", "content": "4"}]}]  # fmt: skip
    datasets.Dataset.from_list(chats).to_parquet(str(tmp_path / "chat.parquet"))
    (record,) = load_records(tmp_path / "chat.parquet")
    assert (record.prompt, record.completion, record.answer) == ("2+2=", "4", None)


@pytest.mark.parametrize("kind", ["disk", "parquet"])
def test_a_datasets_source_with_other_column_names_trains_the_tiny_recipe(tmp_path, sources, kind):
    train, held = (sources / "disk", sources / "disk") if kind == "disk" else (
        sources / "train.parquet", sources / "held.parquet")  # fmt: skip
    config = load_config(
        TINY_CONFIG,
        [f"output_dir={tmp_path}", "progress=false", "lock.enabled=false", "max_steps=2", "eval_steps=2",
         "save_steps=0", f"data.train_path={train}", f"data.eval_path={held}", "data.prompt_field=question",
         "data.answer_field=solution", "data.eval_size=4"],
    )  # fmt: skip
    trainer = OPDTrainer.from_config(config)
    assert [r.prompt for r in trainer.train_prompts] == [r["question"] for r in ROWS[:40]]
    assert trainer.train_prompts[0].answer == "4"
    trainer.train()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_a_large_set_stays_in_its_arrow_files_and_a_bad_row_fails_before_training(tmp_path):
    rows = [{"question": f"{i % 97}+{i % 13}=", "solution": str(i % 97 + i % 13)} for i in range(5000)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "big"))
    fields = PromptFields(prompt="question", answer="solution")
    records = load_records(tmp_path / "big", fields)
    assert isinstance(records, DatasetPrompts) and len(records) == 5000
    assert records[4321] == PromptRecord(rows[4321]["question"], rows[4321]["solution"])
    assert count_missing_completions(records) == 5000 and records.count_missing("solution") == 0
    # the held-out split is the seeded one a list gets, row for row
    train, held = split_prompts(records, 16, seed=3)
    train_list, held_list = split_prompts(list(records), 16, seed=3)
    assert list(held) == held_list and len(train) == 4984 and train[4000] == train_list[4000]
    config = load_config(
        TINY_CONFIG,
        [f"output_dir={tmp_path / 'run'}", "progress=false", "lock.enabled=false", "max_steps=2", "eval_steps=0",
         "save_steps=0", f"data.train_path={tmp_path / 'big'}", "data.prompt_field=question",
         "data.answer_field=solution", "data.eval_size=4", "batch_size=4"],
    )  # fmt: skip
    trainer = OPDTrainer.from_config(config)
    trainer.train()
    encoded = trainer.train_ids.encoded  # only the prompts the two steps sampled were ever tokenized
    assert 0 < len(encoded) <= 2 * 4 and all(isinstance(i, int) for i in encoded)
    rows[3001]["question"] = "   "
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r'bad row 3001 has no non-empty "question" string'):
        load_records(tmp_path / "bad", fields)


def test_accuracy_problems_come_from_their_own_source_with_their_own_column_names(tmp_path, sources):
    from lockedopd.opd.builders import build_accuracy_problems

    problems = [{"problem": f"{a}*2=", "final": str(2 * a)} for a in range(30)]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(problems)}).save_to_disk(str(tmp_path / "math"))
    config = load_config(
        TINY_CONFIG,
        [f"data.train_path={sources / 'train.parquet'}", "data.prompt_field=question", "data.answer_field=solution",
         "accuracy.verifier=contains_answer", f"accuracy.path={tmp_path / 'math'}", "accuracy.split=test",
         "accuracy.prompt_field=problem", "accuracy.answer_field=final", "accuracy.size=7"],
    )  # fmt: skip
    got = build_accuracy_problems(config)
    assert [(r.prompt, r.answer) for r in got] == [(p["problem"], p["final"]) for p in problems[:7]]
