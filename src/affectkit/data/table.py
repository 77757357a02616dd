"""Your own conversations as a table of utterances: CSV, TSV or JSONL (or a folder of them), one row each.

Columns (names can be mapped, see :class:`Columns`): ``dialogue`` (id), ``speaker``, ``text`` (required);
``order`` (integer position in the dialogue; default: row order), ``label`` (class name; without the
column the table is unlabelled), ``split`` (train/dev/test, ``valid``/``validation`` = dev), ``audio`` (a
file path, relative to the table's folder) with ``start``/``end`` (seconds within it).

Every bad row is a one-line :class:`~affectkit.errors.DataError` ``FILE:LINE: column 'NAME': what``; the
whole input is checked before anything is written.

Encodings: a file is read as UTF-8 (a BOM is dropped).  A file that is not UTF-8 and holds no UTF-8
multi-byte character is read as cp1252 (Windows-1252, which Excel writes on Windows); a file mixing both
is refused, naming the first line that is not UTF-8.  C1 control characters (U+0080-U+009F, what cp1252
text decoded as latin1 leaves, e.g. ``\\x92``) become the intended cp1252 characters (``’``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.data.cosmic import fix_cp1252, sort_tags
from affectkit.errors import DataError

log = logging.getLogger("affectkit")

__all__ = ["Columns", "Table", "TableDialogue", "assign_splits", "read_rows", "read_table", "table_files"]

SPLITS: tuple[str, ...] = ("train", "dev", "test")
SPLIT_ALIASES: dict[str, str] = {"train": "train", "dev": "dev", "valid": "dev", "validation": "dev",
                                 "val": "dev", "test": "test"}
SUFFIXES: dict[str, str] = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": "json", ".ndjson": "json"}
ENCODINGS: tuple[str, ...] = ("auto", "utf-8", "cp1252")
#: Default fractions of dialogues for train, dev and test when the table has no split column.
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class Columns:
    """The table's column names for each field (``affectkit import --column text=utterance``)."""

    dialogue: str = "dialogue"
    order: str = "order"
    speaker: str = "speaker"
    text: str = "text"
    label: str = "label"
    split: str = "split"
    audio: str = "audio"
    start: str = "start"
    end: str = "end"

    REQUIRED = ("dialogue", "speaker", "text")

    @classmethod
    def mapped(cls, pairs: Mapping[str, str]) -> tuple[Columns, frozenset[str]]:
        """Columns with ``pairs`` (field -> column name) replacing the defaults, and the fields mapped."""
        valid = [f.name for f in fields(cls)]
        for key, value in pairs.items():
            if key not in valid:
                raise DataError(f"unknown field {key!r} in a column mapping; valid: {', '.join(valid)}")
            if not value:
                raise DataError(f"empty column name for field {key!r}")
        return cls(**dict(pairs)), frozenset(pairs)


@dataclass
class TableDialogue:
    """One conversation from a table, in utterance order; ``lines`` name each utterance's source line."""

    vid: str
    file: Path
    lines: list[int]
    speakers: list[str]
    sentences: list[str]
    labels: list[str] | None
    split: str | None
    audio: list[tuple[Path, float | None, float | None]] | None

    def __len__(self) -> int:
        return len(self.sentences)


@dataclass
class Table:
    """Checked dialogues (in the order they first appear) and what the table holds."""

    dialogues: list[TableDialogue]
    classes: list[str] | None
    labelled: bool
    has_split: bool
    has_audio: bool
    files: list[Path]
    notes: list[str] = field(default_factory=list)

    @property
    def speakers(self) -> list[str]:
        return sort_tags({s for d in self.dialogues for s in d.speakers})

    @property
    def utterances(self) -> int:
        return sum(len(d) for d in self.dialogues)


@dataclass
class _Row:
    file: Path
    line: int
    values: dict[str, Any]


# ------------------------------------------------------------------------------------------------ reading


def table_files(source: str | Path) -> list[Path]:
    """The table files of ``source``: the file itself, or a folder's ``*.csv|*.tsv|*.jsonl`` (sorted)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{source}: no table files ({', '.join(sorted(SUFFIXES))}) in this folder")
        return files
    if not source.is_file():
        raise DataError(f"{source}: file not found")
    if source.suffix.lower() not in SUFFIXES:
        raise DataError(f"{source}: unknown table format {source.suffix!r}; use {', '.join(sorted(SUFFIXES))}")
    return [source]


def decode(path: Path, data: bytes, encoding: str = "auto") -> tuple[str, str]:
    """(text, encoding used) of a table file's bytes; see the module docstring for the rule."""
    if encoding not in ENCODINGS:
        raise DataError(f"unknown encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if encoding in ("auto", "utf-8"):
        try:
            return fix_cp1252(data.decode("utf-8")), "utf-8"
        except UnicodeDecodeError as exc:
            bad_line = data.count(b"\n", 0, exc.start) + 1
            if encoding == "utf-8":
                raise DataError(f"{path}:{bad_line}: not UTF-8 (byte 0x{data[exc.start]:02x}); "
                                "re-save the file as UTF-8, or pass --encoding cp1252") from None
            for n, raw in enumerate(data.split(b"\n"), 1):
                if not raw.isascii():
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError:
                        continue
                    raise DataError(f"{path}:{bad_line}: mixed encodings: this line is not UTF-8 but line {n} is "
                                    "(UTF-8 multi-byte text); re-save the whole file as UTF-8") from None
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: byte 0x{data[exc.start]:02x} is neither UTF-8 nor cp1252; "
                        "re-save the file as UTF-8") from None


def read_rows(path: Path, encoding: str = "auto") -> tuple[list[_Row], list[str] | None, str]:
    """The rows of one table file (blank lines skipped), its header (CSV/TSV; None for JSONL) and encoding."""
    text, used = decode(path, path.read_bytes(), encoding)
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "json":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(value).__name__}")
            rows.append(_Row(path, n, value))
        return rows, None, used
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=kind)
    header: list[str] | None = None
    rows = []
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells or all(not c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                dup = sorted({c for c in header if header.count(c) > 1})
                if dup:
                    raise DataError(f"{path}:{line}: column {dup[0]!r} appears twice in the header")
                continue
            if len(cells) != len(header):
                raise DataError(f"{path}:{line}: {len(cells)} cells but the header has {len(header)} columns "
                                f"(a {'tab' if kind == chr(9) else 'comma'} inside an unquoted field?)")
            rows.append(_Row(path, line, dict(zip(header, cells))))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed {'TSV' if kind == chr(9) else 'CSV'} ({exc})") from None
    if header is None:
        raise DataError(f"{path}: empty file (no header)")
    return rows, header, used


# --------------------------------------------------------------------------------------------- validation


def _cell(row: _Row, column: str) -> str:
    """A cell as a stripped string ('' when absent or null); JSON numbers become their text."""
    value = row.values.get(column)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{row.file}:{row.line}: column {column!r}: expected a string or number, "
                        f"got {type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _err(row: _Row, column: str, what: str) -> DataError:
    return DataError(f"{row.file}:{row.line}: column {column!r}: {what}")


def _number(row: _Row, column: str) -> float | None:
    raw = _cell(row, column)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _err(row, column, f"{raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise _err(row, column, f"{raw!r} must be a finite number of seconds >= 0")
    return value


def _read_files(files: list[Path], columns: Columns, mapped: frozenset[str],
                encoding: str) -> tuple[list[tuple[Path, list[_Row], set[str]]], list[str]]:
    """(file, rows, column names) of every file, each holding rows and the required and mapped columns."""
    per_file, notes = [], []
    for path in files:
        rows, header, used = read_rows(path, encoding)
        if not rows:
            raise DataError(f"{path}: no rows (only a header or blank lines)")
        if used != "utf-8":
            notes.append(f"{path.name}: read as {used} (not UTF-8)")
            log.info("%s: not UTF-8; read as %s", path, used)
        present = set(header) if header is not None else {k for r in rows for k in r.values}
        first = 1 if header is not None else rows[0].line
        for name in (*Columns.REQUIRED, *sorted(mapped)):
            if getattr(columns, name) not in present:
                hint = f" (map yours with --column {name}=NAME)" if name not in mapped else ""
                raise DataError(f"{path}:{first}: column {getattr(columns, name)!r} ({name}) missing; "
                                f"the table has: {', '.join(sorted(present))}{hint}")
        per_file.append((path, rows, present))
    return per_file, notes


def _check_row(row: _Row, columns: Columns, labelled: bool, classes: list[str] | None, has_split: bool) -> None:
    """The cells every row needs: speaker, text, a label (labelled tables; a declared one), a known split."""
    if not _cell(row, columns.speaker):
        raise _err(row, columns.speaker, "empty speaker")
    text = row.values.get(columns.text)
    if text is not None and not isinstance(text, str):
        raise _err(row, columns.text, f"expected a string, got {type(text).__name__}")
    if not _cell(row, columns.text):
        raise _err(row, columns.text, "missing text (empty)")
    if labelled:
        label = _cell(row, columns.label)
        if not label:
            raise _err(row, columns.label, "missing label (a labelled table needs one on every row; "
                                           "import with --unlabelled for prediction only)")
        if classes is not None and label not in classes:
            raise _err(row, columns.label, f"unknown label {label!r}; declared classes: {', '.join(classes)}")
    if has_split and _cell(row, columns.split).lower() not in SPLIT_ALIASES:
        raise _err(row, columns.split, f"split {_cell(row, columns.split).lower()!r} is not train, dev (valid) "
                                       "or test")


def _in_order(vid: str, items: list[tuple[_Row, int]], columns: Columns) -> list[_Row]:
    """A dialogue's rows sorted by the order column; positions must follow each other (no gaps, no repeats)."""
    items = sorted(items, key=lambda t: t[1])
    for (prev, a), (row, b) in zip(items, items[1:]):
        if a == b:
            raise _err(row, columns.order, f"dialogue {vid!r}: position {b} repeats line {prev.line}")
        if b != a + 1:
            missing = f"{a + 1}" if b == a + 2 else f"{a + 1}-{b - 1}"
            raise _err(row, columns.order, f"dialogue {vid!r}: position {b} follows {a}; a gap ({missing} missing)")
    return [r for r, _ in items]


def _split_of(vid: str, rows: list[_Row], columns: Columns) -> str:
    split = SPLIT_ALIASES[_cell(rows[0], columns.split).lower()]
    for r in rows[1:]:
        if SPLIT_ALIASES[_cell(r, columns.split).lower()] != split:
            raise _err(r, columns.split, f"dialogue {vid!r} is in split {split} on line {rows[0].line}; "
                                         "a dialogue belongs to one split")
    return split


def _audio_of(rows: list[_Row], columns: Columns) -> list[tuple[Path, float | None, float | None]]:
    """(file, start, end) per row; the file must exist (relative to the table) and end follow start."""
    out = []
    for r in rows:
        start, end = _number(r, columns.start), _number(r, columns.end)
        if start is not None and end is not None and end <= start:
            raise _err(r, columns.end, f"end {end:g} s is not after start {start:g} s")
        file = r.file.parent / _cell(r, columns.audio)
        if not file.is_file():
            raise _err(r, columns.audio, f"audio file {_cell(r, columns.audio)!r} not found "
                                         f"(paths are relative to {r.file.parent})")
        out.append((file, start, end))
    return out


def read_table(source: str | Path, columns: Columns | None = None, mapped: frozenset[str] = frozenset(),
               classes: Sequence[str] | None = None, encoding: str = "auto",
               labelled: bool | None = None) -> Table:
    """Read and check every row of ``source`` (a table file or a folder of them).

    ``classes`` declares the class names (a label outside them is refused); without it the classes are the
    labels found, sorted (digits by value).  ``labelled``: None = labelled if the label column is there;
    False ignores a label column.  Columns named in ``mapped`` must exist; the optional ones are used when
    present.
    """
    columns = columns or Columns()
    files = table_files(source)
    per_file, notes = _read_files(files, columns, mapped, encoding)
    has_label = all(columns.label in present for _, _, present in per_file)
    if labelled is None:
        labelled = has_label
    elif labelled and not has_label:
        path = next(p for p, _, present in per_file if columns.label not in present)
        raise DataError(f"{path}:1: column {columns.label!r} (label) missing")
    has_split = any(columns.split in present for _, _, present in per_file)
    has_audio = any(columns.audio in present for _, _, present in per_file)
    if classes is not None:
        classes = [str(c).strip() for c in classes]
        if not classes or any(not c for c in classes) or len(set(classes)) != len(classes):
            raise DataError(f"--classes must be distinct non-empty names, got {classes!r}")

    groups: dict[str, list[tuple[_Row, int]]] = {}  # dialogue -> (row, position) in file order
    owner: dict[str, Path] = {}
    ordered: set[str] = set()  # dialogues whose file has an order column
    audio_rows = 0
    for path, rows, present in per_file:
        for index, row in enumerate(rows):
            vid = _cell(row, columns.dialogue)
            if not vid:
                raise _err(row, columns.dialogue, "empty dialogue id")
            if owner.setdefault(vid, path) != path:
                raise _err(row, columns.dialogue, f"dialogue {vid!r} also appears in {owner[vid]}; "
                                                  "dialogue ids must be unique across the files")
            _check_row(row, columns, labelled, classes, has_split)
            if has_audio and _cell(row, columns.audio):
                audio_rows += 1
            elif _cell(row, columns.start) or _cell(row, columns.end):
                raise _err(row, columns.start, "start/end given without an audio file")
            position = index
            if columns.order in present:
                raw = _cell(row, columns.order)
                try:
                    position = int(raw)
                except ValueError:
                    raise _err(row, columns.order, f"{raw!r} is not an integer position") from None
                ordered.add(vid)
            groups.setdefault(vid, []).append((row, position))
    if has_audio and audio_rows not in (0, sum(len(r) for _, r, _ in per_file)):
        row = next(r for _, rows, _ in per_file for r in rows if not _cell(r, columns.audio))
        raise _err(row, columns.audio, "no audio file here but other rows have one: give every utterance its "
                                       "audio, or none")
    has_audio = audio_rows > 0

    dialogues = []
    for vid, items in groups.items():
        rows = _in_order(vid, items, columns) if vid in ordered else [r for r, _ in items]
        dialogues.append(TableDialogue(
            vid=vid, file=rows[0].file, lines=[r.line for r in rows],
            speakers=[_cell(r, columns.speaker) for r in rows],
            sentences=[fix_cp1252(_cell(r, columns.text)) for r in rows],
            labels=[_cell(r, columns.label) for r in rows] if labelled else None,
            split=_split_of(vid, rows, columns) if has_split else None,
            audio=_audio_of(rows, columns) if has_audio else None))
    if labelled and classes is None:
        classes = sort_tags({lab for d in dialogues for lab in d.labels or []})
    return Table(dialogues, classes if labelled else (list(classes) if classes else None), labelled, has_split,
                 has_audio, files, notes)


# ------------------------------------------------------------------------------------------------- splits


def assign_splits(table: Table, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> str:
    """Give every dialogue a split, by dialogue (never by utterance); returns a note saying how.

    A table with a split column keeps it (each split must then hold a dialogue).  Otherwise the dialogue ids,
    sorted, are shuffled with ``numpy.random.default_rng(seed)`` and cut by ``fractions`` (train, dev, test;
    each split gets at least one dialogue, so at least 3 are needed).  An unlabelled table without a split
    column goes to test whole (it is for prediction only).
    """
    if table.has_split:
        counts = {s: sum(d.split == s for d in table.dialogues) for s in SPLITS}
        if table.labelled:
            empty = [s for s, n in counts.items() if not n]
            if empty:
                raise DataError(f"{table.files[0]}: the split column puts no dialogue in {', '.join(empty)}; "
                                "every split needs one (or drop the column for a seeded split)")
        return "splits from the table's split column"
    if not table.labelled:
        for d in table.dialogues:
            d.split = "test"
        return "unlabelled: every dialogue in test (for prediction)"
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions) or sum(fractions) <= 0:
        raise DataError(f"split fractions must be three numbers >= 0 (train dev test), got {list(fractions)}")
    total = float(sum(fractions))
    train_f, dev_f, test_f = (f / total for f in fractions)
    n = len(table.dialogues)
    if n < 3:
        raise DataError(f"{table.files[0]}: {n} dialogue(s); a seeded split needs at least 3 (one per split), "
                        "or give a split column")
    n_dev = max(1, round(dev_f * n))
    n_test = max(1, round(test_f * n))
    if n - n_dev - n_test < 1:
        n_dev, n_test = 1, 1
    order = sorted(table.dialogues, key=lambda d: d.vid)
    perm = np.random.default_rng(seed).permutation(n)
    for rank, i in enumerate(perm):
        order[i].split = "dev" if rank < n_dev else "test" if rank < n_dev + n_test else "train"
    return (f"seeded split by dialogue (seed {seed}): {n - n_dev - n_test}/{n_dev}/{n_test} dialogues "
            f"train/dev/test from fractions {train_f:.2f}/{dev_f:.2f}/{test_f:.2f}")
