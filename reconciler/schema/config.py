"""The reconciler's configuration: pools, the image catalog, where state lives."""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    Strict,
    field_validator,
    model_validator,
)

from reconciler.schema.common import (
    STRICT,
    Backend,
    ByteCount,
    Name,
    PositiveByteCount,
    Preallocation,
    Rate,
)

DEFAULT_CONFIG = "/etc/reconciler/config.yaml"
CONFIG_ENV = "RECONCILER_CONFIG"


# Default factories written in Python, not `list`/`dict`: pydantic asks each factory for
# its signature when it builds a model, and a builtin's comes from parsing its text
# signature with tokenize, whose first use compiles a large regular expression: 14M
# instructions, 1% of a no-op re-run over 500 disks (cachegrind; issue 27).
def _empty_list() -> list[Any]:
    return []


def _empty_dict() -> dict[Any, Any]:
    return {}


class ImageFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class CephConfig(BaseModel):
    """Where an rbd pool's images and records live (the libvirt pool names the same pool)."""

    model_config = STRICT
    conf: str = Field(min_length=1, description="path of the ceph.conf the client reads")
    pool: str = Field(min_length=1, description="the Ceph pool holding images and records")
    client: str = Field(
        "client.admin", min_length=1, description="the cephx name the client connects as"
    )
    namespace: str = Field(
        "reconciler", min_length=1, description="RADOS namespace of the records and leases"
    )
    op_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        alias="opTimeout",
        description="seconds any one Ceph operation may take before it fails (default 30)",
    )
    max_clone_depth: int = Field(
        4,
        ge=1,
        le=16,
        alias="maxCloneDepth",
        description="how many parents deep a disk restored from a snapshot may be (a disk is "
        "a clone of its cache entry, a restore a clone of a disk's snapshot); a deeper one "
        "is flattened before it is ready (default 4)",
    )
    # What a domain's rbd disk connects with (reconcile disks): qemu's librbd, not ours.
    secret_uuid: str | None = Field(
        None,
        alias="secretUuid",
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description="the libvirt secret (usage type ceph) holding `client`'s key, which a "
        "domain's rbd disks authenticate with; needed by `reconcile disks` for this pool",
    )
    monitors: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}$")]] = Field(
        default_factory=_empty_list,
        description="the monitors a domain's rbd disks connect to, as HOST:PORT (v1 "
        "protocol); empty: the v1 addresses of `mon_host` in `conf`",
    )

    def client_id(self) -> str:
        """The cephx id without its type: libvirt's `<auth username=>`."""
        return self.client.removeprefix("client.")


class LvmConfig(BaseModel):
    """An lvm pool's volume group and how freed extents are cleared."""

    model_config = STRICT
    vg: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$",
        description="the LVM volume group holding the disks",
    )
    devices: list[Annotated[str, Field(pattern=r"^/dev/[^,\s]+$")]] = Field(
        default_factory=_empty_list,
        description="the VG's physical volumes: LVM then scans and opens only these "
        "(`--devices`), never the host's other block devices; empty: the host's own LVM "
        "device configuration decides",
    )
    activate: bool = Field(
        True,
        description="activate LVs and reach their data at /dev/VG/LV (needs device-mapper; "
        "the default); false: LVM2's metadata only, data through the segment map (tests "
        "on a host without device-mapper)",
    )
    volume_clear: Literal["zero", "none"] = Field(
        "zero", alias="volumeClear", description="how a deleted LV's extents are cleared"
    )
    volume_clear_size: ByteCount = Field(
        0,
        ge=0,
        alias="volumeClearSize",
        description="how much is cleared from the start of a deleted LV, bytes or like "
        "'2GiB'; 0: all of it",
    )


class DiskCache(StrEnum):
    NONE = "none"
    WRITETHROUGH = "writethrough"
    WRITEBACK = "writeback"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"


class DiskConfig(BaseModel):
    """How domains open this pool's disks: the `<driver>` attributes of each `<disk>`
    `reconcile disks` gives. Each left out is left to the hypervisor's default: a cache
    mode that suits one file system can cripple another (cache none is O_DIRECT, which
    tmpfs refuses and some NFS servers serve slowly)."""

    model_config = STRICT
    cache: DiskCache | None = Field(None, strict=False, description="libvirt's cache mode")
    io: Literal["native", "threads", "io_uring"] | None = Field(
        None, description="the I/O mode; native needs cache none or directsync (O_DIRECT)"
    )
    discard: Literal["unmap", "ignore"] | None = Field(
        None, description="whether the guest's discards free the pool's space"
    )
    detect_zeroes: Literal["off", "on", "unmap"] | None = Field(
        None, alias="detectZeroes", description="unmap needs discard unmap"
    )

    @model_validator(mode="after")
    def _combinations(self) -> DiskConfig:
        # qemu refuses both: "aio=native was specified, but it requires cache.direct=on",
        # and detect-zeroes=unmap "is not allowed without setting discard operation to unmap".
        if self.io == "native" and self.cache not in (DiskCache.NONE, DiskCache.DIRECTSYNC):
            raise ValueError("io native needs cache none or directsync (qemu refuses it else)")
        if self.detect_zeroes == "unmap" and self.discard != "unmap":
            raise ValueError("detectZeroes unmap needs discard unmap (qemu refuses it else)")
        return self


class KeySourceConfig(BaseModel):
    """Where encrypted disks' keys are kept besides this host's libvirt secrets, so another
    host (a take-over in a shared Ceph pool) or this one (a lost secret) gets them back:
    exactly one of a directory only root can read, one file per key named by its secret's
    UUID, or a command speaking to a KMS (drivers/host/keys.py, keycommand.py)."""

    model_config = STRICT
    directory: str | None = Field(
        None,
        pattern=r"^/",
        description="an absolute path; the directory must be root's, mode 0700; each key "
        "file is root's, mode 0600",
    )
    command: (
        list[Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")]] | None
    ) = Field(
        None,
        min_length=1,
        max_length=64,
        description="a program (absolute path) and its first arguments, run as `PROG ARGS "
        "get UUID` (the key on stdout), `PROG ARGS put UUID` (the key on stdin) and `PROG "
        "ARGS delete UUID`; with only PATH and LC_ALL=C in its environment, in /, in its own "
        "session, killed with its process group past `timeout` or past 4 KiB of output",
    )
    timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="command: seconds each call may take before its process group is "
        "killed (default 10)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> KeySourceConfig:
        if (self.directory is None) == (self.command is None):
            raise ValueError("give exactly one of `directory` and `command`")
        if self.command is not None and not self.command[0].startswith("/"):
            raise ValueError(
                f"command: the program must be an absolute path (not {self.command[0]!r}): "
                "it runs with a minimal PATH"
            )
        if self.directory is not None and "timeout" in self.model_fields_set:
            raise ValueError("`timeout` is for a `command` key source only")
        return self


class PoolConfig(BaseModel):
    """A libvirt storage pool the reconciler may place disks in."""

    model_config = STRICT
    uri: str = Field(min_length=1, description="libvirt connection URI")
    libvirt_pool: Name = Field(alias="libvirtPool", description="the pool's name in libvirt")
    backends: list[Annotated[Backend, Strict(False)]] = Field(min_length=1)
    ceph: CephConfig | None = Field(None, description="required for the rbd backend")
    lvm: LvmConfig | None = Field(None, description="required for the lvm backend")
    disk: DiskConfig = Field(
        default_factory=lambda: DiskConfig(),
        description="how domains open the pool's disks (reconcile disks)",
    )
    keys: KeySourceConfig | None = Field(
        None,
        description="encrypted disks: a key source beside the libvirt secrets (a root-only "
        "directory shared by the hosts, or a command that asks a KMS), so another host "
        "can take a disk over and a lost secret can be defined again",
    )
    preallocation: Preallocation = Field(
        Preallocation.OFF,
        strict=False,
        description="file pools (flat, qcow2, ploop): how much of each disk made or grown "
        "here is allocated: off (sparse, the default), metadata (a qcow2's tables), falloc "
        "(every block reserved, not written), full (every block written with zeros); a "
        "disk keeps the mode it was made with, which its record says",
    )

    @model_validator(mode="after")
    def _backend_sections(self) -> PoolConfig:
        kinds = set(self.backends)
        if Backend.RBD in kinds and kinds != {Backend.RBD}:
            raise ValueError("an rbd pool holds only rbd disks: backends must be [rbd]")
        if Backend.LVM in kinds and kinds != {Backend.LVM}:
            raise ValueError("an lvm pool holds only lvm disks: backends must be [lvm]")
        if Backend.RBD in kinds and self.ceph is None:
            raise ValueError("an rbd pool needs a `ceph` section (conf, pool)")
        if Backend.LVM in kinds and self.lvm is None:
            raise ValueError("an lvm pool needs an `lvm` section (vg)")
        if self.ceph is not None and Backend.RBD not in kinds:
            raise ValueError("a `ceph` section is only for an rbd pool")
        if self.lvm is not None and Backend.LVM not in kinds:
            raise ValueError("an `lvm` section is only for an lvm pool")
        return self

    @model_validator(mode="after")
    def _preallocation(self) -> PoolConfig:
        # An LV holds all its extents and an RBD image allocates as Ceph does.
        block = {Backend.LVM, Backend.RBD} & set(self.backends)
        if self.preallocation is not Preallocation.OFF and block:
            raise ValueError(
                f"preallocation {self.preallocation.value} is only for file pools (flat, "
                f"qcow2, ploop), not an {block.pop().value} pool; leave it off"
            )
        return self


class FetchConfig(BaseModel):
    """How long fetching an image may take: a deadline from its declared size, so a
    server that trickles (a byte every few seconds) or never answers fails in bounded
    time. The deadline is connectTimeout + slack + size / minRate, over all attempts; no
    wait for one connect or one read is longer than connectTimeout."""

    model_config = STRICT
    min_rate: Rate = Field(
        1 << 20,
        alias="minRate",
        description="the slowest transfer accepted, bytes per second or like '1MiB/s' "
        "(default 1MiB/s)",
    )
    connect_timeout: float = Field(
        10.0,
        gt=0,
        le=3600,
        alias="connectTimeout",
        description="seconds to connect, and to wait for any one read (default 10)",
    )
    slack: float = Field(
        30.0,
        ge=0,
        le=86400,
        description="seconds added to every deadline, for retries and slow starts (default 30)",
    )

    def deadline(self, size: int) -> float:
        """Seconds a fetch of `size` bytes may take, all attempts together."""
        return self.connect_timeout + self.slack + size / self.min_rate


class ImageConfig(BaseModel):
    """A source image in the catalog: everything about it is declared, nothing probed."""

    model_config = STRICT
    location: str
    format: ImageFormat = Field(strict=False)
    sha256: str
    size: PositiveByteCount = Field(
        description="size of the image file, bytes or like '2GiB' (exactly)"
    )
    # An rbd:// location in another Ceph cluster than a pool's is fetched (and checked like
    # any image) through a client of that cluster: its ceph.conf and cephx name.
    ceph_conf: str | None = Field(
        None,
        min_length=1,
        alias="cephConf",
        description="for an rbd:// location: the ceph.conf of the cluster it is in",
    )
    ceph_client: str = Field("client.admin", min_length=1, alias="cephClient")
    # The config's `fetch` section, set by Config: a fetch is told its bounds with its image.
    _fetch: FetchConfig = PrivateAttr(default_factory=lambda: FetchConfig())

    @property
    def fetch(self) -> FetchConfig:
        return self._fetch

    @model_validator(mode="after")
    def _ceph_conf(self) -> ImageConfig:
        if self.ceph_conf is not None and not self.location.startswith("rbd://"):
            raise ValueError("cephConf is only for an rbd:// location")
        return self

    @field_validator("location")
    @classmethod
    def _location(cls, v: str) -> str:
        if v.startswith("rbd://"):
            # rbd://FSID/POOL/IMAGE/SNAP: a raw RBD snapshot; in the pool's own cluster it
            # is cloned from directly, from another cluster it is fetched.
            if not re.fullmatch(r"rbd://[0-9a-fA-F-]{36}/[^/@]+/[^/@]+/[^/@]+", v):
                raise ValueError(f"location {v!r} must be rbd://FSID/POOL/IMAGE/SNAPSHOT")
            return v
        if not re.match(r"^(file|https?)://", v):
            raise ValueError(f"location {v!r} must be a file://, http://, https:// or rbd:// URL")
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


class OwnershipConfig(BaseModel):
    """How hosts sharing a pool (Ceph) hand instances to one another."""

    model_config = STRICT
    heartbeat_expiry: float = Field(
        300.0,
        ge=1,
        le=86400,
        alias="heartbeatExpiry",
        description="seconds after its last heartbeat that a host counts as gone, so "
        "another host may take its instances (default 300)",
    )


class Config(BaseModel):
    model_config = STRICT
    api_version: Literal["reconciler/v1"] = Field(alias="apiVersion")
    kind: Literal["Config"]
    # This host's identity among hosts sharing a pool; default: the machine's hostname.
    host: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    state: StateConfig
    ownership: OwnershipConfig = Field(default_factory=lambda: OwnershipConfig())
    pools: dict[Name, PoolConfig] = Field(min_length=1)
    images: dict[Name, ImageConfig] = Field(default_factory=_empty_dict)
    safety: SafetyConfig = Field(default_factory=lambda: SafetyConfig())
    libvirt: LibvirtConfig = Field(default_factory=lambda: LibvirtConfig())
    fetch: FetchConfig = Field(default_factory=lambda: FetchConfig())

    # Set by the loader: the directory relative paths are resolved against.
    _base_dir: str = PrivateAttr(default=".")

    @model_validator(mode="after")
    def _fetch_bounds(self) -> Config:
        for image in self.images.values():
            image._fetch = self.fetch
        return self

    def with_base_dir(self, base_dir: str) -> Config:
        self._base_dir = base_dir
        return self

    def state_dir(self) -> Path:
        return Path(self._base_dir, self.state.dir).resolve()

    def host_id(self) -> str:
        """This host's identity: `host`, else the machine's hostname."""
        # os.uname's node name is what socket.gethostname() returns on Linux (glibc's
        # gethostname reads it), without importing socket at every start (issue 27).
        return self.host or os.uname().nodename


def config_path(explicit: str | None) -> str:
    """--config, else $RECONCILER_CONFIG, else the system default."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
