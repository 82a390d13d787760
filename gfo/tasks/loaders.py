"""Readers for real data: plain text, JSON Lines, CSV/TSV tables (GLUE's SST-2 TSV), `datasets.load_from_disk`
directories, and procedurally generated `reasoning-gym` datasets (`reasoning_gym:NAME`).

Malformed input is an error naming the file, the line and what was expected; a file that is not UTF-8
text names the byte offset where it stops being it, and a directory given for a file says so.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from gfo.errors import not_utf8


class DataError(ValueError):
    """A data file that cannot be read as the task expects."""


def _check_file(path: str, kind: str) -> None:
    """`path` is a file (not a directory, not absent), else a `DataError` saying which."""
    if os.path.isdir(path):
        raise DataError(f"{kind} {path!r} is a directory: expected a {kind}")
    if not os.path.isfile(path):
        raise DataError(f"{kind} {path!r} does not exist")


def _not_utf8(path: str, kind: str) -> DataError:
    return DataError(f"{kind} {path!r} is not UTF-8 text ({not_utf8(path)}): re-encode it as UTF-8 (e.g. iconv "
                     f"-f latin1 -t utf-8)")


def read_text(path: str) -> str:
    _check_file(path, "text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise _not_utf8(path, "text file") from None
    if not text:
        raise DataError(f"text file {path!r} is empty")
    return text


def read_jsonl(path: str, fields: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Records of a JSON Lines file, each an object with at least `fields` (name → expected type)."""
    _check_file(path, "JSONL file")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg}); expected one object per line "
                                    f"with fields {sorted(fields)}") from None
                records.append(_check_record(record, fields, f"{path}:{line_no}"))
    except UnicodeDecodeError:
        raise _not_utf8(path, "JSONL file") from None
    if not records:
        raise DataError(f"JSONL file {path!r} has no records")
    return records


def read_table(path: str, fields: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Rows of a CSV (`.csv`) or tab-separated (`.tsv`) file with a header line, as dicts; integer-typed
    fields are converted (`label` of GLUE's SST-2 `sentence\tlabel` files)."""
    _check_file(path, "table file")
    try:
        return _read_table(path, fields)
    except UnicodeDecodeError:
        raise _not_utf8(path, "table file") from None


def _read_table(path, fields):
    import csv

    delimiter = "\t" if path.endswith(".tsv") else ","
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        missing = [name for name in fields if name not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: the header {reader.fieldnames} lacks {missing}; expected columns {sorted(fields)}")
        for line_no, row in enumerate(reader, 2):
            record: dict[str, Any] = dict(row)
            for name, kind in fields.items():
                if kind is int or (isinstance(kind, tuple) and int in kind and str not in kind):
                    try:
                        record[name] = int(row[name])
                    except (TypeError, ValueError):
                        raise DataError(f"{path}:{line_no}: column {name!r} is {row[name]!r}, expected an "
                                        f"integer") from None
            records.append(_check_record(record, fields, f"{path}:{line_no}"))
    if not records:
        raise DataError(f"table file {path!r} has no rows")
    return records


def reasoning_gym_records(spec: str, seed: int, size: int, **options) -> list[dict[str, Any]]:
    """`size` items of the `reasoning-gym` dataset named by `spec` (`reasoning_gym:countdown`), each a dict
    with `question`, `answer` and `metadata` (the optional `reasoning` extra installs the package)."""
    name = spec.split(":", 1)[1]
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(f"data_path={spec!r} needs the `reasoning-gym` package: pip install 'gfo[reasoning]'") from None
    try:
        data = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
    except Exception as e:  # noqa: BLE001 - unknown names and bad options come as various errors
        raise DataError(f"reasoning_gym dataset {name!r} with options {options}: {e}") from None
    return [dict(item) for item in data]


_DATASETS_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes (a dict; one split)


def read_records(path: str, fields: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """JSONL file, a JSON array (`.json`), a CSV/TSV table, or a Hugging Face `datasets` directory saved with `save_to_disk`
    (train split)."""
    if path.endswith((".csv", ".tsv")):
        return read_table(path, fields)
    if path.endswith(".json"):  # one JSON array of objects (the ES-at-scale reference's countdown.json)
        _check_file(path, "JSON file")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected an array of "
                                f"objects with fields {sorted(fields)}") from None
            except UnicodeDecodeError:
                raise _not_utf8(path, "JSON file") from None
        if not isinstance(data, list) or not data:
            raise DataError(f"{path}: expected a non-empty JSON array of objects with fields {sorted(fields)}")
        return [_check_record(r, fields, f"{path}[{i}]") for i, r in enumerate(data)]
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in _DATASETS_MARKERS):
            raise DataError(f"data file {path!r} is a directory, and not a `datasets` directory (save_to_disk "
                            f"writes {' or '.join(_DATASETS_MARKERS)}): expected a .jsonl, .json, .csv or .tsv "
                            f"file, or such a directory")
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path!r} is a directory: reading it needs the `datasets` package "
                            "(pip install datasets), or pass a .jsonl file") from None
        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise DataError(f"{path!r}: dataset dict without a 'train' split (has {list(data)})")
            data = data["train"]
        return [_check_record(dict(r), fields, f"{path}[{i}]") for i, r in enumerate(data)]
    return read_jsonl(path, fields)


def _check_record(record, fields, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with fields {sorted(fields)}, got {type(record).__name__}")
    for name, kind in fields.items():
        if name not in record:
            raise DataError(f"{where}: missing field {name!r}; expected fields {sorted(fields)}")
        if not isinstance(record[name], kind):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise DataError(f"{where}: field {name!r} is {type(record[name]).__name__}, expected {expected}")
    return record


def check_same_length(record: dict, a: str, b: str, where: str) -> None:
    if len(record[a]) != len(record[b]):
        raise DataError(f"{where}: {a!r} has {len(record[a])} items but {b!r} has {len(record[b])}")


def cycle(items: list, rng, size: int) -> Iterable:
    return [items[i] for i in rng.integers(0, len(items), size=size)]
