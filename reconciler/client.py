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

import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.attach.ready import DiskReadiness, DiskState, disk_readiness
from reconciler.attach.xml import Layer, assign_targets, disk_element, to_text
from reconciler.control.session import Session
from reconciler.drivers.api import ManagingDriver, encrypts_of
from reconciler.model.desired import DesiredInstance
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord
from reconciler.schema.common import DiskFormat
from reconciler.schema.config import Config, config_path
from reconciler.schema.load import load_config
from reconciler.schema.manifest import AttachSpec, Bus

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


def merged(base: AttachSpec | None, override: AttachSpec | None) -> AttachSpec:
    """`base` with each field `override` sets replaced by its value."""
    spec = base or AttachSpec()
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

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- readiness ----------------------------------------------------------------------

    def readiness(self, instances: Sequence[str]) -> list[InstanceReadiness]:
        """Each instance's readiness, from the manifests as they are now."""
        desired = self.session.load(self.manifests)
        return [self._readiness(i, desired.instances, desired.failed)[0] for i in instances]

    def _readiness(
        self, instance: str, instances: Sequence[DesiredInstance], failed: Sequence[Any]
    ) -> tuple[InstanceReadiness, list[DiskRecord]]:
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
        got = self.session.instance_records(instance, wanted)
        plan = self.session.plan_instance(instance, wanted, checked=got)
        disks = [d for inst in wanted[:1] for d in inst.disks]
        return (
            InstanceReadiness(instance, tuple(disk_readiness(disks, got.records, plan))),
            list(got.records),
        )

    def wait(
        self, instance: str, timeout: float, *, interval: float = 1.0, progress: Any = None
    ) -> InstanceReadiness:
        """Return once every disk of `instance` is ready at its manifest's current
        content; NotReady on a terminal condition, WaitTimeout past `timeout` seconds.
        `progress(readiness)`, if given, is called whenever what is seen changes."""
        deadline = time.monotonic() + timeout
        last: str | None = None
        while True:
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
            time.sleep(min(interval, left))

    # -- disks -------------------------------------------------------------------------

    def disks(
        self, instance: str, overrides: Mapping[str, AttachSpec] | None = None
    ) -> list[AttachedDisk]:
        """Each disk of the instance's manifest, in its order, as a domain attaches it;
        NotReady unless every one is ready (nobody attaches half an instance)."""
        desired = self.session.load(self.manifests)
        readiness, records = self._readiness(instance, desired.instances, desired.failed)
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
