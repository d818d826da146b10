"""Shared test helpers: load the examples, build observed states in memory."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from reconciler.diff.desired import build_desired
from reconciler.model import Desired, Observed, ObservedPool
from reconciler.model.naming import volume_name
from reconciler.model.record import DiskRecord, RecordState
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.config import Config
from reconciler.schema.load import load_config
from reconciler.schema.manifest import DiskSpec
from reconciler.schema.manifestdir import load_manifests

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def example_config(
    tmp: Path,
    uri: str = "test:///default",
    run_dir: str = "/run/reconciler-demo",
    template: Path = EXAMPLES / "config.yaml.in",
) -> Config:
    text = template.read_text().replace("@LIBVIRT_URI@", uri).replace("@RUN_DIR@", run_dir)
    path = tmp / "config.yaml"
    path.write_text(text)
    return load_config(str(path))


def desired_from(paths: Iterable[str], config: Config) -> Desired:
    loaded, failed = load_manifests(paths, config)
    return build_desired(loaded, failed, config.pools)


def record_for(
    instance: str,
    spec: DiskSpec,
    volume: str,
    *,
    size: int | None = None,
    state: RecordState = RecordState.READY,
    generation: int = 1,
    fmt: str | None = None,
    spec_override: Mapping[str, object] | None = None,
    pending_size: int | None = None,
) -> DiskRecord:
    data = spec.spec_dict()
    if spec_override:
        data.update(spec_override)
    if size is not None:
        data["size"] = size
    return DiskRecord(
        backend=Backend(data["backend"]),
        pool=str(data["pool"]),
        volume=volume,
        instance=instance,
        disk=spec.name,
        format=DiskFormat(fmt or data["format"]),
        virtual_size=int(data["size"]),
        spec=data,
        source=dict(data["source"]),
        state=state,
        pending_size=pending_size,
        generation=generation,
    )


def blank_raw_record(instance: str, disk: str) -> DiskRecord:
    """The READY record of a 1 MiB flat raw blank disk in pool `local`, as apply writes it."""
    size = 1 << 20
    spec = {
        "name": disk,
        "backend": "flat",
        "pool": "local",
        "format": "raw",
        "size": size,
        "source": {"template": "blank"},
        "deletionPolicy": "Delete",
    }
    return DiskRecord(
        backend=Backend.FLAT,
        pool="local",
        volume=volume_name(instance, disk),
        instance=instance,
        disk=disk,
        format=DiskFormat.RAW,
        virtual_size=size,
        spec=spec,
        source={"template": "blank"},
        state=RecordState.READY,
        generation=1,
    )


def converged(
    desired: Desired, pools: Iterable[str]
) -> tuple[list[DiskRecord], dict[str, set[str]]]:
    """Records and pool contents for a state where every live desired disk exists."""
    records: list[DiskRecord] = []
    volumes: dict[str, set[str]] = {p: set() for p in pools}
    for inst in desired.instances:
        if inst.deleted:
            continue
        for d in inst.disks:
            records.append(record_for(inst.instance, d.spec, d.volume))
            volumes[d.spec.pool].add(d.volume)
    return records, volumes


def observed(
    records: Iterable[DiskRecord],
    volumes: Mapping[str, Iterable[str]],
    unreachable: Mapping[str, str] | None = None,
    headers: Mapping[str, Mapping[str, str]] | None = None,
) -> Observed:
    pools = {
        name: ObservedPool(name, frozenset(vols), None, dict((headers or {}).get(name, {})))
        for name, vols in volumes.items()
    }
    for name, why in (unreachable or {}).items():
        pools[name] = ObservedPool(name, None, why)
    return Observed(pools, tuple(records), ())
