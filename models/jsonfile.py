"""Reading a checkpoint's JSON files (config, index, tokenizer, template) with errors that name the file."""

from __future__ import annotations

import json


def read_json_object(path: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in the file at `path`; `error(message)` naming the file when it is not valid JSON
    (with the line and column) or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}), so not a JSON file") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
