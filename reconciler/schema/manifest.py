"""The instance manifest: one YAML file per instance describing its local disks."""

from __future__ import annotations

import re
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from reconciler.model.naming import snapshot_name
from reconciler.schema.common import (
    BACKEND_FORMATS,
    STRICT,
    VOLUME_NAME_RULES,
    Backend,
    DiskFormat,
    Name,
    Rate,
    Size,
)
from reconciler.schema.recordcheck import SNAPSHOT_NAME_RE, SNAPSHOT_REF_RE

# STRICT, with each model's validator built when it first validates rather than when its
# class is made: a run whose manifests all come from the manifest cache (every re-run of a
# converged host, schema/speed/mcache.py) validates none and was building them all at
# import (issue 27).
MANIFEST = ConfigDict(**STRICT, defer_build=True)


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

    model_config = MANIFEST
    image: Name


class TemplateSource(BaseModel):
    """The disk is made from a template: blank, swap, or an empty filesystem."""

    model_config = MANIFEST
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


def json_pattern(rx: re.Pattern[str]) -> str:
    """`rx` (a fullmatch written as match + \\Z) as a JSON Schema pattern (a search)."""
    return "^" + re.sub(r"\(\?P<\w+>", "(", rx.pattern).removesuffix("\\Z") + "$"


MAX_SNAPSHOTS = 64  # a disk's snapshots: each is a whole copy on a file or lvm pool


def check_snapshot_name(value: Any) -> str:
    """A snapshot's name: safe at the end of a volume name (VOLUME+snap-NAME)."""
    if not isinstance(value, str):
        raise ValueError(f"a snapshot's name must be a string, not {type(value).__name__}")
    if not SNAPSHOT_NAME_RE.match(value):
        raise ValueError(
            f"snapshot name {value!r} must be 1 to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return value


SnapshotName = Annotated[
    str,
    BeforeValidator(check_snapshot_name),
    WithJsonSchema({"type": "string", "pattern": json_pattern(SNAPSHOT_NAME_RE)}),
]


class SnapshotSource(BaseModel):
    """The disk is made from a snapshot of a disk (a restore): INSTANCE/DISK@NAME. It is
    recorded as the disk's source, and only read when the disk is made."""

    model_config = MANIFEST
    snapshot: str = Field(
        json_schema_extra={"pattern": json_pattern(SNAPSHOT_REF_RE)},
        description="INSTANCE/DISK@NAME: a snapshot the reconciler took, in the same pool, "
        "layout and no larger than this disk",
    )

    @field_validator("snapshot")
    @classmethod
    def _ref(cls, ref: str) -> str:
        if not SNAPSHOT_REF_RE.match(ref):
            raise ValueError(
                f"snapshot {ref!r} must be INSTANCE/DISK@NAME (an instance UUID, a disk name "
                "and a snapshot name)"
            )
        return ref

    def parts(self) -> tuple[str, str, str]:
        """(instance, disk, snapshot name)."""
        m = SNAPSHOT_REF_RE.match(self.snapshot)
        assert m is not None
        return m["instance"], m["disk"], m["name"]


def _source_tag(v: Any) -> str | None:
    if isinstance(v, ImageSource):
        return "image"
    if isinstance(v, TemplateSource):
        return "template"
    if isinstance(v, SnapshotSource):
        return "snapshot"
    if isinstance(v, dict):
        found = [k for k in ("image", "template", "snapshot") if k in v]
        return found[0] if len(found) == 1 else None
    return None


class DeletionPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class Bus(StrEnum):
    VIRTIO = "virtio"
    SCSI = "scsi"
    SATA = "sata"
    IDE = "ide"
    USB = "usb"


# A target's name says its bus in libvirt's and the guest's naming: a `vd*` disk on a SCSI
# bus (or an `sd*` on virtio) is accepted by libvirt and then named otherwise in the guest.
DEV_BUSES: dict[str, frozenset[Bus]] = {
    "vd": frozenset({Bus.VIRTIO}),
    "sd": frozenset({Bus.SCSI, Bus.SATA, Bus.USB}),
    "hd": frozenset({Bus.IDE}),
}
DEFAULT_BUS = {"vd": Bus.VIRTIO, "sd": Bus.SCSI, "hd": Bus.IDE}


class DiskTarget(BaseModel):
    """Where the guest sees the disk: libvirt's `<target dev= bus=>`."""

    model_config = MANIFEST
    dev: str = Field(
        pattern=r"^(vd|sd|hd)[a-z]{1,3}$",
        description="the guest's device name: vdX (virtio), sdX (scsi, sata, usb), hdX (ide)",
    )
    bus: Bus | None = Field(
        None, strict=False, description="default: virtio for vd*, scsi for sd*, ide for hd*"
    )

    @model_validator(mode="after")
    def _bus_fits(self) -> DiskTarget:
        if self.bus is not None and self.bus not in DEV_BUSES[self.dev[:2]]:
            fits = " or ".join(sorted(DEV_BUSES[self.dev[:2]]))
            raise ValueError(f"target {self.dev} is on bus {fits}, not {self.bus}")
        return self

    def resolved_bus(self) -> Bus:
        return self.bus or DEFAULT_BUS[self.dev[:2]]


class IoTune(BaseModel):
    """A disk's QoS limits: libvirt's `<iotune>` (qemu throttles the guest's I/O to them).
    A total limit and a read or write limit of the same kind cannot both be set
    (libvirt refuses it)."""

    model_config = MANIFEST
    total_bytes_sec: Rate | None = Field(None, alias="totalBytesSec")
    read_bytes_sec: Rate | None = Field(None, alias="readBytesSec")
    write_bytes_sec: Rate | None = Field(None, alias="writeBytesSec")
    total_iops_sec: int | None = Field(None, gt=0, alias="totalIopsSec")
    read_iops_sec: int | None = Field(None, gt=0, alias="readIopsSec")
    write_iops_sec: int | None = Field(None, gt=0, alias="writeIopsSec")

    @model_validator(mode="after")
    def _total_or_split(self) -> IoTune:
        for kind in ("bytes", "iops"):
            total = getattr(self, f"total_{kind}_sec")
            split = [d for d in ("read", "write") if getattr(self, f"{d}_{kind}_sec") is not None]
            if total is not None and split:
                raise ValueError(
                    f"total{kind.capitalize()}Sec cannot be set with "
                    + " or ".join(f"{d}{kind.capitalize()}Sec" for d in split)
                    + " (libvirt refuses both)"
                )
        return self

    def limits(self) -> list[tuple[str, int]]:
        """(libvirt element name, value) of each limit set, in libvirt's order."""
        out = []
        for kind in ("bytes", "iops"):
            for d in ("total", "read", "write"):
                v = getattr(self, f"{d}_{kind}_sec")
                if v is not None:
                    out.append((f"{d}_{kind}_sec", int(v)))
        return out


class EncryptionFormat(StrEnum):
    LUKS = "luks"


class EncryptionSpec(BaseModel):
    """How the disk is encrypted at rest: `luks` (qemu's LUKS, a random key per disk kept
    in a libvirt secret). Part of the spec: recorded and planned; changing it on a disk
    that exists is a plan error (a migrate into the new layout, not built yet)."""

    model_config = MANIFEST
    format: EncryptionFormat = Field(
        strict=False,
        description="luks: qemu's LUKS (raw files, LVs and rbd images as qemu's luks format, "
        "qcow2 with its native LUKS), a random key per disk kept in a private libvirt secret",
    )

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format.value}


class AttachSpec(BaseModel):
    """How a domain attaches the disk: not storage, so never recorded nor planned (changing
    it changes only the `<disk>` element `reconcile disks` gives). A compute service may
    override each field (reconciler.client)."""

    model_config = MANIFEST
    target: DiskTarget | None = Field(
        None, description="default: the next free vdX in the manifest's order, bus virtio"
    )
    serial: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.+-]{1,20}$",
        description="the serial the guest sees (virtio-blk shows at most 20 bytes)",
    )
    iotune: IoTune | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class DiskSpec(BaseModel):
    """One disk of an instance."""

    model_config = MANIFEST
    name: Name
    backend: Backend = Field(strict=False)
    pool: Name
    format: DiskFormat = Field(strict=False)
    size: Size
    source: Annotated[
        Annotated[ImageSource, Tag("image")]
        | Annotated[TemplateSource, Tag("template")]
        | Annotated[SnapshotSource, Tag("snapshot")],
        Discriminator(
            _source_tag,
            custom_error_type="source",
            custom_error_message=(
                "source needs exactly one of 'image: <catalog id>', 'template: <kind>' or "
                "'snapshot: INSTANCE/DISK@NAME'"
            ),
        ),
    ]
    deletion_policy: DeletionPolicy = Field(
        DeletionPolicy.DELETE, alias="deletionPolicy", strict=False
    )
    # In spec_dict only when set, so the specs, records and plans of disks without it
    # are byte for byte what they were before it existed.
    encryption: EncryptionSpec | None = Field(
        None, description="encryption at rest: {format: luks}; absent: not encrypted"
    )
    # Not part of spec_dict (a disk's record and patches never see it): the planner reads
    # it to take and delete snapshot records (diff/snapshots.py).
    snapshots: list[SnapshotName] | None = Field(
        None,
        max_length=MAX_SNAPSHOTS,
        description=f"the disk's snapshots by name, each taken once (at most {MAX_SNAPSHOTS}); "
        "a name dropped from the list is deleted",
    )
    # Not part of spec_dict: the record and the plan never see it.
    attach: AttachSpec | None = Field(
        None, description="how a domain attaches the disk (reconcile disks); not planned"
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

    @field_validator("snapshots")
    @classmethod
    def _unique(cls, names: list[str] | None) -> list[str] | None:
        if names is not None:
            seen: set[str] = set()
            for n in names:
                if n in seen:
                    raise ValueError(f"snapshot {n} is listed twice")
                seen.add(n)
        return names

    @model_validator(mode="after")
    def _encryptable(self) -> DiskSpec:
        if self.encryption is not None and self.format is DiskFormat.PLOOP:
            raise ValueError(
                "encryption: a ploop disk (qemu's parallels format) cannot be encrypted; "
                "use format raw or qcow2"
            )
        return self

    def spec_dict(self) -> dict[str, Any]:
        """The part of the disk the record keeps and JSON patches compare: the disk's JSON
        dump (by alias, without nulls). Written out because the planner asks once a disk
        and model_dump cost a third of a plan; tests/test_validation_shortcuts.py holds
        the two to the same result."""
        src = self.source
        source: dict[str, Any]
        if isinstance(src, ImageSource):
            source = {"image": src.image}
        elif isinstance(src, SnapshotSource):
            source = {"snapshot": src.snapshot}
        elif src.label is None:
            source = {"template": src.template.value}
        else:
            source = {"template": src.template.value, "label": src.label}
        out: dict[str, Any] = {
            "name": self.name,
            "backend": self.backend.value,
            "pool": self.pool,
            "format": self.format.value,
            "size": self.size,
            "source": source,
            "deletionPolicy": self.deletion_policy.value,
        }
        if self.encryption is not None:
            out["encryption"] = self.encryption.to_json()
        return out


class Manifest(BaseModel):
    """The storage manifest of one instance."""

    model_config = MANIFEST
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
            if rule is None or not instance:
                continue
            why = rule(f"{instance}_{d.name}")
            if why:
                raise ValueError(f"disk {d.name}: {why}")
            for n in d.snapshots or ():
                why = rule(snapshot_name(f"{instance}_{d.name}", n))
                if why:
                    raise ValueError(f"disk {d.name}: snapshot {n}: {why}")
        targets: dict[str, str] = {}
        for d in disks:
            dev = d.attach.target.dev if d.attach and d.attach.target else None
            if dev is None:
                continue
            if dev in targets:
                raise ValueError(f"disks {targets[dev]} and {d.name} both have target {dev}")
            targets[dev] = d.name
        return disks
