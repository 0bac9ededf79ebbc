"""Bad input, named where it is: the file and line of malformed JSON, the missing column.

`_line_start` and `_first_line` shorten a bad line and an exception for the messages
of the other modules of the package.
"""
from __future__ import annotations

import json
from pathlib import Path

from launcher.config import DataConfig


def check_json(path: Path) -> int:
    """The number of rows; raise ValueError naming file:line and the line's start for the first malformed one.

    datasets' own error names neither the file nor the line. A .jsonl file (or a .json
    file that is not one JSON document) must hold one JSON object per line.
    """
    try:
        if path.suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:
                doc = json.loads(text)
                return len(doc) if isinstance(doc, list) else 1
            except json.JSONDecodeError as err:
                lines = text.splitlines()
                first_line = next((line for line in lines if line.strip()), "")
                if text.lstrip()[:1] in ("[", "{") and not _parses(first_line):  # one multi-line document
                    line = lines[err.lineno - 1] if err.lineno <= len(lines) else ""
                    raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno}): "
                                     f"{_line_start(line)}") from None
            return _check_json_lines(path, lines)
        with open(path, encoding="utf-8") as lines:
            return _check_json_lines(path, lines)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def _check_json_lines(path: Path, lines) -> int:
    rows = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rows += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: malformed JSON line ({err.msg}, column {err.colno}): "
                             f"{_line_start(line)}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected one JSON object per line, got "
                             f"{type(row).__name__}: {_line_start(line)}")
    return rows


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _line_start(line: str, width: int = 60) -> str:
    line = line.rstrip("\n")
    return repr(line[:width] + ("..." if len(line) > width else ""))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# (format -> the config fields naming the columns it needs; alpaca's input column may be absent)
_COLUMNS = {
    "text": ("text_column",),
    "prompt_completion": ("prompt_column", "completion_column"),
    "chat": ("messages_column",),
    "alpaca": ("instruction_column", "output_column"),
}


def check_columns(rows, cfg: DataConfig, label: str) -> None:
    found = list(rows.column_names)
    for key in _COLUMNS[cfg.format]:
        name = getattr(cfg, key)
        if name not in found:
            raise ValueError(f"{label}: no column {name!r} for data.format={cfg.format}; columns found: "
                             f"{', '.join(found)} (set data.{key}=<column>)")
