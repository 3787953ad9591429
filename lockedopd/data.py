"""Prompt sets: JSONL files with a ``"prompt"`` field (``"answer"`` and ``"completion"`` optional), ``datasets``
sets (a hub name, a parquet file or a ``save_to_disk`` directory) with their own column names, or synthetic prompts
for tiny runs.

A ``datasets`` set stays in its memory-mapped Arrow files (:class:`DatasetPrompts` reads a row when it is asked
for), so a set larger than memory trains; JSONL files are read whole."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PromptFields:
    """Which columns of a record hold the prompt, the reference answer and a given completion; a chat
    ``messages`` column (a list of ``{"role", "content"}``) stands in for the prompt (its last user turn) and the
    completion (the assistant turn after it) when the record has no prompt column."""

    prompt: str = "prompt"
    answer: str = "answer"
    completion: str = "completion"
    messages: str = "messages"

    def record(self, item: Mapping[str, Any], where: str) -> PromptRecord:
        """The :class:`PromptRecord` of one row; ``ValueError`` naming ``where`` when it has no prompt."""
        prompt, completion = item.get(self.prompt), item.get(self.completion)
        if prompt is None and isinstance(item.get(self.messages), list):
            prompt, completion = _chat_turns(item[self.messages])
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f'{where} has no non-empty "{self.prompt}" string (nor a "{self.messages}" chat); name the prompt '
                "column with data.prompt_field."
            )
        if completion is not None and not isinstance(completion, str):
            raise ValueError(f'{where} has a "{self.completion}" that is not a string.')
        answer = item.get(self.answer)
        return PromptRecord(prompt, None if answer is None else str(answer), completion)


def _chat_turns(messages: list) -> tuple[str | None, str | None]:
    users = [i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "user"]
    if not users:
        return None, None
    last = users[-1]
    after = messages[last + 1] if last + 1 < len(messages) else None
    reply = after.get("content") if isinstance(after, Mapping) and after.get("role") == "assistant" else None
    return messages[last].get("content"), reply


@dataclass(frozen=True)
class PromptRecord:
    """One prompt, with the reference answer when the data has one (verifiable rewards, accuracy) and a given
    completion when it has one (what ``objective.name: sft`` trains on)."""

    prompt: str
    answer: str | None = None
    completion: str | None = None


class DatasetPrompts(Sequence):
    """The :class:`PromptRecord` rows of a ``datasets.Dataset``, read one at a time from its Arrow files.

    Built by :func:`load_records`, which checks every prompt up front (the prompt column is scanned in Arrow
    batches, never turned into Python objects all at once): a bad row fails before training starts.

    Args:
        rows: the dataset (Arrow-backed, as ``load_dataset`` / ``load_from_disk`` give it).
        fields: which columns hold prompt, answer and completion.
        source: the name errors use.
    """

    def __init__(self, rows: Any, fields: PromptFields, source: str) -> None:
        self.rows, self.fields, self.source = rows, fields, source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return self.fields.record(self.rows[index], f"{self.source} row {index}")

    def __iter__(self) -> Iterator[PromptRecord]:
        for index in range(len(self)):
            yield self[index]

    def select(self, indices: Sequence[int]) -> DatasetPrompts:
        """The rows at ``indices`` (in that order), still in the Arrow files."""
        return DatasetPrompts(self.rows.select(indices), self.fields, self.source)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first row without a prompt (and the column to name) or an empty set."""
        if len(self) == 0:
            raise ValueError(f"{self.source} holds no prompts; OPD needs at least one.")
        columns = self.rows.column_names
        if self.fields.prompt not in columns:
            if self.fields.messages not in columns:
                raise ValueError(
                    f'{self.source} has no non-empty "{self.fields.prompt}" string (nor a "{self.fields.messages}" '
                    f"chat) column; its columns are {columns}: name the prompt column with data.prompt_field."
                )
            self[0]  # a chat column: its first row shows whether the turns are what we read
            return
        for offset, bad in self._scan(self.fields.prompt, blank_is_missing=True):
            self.fields.record(self.rows[offset + bad], f"{self.source} row {offset + bad}")  # raises, naming it

    def count_missing(self, field: str) -> int:
        """Rows whose column ``field`` is absent, null or blank."""
        if field not in self.rows.column_names:
            return len(self)
        return sum(1 for _ in self._scan(field, blank_is_missing=True, every=True))

    def _scan(self, field: str, blank_is_missing: bool, every: bool = False) -> Iterator[tuple[int, int]]:
        """``(batch offset, row in batch)`` of the rows whose ``field`` is null (or blank), batch by batch."""
        import pyarrow.compute as pc

        offset = 0
        for batch in self.rows.select_columns([field]).with_format("arrow").iter(batch_size=65_536):
            column = batch.column(field)
            missing = pc.is_null(column)
            if blank_is_missing and (column.type == "string" or column.type == "large_string"):
                blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
                missing = pc.or_(missing, pc.fill_null(blank, True))
            for row in pc.indices_nonzero(missing).to_pylist():
                yield offset, row
                if not every:
                    return
            offset += len(column)


def count_missing_completions(records: Sequence[PromptRecord]) -> int:
    """Records without a given completion (a :class:`DatasetPrompts` counts in its Arrow files)."""
    if isinstance(records, DatasetPrompts):
        return records.count_missing(records.fields.completion)
    return sum(1 for r in records if not r.completion)


def load_records(
    source: str | Path, fields: PromptFields | None = None, split: str = "train", subset: str | None = None
) -> Sequence[PromptRecord]:
    """The prompt records of ``source``: a JSONL file (:func:`load_prompts`, a list), a parquet file, a directory
    written by ``datasets``' ``save_to_disk`` (its ``split`` when it holds several), or a hub dataset name (``subset``,
    ``split``; the user's ``datasets`` cache, offline with ``HF_HUB_OFFLINE=1``), read through ``fields`` (the last
    three as a :class:`DatasetPrompts`, left in their Arrow files).

    Raises:
        FileNotFoundError: a local source does not exist, or a hub dataset cannot be loaded.
        ValueError: a row has no prompt, or the set holds none.
    """
    fields = fields or PromptFields()
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or (path.is_file() and path.suffix != ".parquet"):
        return load_prompts(path, fields)
    import datasets

    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"parquet file {path} does not exist.")
        rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif path.is_dir():
        rows = datasets.load_from_disk(str(path))
        if isinstance(rows, datasets.DatasetDict):
            if split not in rows:
                raise ValueError(f"{path} has the splits {sorted(rows)}, not {split!r}; set data.split.")
            rows = rows[split]
    else:
        try:
            rows = datasets.load_dataset(str(source), subset, split=split)
        except Exception as exc:  # the hub's and the cache's many errors: one line naming the fix
            raise FileNotFoundError(
                f"dataset {str(source)!r} (subset {subset!r}, split {split!r}) is neither a local file or directory "
                f"nor loadable from the hub or the datasets cache ({type(exc).__name__}: {exc}); give a JSONL or "
                "parquet file, a save_to_disk directory, or download the dataset where there is network."
            ) from exc
    records = DatasetPrompts(rows, fields, str(source))
    records.check()
    return records


def load_prompts(path: str | Path, fields: PromptFields | None = None) -> list[PromptRecord]:
    """Read a JSONL prompt file (one JSON object a line, its columns named by ``fields``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not UTF-8 text, a line is not JSON or lacks a non-empty ``"prompt"``, or the file
            holds no prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} does not exist; generate the shipped set with `python recipes/data/make_prompts.py`"
            ' or point data.train_path at a JSONL file with one {"prompt": ...} per line.'
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"prompt file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); give a JSONL file with one "
            '{"prompt": ...} per line.'
        ) from exc
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg}).") from exc
        if not isinstance(item, dict):
            raise ValueError(f'{path}:{number} is not a JSON object with a "prompt".')
        records.append((fields or PromptFields()).record(item, f"{path}:{number}"))
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts; OPD needs at least one.")
    return records


def synthetic_prompts(n: int, seed: int = 0) -> list[PromptRecord]:
    """Small arithmetic prompts made from a seed, for tiny-model runs and tests (no files needed)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        op = rng.choice("+-")
        records.append(PromptRecord(f"{a}{op}{b}=", str(a + b if op == "+" else a - b)))
    return records


def split_prompts(records: Sequence[PromptRecord], eval_size: int, seed: int = 0):
    """Hold out ``eval_size`` prompts (a seeded shuffle); returns ``(train, eval)`` (lists, or two
    :class:`DatasetPrompts` selections of a ``datasets`` set)."""
    if eval_size < 0 or eval_size >= len(records):
        raise ValueError(
            f"cannot hold out {eval_size} of {len(records)} prompts; lower data.eval_size or give data.eval_path."
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_size])
    if isinstance(records, DatasetPrompts):
        return records.select([i for i in range(len(records)) if i not in held]), records.select(order[:eval_size])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in order[:eval_size]]
