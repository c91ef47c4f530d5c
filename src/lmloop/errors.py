"""Errors a user can act on.

Every error raised for bad input is a :class:`LmloopError`; the CLI prints its message (no traceback)
and exits non-zero. Messages name the file, the line/row/key and what was expected.
"""

from __future__ import annotations


class LmloopError(Exception):
    """A problem the user can fix: bad input, bad config, missing asset."""

    exit_code = 2


class ConfigError(LmloopError):
    """A recipe or CLI option is wrong (names the file, the key and the expected type)."""


class DataError(LmloopError):
    """Input data is unusable. Carries where: file, 1-based line/row, column, field.

    The message starts with the location, e.g. ``f.csv, line 3, column 7, field 'text': ...``; ``kind``
    names what ``line`` counts ("line" in text files, "row" in Parquet/HF data, "record" in a JSON array).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        kind: str = "line",
        column: int | None = None,
    ):
        if path is not None and not str(path):
            path = None  # an unknown source is passed as ""
        self.path = None if path is None else str(path)
        self.line, self.field = line, field
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"{kind} {line}")
        if column is not None:
            where.append(f"column {column}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class AssetError(LmloopError):
    """A packaged model or data set could not be fetched or failed verification."""
