"""Reading a site's own text-classification file.

A site's data is one file: CSV, TSV or JSON Lines, chosen by the file's suffix,
with a text column and a label column whose names are configurable. Every
problem a user can hit raises :class:`DataError` naming the file, the line and
what to change.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedseal.common.errors import FedsealError

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


class DataError(FedsealError, ValueError):
    """A data file cannot be used as given."""

    code = "data.error"


@dataclass(frozen=True)
class Examples:
    """Texts with integer labels indexing ``label_names``."""

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self) -> dict[str, int]:
        """Number of examples per label name (every label present, zeros too)."""
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}

    def subset(self, indices: Sequence[int], source: str | None = None) -> Examples:
        """The examples at ``indices``, same label names."""
        return Examples(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            self.label_names,
            source or self.source,
        )


def _rows(path: Path, fmt: str) -> Iterable[tuple[int, dict[str, object]]]:
    """Yield (line number, row) pairs of a file in the given format."""
    with path.open("r", encoding="utf-8", newline="") as fh:
        if fmt == "jsonl":
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: each line must be a JSON object")
                yield lineno, row
            return
        delimiter = "\t" if fmt == "tsv" else ","
        # TSV in the GLUE layout has no quoting; CSV uses standard quoting.
        reader = (
            csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE)
            if fmt == "tsv"
            else csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        )
        header = next(reader, None)
        if header is None:
            return
        for lineno, values in enumerate(reader, start=2):
            if not values:
                continue
            if len(values) != len(header):
                raise DataError(
                    f"{path}:{lineno}: {len(values)} fields but the header has {len(header)}; "
                    f"check the delimiter ({'tab' if fmt == 'tsv' else 'comma'}) and quoting"
                )
            yield lineno, dict(zip(header, values))


def read_examples(
    path: str | Path,
    *,
    text_column: str = "sentence",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> Examples:
    """Read a labelled text file.

    Parameters
    ----------
    path
        A ``.csv``, ``.tsv`` or ``.jsonl`` file with a header (CSV/TSV) or one JSON
        object per line.
    text_column, label_column
        Names of the columns holding the text and the label.
    label_names
        The label set agreed by the federation. When given, a label outside it is
        an error (a site must not silently invent a class); when omitted, the
        sorted set of labels found in the file is used.

    Raises
    ------
    DataError
        Missing file, unknown format, non-UTF-8 bytes, empty file, missing column,
        empty text, or a label outside ``label_names``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"data file {path}: unknown format {path.suffix!r}; use .csv, .tsv or .jsonl")
    texts: list[str] = []
    raw_labels: list[str] = []
    try:
        for lineno, row in _rows(path, fmt):
            for column in (text_column, label_column):
                if column not in row:
                    raise DataError(
                        f"{path}:{lineno}: no column {column!r}; columns are "
                        f"{sorted(map(str, row))}. Set --text-column / --label-column"
                    )
            text = row[text_column]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{lineno}: the text in column {text_column!r} is empty")
            label = row[label_column]
            if isinstance(label, bool) or label is None or isinstance(label, (list, dict)):
                raise DataError(f"{path}:{lineno}: label {label!r} must be a string or integer")
            texts.append(text)
            raw_labels.append(str(label).strip())
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {path} is not UTF-8 (byte {exc.start}): re-save it as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"data file {path}: cannot parse as {fmt.upper()}: {exc}") from None
    if not texts:
        raise DataError(f"data file {path} has no examples (only a header or blank lines)")
    if label_names is None:
        names = tuple(sorted(set(raw_labels), key=label_sort_key))
    else:
        names = tuple(str(n) for n in label_names)
    index = {name: i for i, name in enumerate(names)}
    labels: list[int] = []
    for i, label in enumerate(raw_labels):
        if label not in index:
            raise DataError(
                f"data file {path}: example {i + 1} has label {label!r}, which is not one of "
                f"the federation's labels {list(names)}; fix the file or set --labels"
            )
        labels.append(index[label])
    return Examples(texts, labels, names, str(path))


def label_sort_key(label: str) -> tuple[int, float | str]:
    """Sort numeric labels numerically ("2" before "10"), others alphabetically."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def write_examples(
    examples: Examples, path: str | Path, *, text_column: str = "sentence", label_column: str = "label"
) -> Path:
    """Write examples as JSON Lines (used by the simulation to give each site its file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for text, label in zip(examples.texts, examples.labels):
            fh.write(json.dumps({text_column: text, label_column: examples.label_names[label]}) + "\n")
    tmp.replace(path)
    return path
