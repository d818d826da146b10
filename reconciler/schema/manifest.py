"""The instance manifest: one YAML file per instance describing its local disks."""

from __future__ import annotations

import re
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

from reconciler.schema.common import (
    BACKEND_FORMATS,
    STRICT,
    VOLUME_NAME_RULES,
    Backend,
    DiskFormat,
    Name,
    Size,
)


class TemplateKind(StrEnum):
    BLANK = "blank"
    SWAP = "swap"
    EXT4 = "ext4"
    XFS = "xfs"
    VFAT = "vfat"


FILESYSTEMS = frozenset({TemplateKind.EXT4, TemplateKind.XFS, TemplateKind.VFAT})
# Label limits of the Debian tools (mkfs.ext4 -L: 16 bytes, mkfs.xfs -L: 12, mkfs.vfat -n: 11).
LABEL_LIMITS = {TemplateKind.EXT4: 16, TemplateKind.XFS: 12, TemplateKind.VFAT: 11}
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_VFAT_LABEL_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-!#$%&'()@^`{}~")


class ImageSource(BaseModel):
    """The disk's content comes from an image in the config's catalog."""

    model_config = STRICT
    image: Name


class TemplateSource(BaseModel):
    """The disk is made from a template: blank, swap, or an empty filesystem."""

    model_config = STRICT
    template: TemplateKind = Field(strict=False)
    label: str | None = None

    @field_validator("label")
    @classmethod
    def _label(cls, label: str | None, info: ValidationInfo) -> str | None:
        template = info.data.get("template")
        if label is None or template is None:
            return label
        if template not in FILESYSTEMS:
            raise ValueError(f"a label only applies to filesystems, not to template {template}")
        limit = LABEL_LIMITS[template]
        if not label or len(label.encode()) > limit:
            raise ValueError(f"{template} labels are 1 to {limit} bytes, got {label!r}")
        if template == TemplateKind.VFAT:
            bad = sorted(set(label) - _VFAT_LABEL_OK)
            if bad and not set(label.upper()) - _VFAT_LABEL_OK:
                raise ValueError(
                    f"vfat label {label!r} must be upper case ASCII: write {label.upper()!r}"
                )
            if bad:
                shown = " ".join(repr(c) for c in bad)
                raise ValueError(
                    f"vfat label {label!r} may not contain {shown}; use upper-case letters, "
                    "digits, space and _-!#$%&'()@^`{}~"
                )
        elif not label.isprintable() or not label.isascii():
            raise ValueError(f"label {label!r} must be printable ASCII")
        return label


def _source_tag(v: Any) -> str | None:
    if isinstance(v, ImageSource):
        return "image"
    if isinstance(v, TemplateSource):
        return "template"
    if isinstance(v, dict):
        if "image" in v and "template" in v:
            return None
        if "image" in v:
            return "image"
        if "template" in v:
            return "template"
    return None


class DeletionPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class DiskSpec(BaseModel):
    """One disk of an instance."""

    model_config = STRICT
    name: Name
    backend: Backend = Field(strict=False)
    pool: Name
    format: DiskFormat = Field(strict=False)
    size: Size
    source: Annotated[
        Annotated[ImageSource, Tag("image")] | Annotated[TemplateSource, Tag("template")],
        Discriminator(
            _source_tag,
            custom_error_type="source",
            custom_error_message=(
                "source needs exactly one of 'image: <catalog id>' or 'template: <kind>'"
            ),
        ),
    ]
    deletion_policy: DeletionPolicy = Field(
        DeletionPolicy.DELETE, alias="deletionPolicy", strict=False
    )

    @field_validator("format")
    @classmethod
    def _backend_format(cls, fmt: DiskFormat, info: ValidationInfo) -> DiskFormat:
        backend = info.data.get("backend")
        if backend is None:
            return fmt
        allowed = BACKEND_FORMATS[backend]
        if fmt not in allowed:
            want = " or ".join(sorted(allowed))
            raise ValueError(f"backend {backend} cannot hold format {fmt}; it holds {want}")
        return fmt

    def spec_dict(self) -> dict[str, Any]:
        """The part of the disk the record keeps and JSON patches compare: the disk's JSON
        dump (by alias, without nulls). Written out because the planner asks once a disk
        and model_dump cost a third of a plan; tests/test_validation_shortcuts.py holds
        the two to the same result."""
        src = self.source
        source: dict[str, Any]
        if isinstance(src, ImageSource):
            source = {"image": src.image}
        elif src.label is None:
            source = {"template": src.template.value}
        else:
            source = {"template": src.template.value, "label": src.label}
        return {
            "name": self.name,
            "backend": self.backend.value,
            "pool": self.pool,
            "format": self.format.value,
            "size": self.size,
            "source": source,
            "deletionPolicy": self.deletion_policy.value,
        }


class Manifest(BaseModel):
    """The storage manifest of one instance."""

    model_config = STRICT
    api_version: Literal["reconciler/v1"] = Field(alias="apiVersion")
    kind: Literal["InstanceStorage"]
    instance: str
    deleted: bool = False
    disks: list[DiskSpec] = Field(default_factory=list, validate_default=True)

    @field_validator("instance")
    @classmethod
    def _uuid(cls, v: str) -> str:
        if _CANONICAL_UUID.fullmatch(v):
            return v  # what uuid.UUID(v) accepts and writes back as v: the common case
        try:
            u = uuid.UUID(v)
        except ValueError:
            raise ValueError(f"instance must be a UUID, got {v!r}") from None
        if str(u) != v:
            raise ValueError(f"instance UUID must be written lower case with dashes: {u}")
        return v

    @field_validator("disks")
    @classmethod
    def _live_has_disks(cls, disks: list[DiskSpec], info: ValidationInfo) -> list[DiskSpec]:
        if not disks and not info.data.get("deleted", False):
            raise ValueError("a manifest lists at least one disk (or sets deleted: true)")
        instance = info.data.get("instance")
        for d in disks:
            rule = VOLUME_NAME_RULES.get(d.backend)
            why = rule(f"{instance}_{d.name}") if rule and instance else None
            if why:
                raise ValueError(f"disk {d.name}: {why}")
        return disks
