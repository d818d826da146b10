"""syrupy extensions that keep one readable file per snapshot under tests/snapshots/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"


class _Base(SingleFileSnapshotExtension):
    _write_mode = WriteMode.TEXT

    @classmethod
    def dirname(cls, *, test_location: Any) -> str:
        return str(SNAPSHOTS / test_location.basename)

    def serialize(self, data: Any, **kwargs: Any) -> str:
        return str(data)


class TextSnapshot(_Base):
    file_extension = "txt"


class JsonSnapshot(_Base):
    file_extension = "json"


class MarkdownSnapshot(_Base):
    file_extension = "md"
