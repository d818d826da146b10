"""Exceptions with messages a person can act on; the CLI renders them once."""

from __future__ import annotations

from dataclasses import dataclass


class ReconcileError(Exception):
    """Base class for every error the reconciler raises on purpose."""


@dataclass(frozen=True)
class Location:
    """Where in an input file a fact was found (1-based line and column)."""

    file: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.file
        if self.column is None:
            return f"{self.file}:{self.line}"
        return f"{self.file}:{self.line}:{self.column}"


class InputError(ReconcileError):
    """A manifest or config file is malformed; carries file, line and field."""

    def __init__(self, message: str, location: Location, field: str | None = None) -> None:
        self.message = message
        self.location = location
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = str(self.location)
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(ReconcileError):
    """The reconciler's configuration is missing or unusable."""


class RecordError(ReconcileError):
    """A disk record is missing or unreadable; work on that disk stops."""


class PoolError(ReconcileError):
    """A storage pool cannot be reached or is not usable."""
