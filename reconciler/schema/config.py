"""The reconciler's configuration: pools, the image catalog, where state lives."""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, PrivateAttr, Strict, field_validator

from reconciler.schema.common import STRICT, Backend, Name

DEFAULT_CONFIG = "/etc/reconciler/config.yaml"
CONFIG_ENV = "RECONCILER_CONFIG"


class ImageFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class PoolConfig(BaseModel):
    """A libvirt storage pool the reconciler may place disks in."""

    model_config = STRICT
    uri: str = Field(min_length=1, description="libvirt connection URI")
    libvirt_pool: Name = Field(alias="libvirtPool", description="the pool's name in libvirt")
    backends: list[Annotated[Backend, Strict(False)]] = Field(min_length=1)


class ImageConfig(BaseModel):
    """A source image in the catalog: everything about it is declared, nothing probed."""

    model_config = STRICT
    location: str
    format: ImageFormat = Field(strict=False)
    sha256: str
    size: int = Field(gt=0, description="size of the image file in bytes")

    @field_validator("location")
    @classmethod
    def _location(cls, v: str) -> str:
        if not re.match(r"^(file|https?)://", v):
            raise ValueError(f"location {v!r} must be a file://, http:// or https:// URL")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return v


class StateConfig(BaseModel):
    model_config = STRICT
    dir: str = Field(min_length=1, description="directory for the record database and locks")
    lock_timeout: float = Field(
        30.0,
        ge=0,
        le=3600,
        alias="lockTimeout",
        description="seconds to wait while another process writes the records database "
        "before giving up (default 30)",
    )


class LibvirtConfig(BaseModel):
    model_config = STRICT
    reconnect_timeout: float = Field(
        30.0,
        ge=0,
        le=3600,
        alias="reconnectTimeout",
        description="seconds to keep re-opening a lost libvirt connection (a daemon "
        "restart) before the step that needs it fails (default 30)",
    )


class SafetyConfig(BaseModel):
    model_config = STRICT
    max_delete_percent: int = Field(10, ge=0, le=100, alias="maxDeletePercent")
    # `reconcile watch`: deletions within one resync interval up to this many disks are
    # never held by the guard, so tombstoning one instance in a small pool is not blocked.
    delete_guard_floor: int = Field(10, ge=0, alias="deleteGuardFloor")


class Config(BaseModel):
    model_config = STRICT
    api_version: Literal["reconciler/v1"] = Field(alias="apiVersion")
    kind: Literal["Config"]
    state: StateConfig
    pools: dict[Name, PoolConfig] = Field(min_length=1)
    images: dict[Name, ImageConfig] = Field(default_factory=dict)
    safety: SafetyConfig = Field(default_factory=lambda: SafetyConfig())
    libvirt: LibvirtConfig = Field(default_factory=lambda: LibvirtConfig())

    # Set by the loader: the directory relative paths are resolved against.
    _base_dir: str = PrivateAttr(default=".")

    def with_base_dir(self, base_dir: str) -> Config:
        self._base_dir = base_dir
        return self

    def state_dir(self) -> Path:
        return Path(self._base_dir, self.state.dir).resolve()


def config_path(explicit: str | None) -> str:
    """--config, else $RECONCILER_CONFIG, else the system default."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
