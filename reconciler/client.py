"""The Python API for a compute service: each ready disk's libvirt `<disk>` element, and
waiting until an instance's disks are ready.

    from reconciler.client import Client

    with Client(manifests=["/var/lib/nova/storage-manifests"]) as c:
        c.wait(instance, timeout=300)          # raises NotReady (terminal) or WaitTimeout
        for disk in c.disks(instance):         # raises NotReady unless every disk is ready
            devices.append(disk.element)       # or disk.xml, the same as text

Everything comes from the disks' records and their pools' config (reconciler/attach), on
the host the disks are on, as root, like `reconcile` itself: `reconcile disks` and
`reconcile wait` are this API's commands. A disk's target, serial and QoS come from its
manifest's `attach` section; `overrides` replaces them field by field.
"""

from __future__ import annotations

import os
import stat
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.attach.ready import DiskReadiness, DiskState, disk_readiness
from reconciler.attach.xml import Layer, assign_targets, disk_element, to_text
from reconciler.control.session import InstanceRecords, Session
from reconciler.drivers.api import ManagingDriver, encrypts_of
from reconciler.drivers.host.domains import Attachments
from reconciler.model.desired import Desired, DesiredInstance
from reconciler.model.errors import ReconcileError, RecordError
from reconciler.model.plan import Plan
from reconciler.model.record import DiskRecord
from reconciler.schema.common import DiskFormat
from reconciler.schema.config import Config, config_path
from reconciler.schema.load import load_config
from reconciler.schema.manifest import AttachSpec, Bus
from reconciler.schema.manifestdir import manifest_files
from reconciler.schema.speed.mcache import Key, stat_key

# How often a wait looks whether the record store changed (one SQLite pragma).
POLL_S = 0.01
# Plans of one instance in one look, at most, while records appear under it (_readiness).
LOOKS = 3

__all__ = [
    "AttachSpec",
    "AttachedDisk",
    "Client",
    "DiskReadiness",
    "DiskState",
    "InstanceReadiness",
    "NotReady",
    "WaitTimeout",
]


@dataclass(frozen=True)
class InstanceReadiness:
    """An instance's disks, each with its state; or why none can be: `problem` (no
    manifest names it, its manifest is invalid or marks it deleted)."""

    instance: str
    disks: tuple[DiskReadiness, ...] = ()
    problem: str | None = None

    @property
    def ready(self) -> bool:
        return self.problem is None and all(d.ready for d in self.disks)

    @property
    def terminal(self) -> bool:
        """Whether waiting cannot help: only a changed manifest (or an operator) can."""
        return self.problem is not None or any(d.terminal for d in self.disks)

    def describe(self) -> str:
        if self.problem is not None:
            return f"instance {self.instance}: {self.problem}"
        waiting = [d for d in self.disks if not d.ready]
        if not waiting:
            return f"instance {self.instance}: ready ({len(self.disks)} disk(s))"
        lines = [f"instance {self.instance}: {len(waiting)} of {len(self.disks)} disk(s) not ready"]
        lines += [f"  {d.describe()}" for d in waiting]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "instance": self.instance,
            "ready": self.ready,
            "terminal": self.terminal and not self.ready,
            "disks": [
                {
                    "disk": d.disk,
                    "pool": d.pool,
                    "volume": d.volume,
                    "state": d.state.value,
                    "message": d.message,
                }
                for d in self.disks
            ],
        }
        if self.problem is not None:
            out["problem"] = self.problem
        return out


class NotReady(ReconcileError):
    """An instance's disks cannot be given to a domain (yet, or until its manifest
    changes: `terminal`)."""

    def __init__(self, readiness: InstanceReadiness) -> None:
        self.readiness = readiness
        super().__init__(readiness.describe())

    @property
    def terminal(self) -> bool:
        return self.readiness.terminal


class WaitTimeout(ReconcileError):
    """The deadline passed before the disks were ready; `readiness` is the last seen."""

    def __init__(self, readiness: InstanceReadiness, timeout: float) -> None:
        self.readiness = readiness
        super().__init__(f"timed out after {timeout:g}s: {readiness.describe()}")


@dataclass(frozen=True)
class AttachedDisk:
    """One disk of an instance as a domain takes it."""

    name: str
    pool: str
    volume: str
    backend: str
    format: str
    size: int
    dev: str
    bus: Bus
    serial: str | None
    element: ET.Element

    @property
    def xml(self) -> str:
        return to_text(self.element)

    def to_json(self) -> dict[str, Any]:
        return {
            "disk": self.name,
            "pool": self.pool,
            "volume": self.volume,
            "backend": self.backend,
            "format": self.format,
            "size": self.size,
            "target": {"dev": self.dev, "bus": self.bus.value},
            "serial": self.serial,
            "xml": self.xml,
        }


# What a disk without an `attach` section gets (frozen: one for them all, not a model
# built per disk).
_NO_ATTACH = AttachSpec()


def merged(base: AttachSpec | None, override: AttachSpec | None) -> AttachSpec:
    """`base` with each field `override` sets replaced by its value."""
    spec = base or _NO_ATTACH
    if override is None:
        return spec
    return spec.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})


class Client:
    """Disks and readiness of the instances the manifests under `manifests` describe."""

    def __init__(self, config: Config | str | None = None, manifests: Sequence[str] = ()) -> None:
        if not manifests:
            raise ReconcileError("no manifests given: name the manifest files or directories")
        if not isinstance(config, Config):
            config = load_config(config_path(config))
        self.config = config
        self.manifests = list(manifests)
        self.session = Session(config)
        self._loaded: tuple[tuple[tuple[str, Key], ...], Desired] | None = None

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> Desired:
        """The manifests as they are now, loaded again only if a file changed since the
        last load: the same names, each the same regular file with the same device,
        inode, size, mtime and ctime (what the manifest cache takes for unchanged). A
        wait looks again as soon as a record changes; with 1,000 manifests, loading them
        was nearly all of a look (0.15 s), against 10 ms for this check."""
        files, errors = manifest_files(self.manifests)
        seen: list[tuple[str, Key]] | None = [] if not errors else None
        for f in files:
            if seen is None:
                break
            try:
                st = os.lstat(f)
            except OSError:
                seen = None
                break
            if not stat.S_ISREG(st.st_mode):  # read, and refused, every time
                seen = None
                break
            seen.append((f, stat_key(st)))
        if seen is not None and self._loaded is not None and self._loaded[0] == tuple(seen):
            return self._loaded[1]
        desired = self.session.load(self.manifests)
        # What was seen before loading: a file changed since differs from it next time.
        self._loaded = None if seen is None else (tuple(seen), desired)
        return desired

    # -- readiness ----------------------------------------------------------------------

    def readiness(self, instances: Sequence[str]) -> list[InstanceReadiness]:
        """Each instance's readiness, from the manifests as they are now."""
        desired = self._load()
        return [self._readiness(i, desired.instances, desired.failed)[0] for i in instances]

    def _readiness(
        self,
        instance: str,
        instances: Sequence[DesiredInstance],
        failed: Sequence[Any],
        seen: dict[str, Attachments] | None = None,
        read: InstanceRecords | RecordError | None = None,
    ) -> tuple[InstanceReadiness, list[DiskRecord]]:
        """`read`: the instance's records as read just before (Session.instances_records),
        for its first look; else they are read now."""
        broken = [f for f in failed if f.instance == instance]
        if broken:
            f = broken[0]
            where = f"{f.file}:{f.line}" if f.line else f.file
            return InstanceReadiness(instance, problem=f"manifest {where}: {f.message}"), []
        wanted = [i for i in instances if i.instance == instance]
        if not wanted:
            where = ", ".join(self.manifests)
            problem = f"no manifest in {where} names it"
            unknown = [f for f in failed if f.instance is None]  # one of them may be its
            if unknown:
                shown = "; ".join(
                    f"{f.file}:{f.line}: {f.message}" if f.line else f"{f.file}: {f.message}"
                    for f in unknown[:3]
                )
                more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
                problem += f" (unreadable, naming no instance: {shown}{more})"
            return InstanceReadiness(instance, problem=problem), []
        if len(wanted) == 1 and wanted[0].deleted:
            return InstanceReadiness(
                instance, problem=f"its manifest {wanted[0].file} marks it deleted"
            ), []
        for look in range(LOOKS):
            if look == 0 and read is not None:
                if isinstance(read, RecordError):
                    raise read
                got = read
            else:
                got = self.session.instance_records(instance, wanted)
            plan = self.session.plan_instance(instance, wanted, checked=got, attachments=seen)
            if not self._recorded_since(plan, got):
                break
        disks = [d for inst in wanted[:1] for d in inst.disks]
        return (
            InstanceReadiness(instance, tuple(disk_readiness(disks, got.records, plan))),
            list(got.records),
        )

    def _recorded_since(self, plan: Plan, got: InstanceRecords) -> bool:
        """Whether a volume the plan found without a record has one now. The records were
        read before the volumes were looked at, and apply writes a record before it makes
        its volume: one made in between looks unrecorded (an error that would end a wait).
        A wait looks right after each record is written, when that is most likely."""
        have = {r.key() for r in got.records} | {(b.pool, b.volume) for b in got.refused}
        for p in plan.errors:
            if p.pool is None or p.volume is None or (p.pool, p.volume) in have:
                continue
            try:
                if self.session.store.get(p.pool, p.volume) is not None:
                    return True
            except ReconcileError:
                continue
        return False

    def wait(
        self, instance: str, timeout: float, *, interval: float = 1.0, progress: Any = None
    ) -> InstanceReadiness:
        """Return once every disk of `instance` is ready at its manifest's current
        content; NotReady on a terminal condition, WaitTimeout past `timeout` seconds.
        `progress(readiness)`, if given, is called whenever what is seen changes."""
        deadline = time.monotonic() + timeout
        last: str | None = None
        while True:
            version = self.session.local_store.data_version()
            (now,) = self.readiness([instance])
            if progress is not None and now.describe() != last:
                progress(now)
            last = now.describe()
            if now.ready:
                return now
            if now.terminal:
                raise NotReady(now)
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(now, timeout)
            self._pause(min(interval, left), version)

    def _pause(self, seconds: float, version: int) -> None:
        """Sleep `seconds`, or less: until the host's record store has changed since it
        was at `version` (looked at every POLL_S). Apply writes a disk's record READY as
        its last step, so a wait returns within about POLL_S of it instead of at the next
        interval (a disk whose records another store keeps, Ceph's, is looked at every
        interval, as before)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(POLL_S, left))
            if self.session.local_store.data_version() != version:
                return

    # -- disks -------------------------------------------------------------------------

    def disks(
        self, instance: str, overrides: Mapping[str, AttachSpec] | None = None
    ) -> list[AttachedDisk]:
        """Each disk of the instance's manifest, in its order, as a domain attaches it;
        NotReady unless every one is ready (nobody attaches half an instance)."""
        return self._disks(instance, self._load(), overrides)

    def disks_each(
        self, instances: Sequence[str]
    ) -> Iterator[tuple[str, list[AttachedDisk] | ReconcileError]]:
        """disks() of each instance in turn, or the ReconcileError (NotReady among them)
        it raised, from one load of the manifests: loading them for every instance made
        `reconcile disks` of 100 instances out of 1,000 take 37 s, 98% of it loading."""
        desired = self._load()
        seen: dict[str, Attachments] = {}  # the pools' domains, listed once for them all
        by_id: dict[str, list[DesiredInstance]] = {}
        for inst in desired.instances:
            by_id.setdefault(inst.instance, []).append(inst)
        # Every instance's records at one moment, before any volume is looked at (as each
        # instance's own read was): one read of the host's database, each cache entry
        # read and checked once, not once per instance. A failed read of the database
        # leaves each instance to read (and fail) on its own, as before.
        try:
            read: Mapping[str, InstanceRecords | RecordError] = self.session.instances_records(
                {i: by_id[i] for i in dict.fromkeys(instances) if i in by_id}
            )
        except ReconcileError:
            read = {}
        for instance in instances:
            # Only the instance's own manifests (a scan of all of them per instance grew
            # with the square of the instances).
            own = Desired(tuple(by_id.get(instance, ())), desired.failed)
            try:
                yield instance, self._disks(instance, own, None, seen, read.get(instance))
            except ReconcileError as e:
                yield instance, e

    def _disks(
        self,
        instance: str,
        desired: Desired,
        overrides: Mapping[str, AttachSpec] | None,
        seen: dict[str, Attachments] | None = None,
        read: InstanceRecords | RecordError | None = None,
    ) -> list[AttachedDisk]:
        readiness, records = self._readiness(
            instance, desired.instances, desired.failed, seen, read
        )
        if not readiness.ready:
            raise NotReady(readiness)
        (inst,) = [i for i in desired.instances if i.instance == instance]
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - {d.spec.name for d in inst.disks})
        if unknown:
            raise ReconcileError(
                f"instance {instance} has no disk {', '.join(unknown)} (overrides name it)"
            )
        specs = {d.spec.name: merged(d.spec.attach, overrides.get(d.spec.name)) for d in inst.disks}
        targets = assign_targets(
            [
                (
                    name,
                    s.target.dev if s.target else None,
                    s.target.resolved_bus() if s.target else None,
                )
                for name, s in specs.items()
            ]
        )
        devs: dict[str, str] = {}
        for name, (dev, _) in targets.items():
            if dev in devs:
                raise ReconcileError(f"disks {devs[dev]} and {name} both have target {dev}")
            devs[dev] = name
        by_key = {r.key(): r for r in records}
        drivers = self.session.managing_drivers()
        out = []
        for d, r in zip(inst.disks, readiness.disks, strict=True):
            rec = r.record
            assert rec is not None  # a ready disk has its record
            drv = drivers[rec.pool]
            backing = []
            # Only a qcow2 disk names its backing in its own header (an overlay): an rbd
            # clone's parent is librbd's business, and the domain opens the clone as raw.
            if rec.backing is not None and rec.format is DiskFormat.QCOW2:
                entry = by_key.get((rec.pool, rec.backing))
                if entry is None:  # recordcheck refuses a backing without its record
                    raise ReconcileError(f"disk {d.spec.name}: backing {rec.backing} has no record")
                backing.append(Layer(drv.disk_source(entry.volume), entry.format))
            if rec.encryption is not None:
                _check_secret(drv, rec, d.spec.name)
            spec = specs[d.spec.name]
            dev, bus = targets[d.spec.name]
            element = disk_element(
                Layer(
                    drv.disk_source(rec.volume),
                    rec.format,
                    rec.encryption.secret if rec.encryption else None,
                ),
                backing,
                self.config.pools[rec.pool].disk,
                dev=dev,
                bus=bus,
                serial=spec.serial,
                iotune=spec.iotune,
            )
            out.append(
                AttachedDisk(
                    d.spec.name,
                    rec.pool,
                    rec.volume,
                    rec.backend.value,
                    rec.format.value,
                    rec.virtual_size,
                    dev,
                    bus,
                    spec.serial,
                    element,
                )
            )
        return out


def _check_secret(drv: ManagingDriver, rec: DiskRecord, name: str) -> None:
    """An encrypted disk's element names its libvirt secret: one missing from the pool's
    daemon (a rebuilt daemon, a secret undefined by hand) would let the element through
    and fail the domain's start, so it is an error here, naming what can bring it back."""
    assert rec.encryption is not None
    enc = encrypts_of(drv)
    uuid = rec.encryption.secret
    if enc.secrets().exists(uuid):
        return
    source = enc.secrets().source
    fix = (
        f"the pool's {source.label} may keep the key: a run of `reconcile` plans "
        "restore-key, which defines the secret again from it"
        if source is not None
        else "no key source keeps the key (only that secret held it), so the disk's data "
        "cannot be decrypted"
    )
    raise ReconcileError(
        f"disk {name} ({rec.pool}/{rec.volume}): its key's libvirt secret {uuid} is not "
        f"defined on the pool's daemon, so a domain could not open it; {fix}"
    )
