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
    """Input data is unusable. Carries where: file, 1-based line/row, field."""

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None
    ):
        self.path, self.line, self.field = path, line, field
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class AssetError(LmloopError):
    """A packaged model or data set could not be fetched or failed verification."""
