from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def write(tmp_path):
    """Write text (UTF-8) or bytes to ``tmp_path / name`` and return the path."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")
        return path

    return _write


@pytest.fixture
def make_vader():
    """Writer of synthetic VADER ground-truth directories (see ``_write_vader``)."""
    return _write_vader


def _write_vader(directory: Path, n: int = 20, override: dict[str, str] | None = None) -> Path:
    """Write the four ground-truth files in VADER's format: id TAB valence TAB text, CRLF, no header."""
    directory.mkdir(parents=True, exist_ok=True)
    from lmloop.data.builtin import VADER_FILES

    for domain, name in VADER_FILES.items():
        lines = []
        for i in range(n):
            # cycle positive, neutral, negative, strongly positive
            valence = [2.5, 0.2, -1.75, 0.5][i % 4]
            lines.append(f"{i + 1}\t{valence}\t{domain} sentence number {i}")
        content = (override or {}).get(domain, "\r\n".join(lines) + "\r\n")
        (directory / name).write_bytes(content.encode("utf-8"))
    return directory
