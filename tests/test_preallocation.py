"""A file pool's `preallocation` (off | metadata | falloc | full): the config refuses it where
it means nothing, the record keeps what each disk was made with (and only when not off),
the plan shows it and refuses what a format cannot be made with, and apply allocates what
the plan says, measured as the file system sees it: allocated bytes (st_blocks * 512)
against the virtual size, on real libvirt dir pools."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion

from reconciler.diff import plan
from reconciler.diff.render import to_json, to_markdown, to_text
from reconciler.model import Desired, Observed, ObservedPool
from reconciler.model.errors import ConfigError
from reconciler.model.naming import volume_name
from reconciler.model.record import DiskRecord, Migration, MigrationPhase, RecordKind
from reconciler.schema import exported
from reconciler.schema.common import Backend, DiskFormat, Preallocation
from reconciler.schema.load import load_config
from reconciler.schema.recordcheck import problem, validate
from tests.env import Env, disk
from tests.helpers import EXAMPLES, ROOT, desired_from, example_config, observed, record_for
from tests.snapshot_ext import JsonSnapshot, MarkdownSnapshot, TextSnapshot
from tests.test_images import catalog_entry, records, same_data

MiB = 1 << 20
SIZE = 32 * MiB  # each disk's size when made
GROWN = 48 * MiB  # and once grown
INST = "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b01"


def allocated(path: Path) -> int:
    """Bytes the file system has allocated to the file (holes and unwritten tails not)."""
    return os.lstat(path).st_blocks * 512


def set_preallocation(env: Env, modes: dict[str, str]) -> None:
    """Give pools of `env`'s config a preallocation (its config is JSON, which is YAML)."""
    cfg = json.loads(env.config_path.read_text())
    for pool, mode in modes.items():
        cfg["pools"][pool]["preallocation"] = mode
    env.config_path.write_text(json.dumps(cfg, indent=2))


# -- the config ---------------------------------------------------------------------


def _config(tmp_path: Path, pool: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    doc = {
        "apiVersion": "reconciler/v1",
        "kind": "Config",
        "state": {"dir": str(tmp_path / "state")},
        "pools": {"p": {"uri": "test:///default", "libvirtPool": "x", **pool}},
    }
    path.write_text(json.dumps(doc, indent=2))
    return path


@pytest.mark.parametrize(
    "pool",
    [
        {"backends": ["lvm"], "lvm": {"vg": "vg0"}},
        {"backends": ["rbd"], "ceph": {"conf": "/etc/ceph/ceph.conf", "pool": "rbd"}},
    ],
    ids=["lvm", "rbd"],
)
@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_a_block_pool_with_preallocation_is_a_config_error_naming_it(
    tmp_path: Path, pool: dict[str, Any], mode: str
) -> None:
    path = _config(tmp_path, {**pool, "preallocation": mode})
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert "pools.p" in msg and f"preallocation {mode} is only for file pools" in msg
    assert f"not an {pool['backends'][0]} pool" in msg
    # `off`, said or not, is every pool's.
    for off in ({"preallocation": "off"}, {}):
        cfg = load_config(str(_config(tmp_path, {**pool, **off})))
        assert cfg.pools["p"].preallocation is Preallocation.OFF


def test_a_file_pool_takes_each_mode_and_nothing_else(tmp_path: Path) -> None:
    for mode in ("off", "metadata", "falloc", "full"):
        path = _config(tmp_path, {"backends": ["flat", "qcow2", "ploop"], "preallocation": mode})
        assert load_config(str(path)).pools["p"].preallocation.value == mode
    path = _config(tmp_path, {"backends": ["flat"], "preallocation": "sparse"})
    with pytest.raises(ConfigError, match=r"pools\.p\.preallocation: Input should be 'off'"):
        load_config(str(path))


def test_the_config_schema_describes_preallocation() -> None:
    rc, out, _ = Env.main(["schema", "--kind", "config"])
    assert rc == 0
    schema = json.loads(out)
    field = schema["$defs"]["PoolConfig"]["properties"]["preallocation"]
    assert field["default"] == "off"
    for word in ("off", "metadata", "falloc", "full", "record"):
        assert word in field["description"]
    (ref,) = [v for k, v in schema["$defs"].items() if field["$ref"].endswith("/" + k)]
    assert ref["enum"] == ["off", "metadata", "falloc", "full"]


# -- the record ---------------------------------------------------------------------


def _record(**kw: Any) -> DiskRecord:
    spec = {
        "name": "d",
        "backend": kw.pop("backend", "flat"),
        "pool": "p",
        "format": kw.pop("format", "raw"),
        "size": SIZE,
        "source": {"template": "blank"},
        "deletionPolicy": "Delete",
    }
    return DiskRecord(
        backend=Backend(spec["backend"]),
        pool="p",
        volume=volume_name(INST, "d"),
        instance=INST,
        disk="d",
        format=DiskFormat(spec["format"]),
        virtual_size=SIZE,
        spec=spec,
        source=spec["source"],
        state="ready",
        generation=1,
        **kw,
    )


def test_a_record_carries_preallocation_only_when_it_is_not_off() -> None:
    sparse = _record()
    text = sparse.model_dump_json()
    assert "preallocation" not in text  # byte for byte a record before the field
    assert "preallocation" not in json.dumps(sparse.model_dump(mode="json"))
    full = _record(preallocation=Preallocation.FULL)
    doc = json.loads(full.model_dump_json())
    assert doc["preallocation"] == "full"
    assert list(doc)[:-1] == list(json.loads(text))  # added last, the rest as it was
    assert DiskRecord.model_validate_json(full.model_dump_json()) == full
    # A migration's copy too.
    mig = Migration(
        pool="p",
        volume="x",
        final_volume="x",
        backend=Backend.FLAT,
        format=DiskFormat.RAW,
        virtual_size=SIZE,
        spec={},
        phase=MigrationPhase.COPYING,
    )
    assert "preallocation" not in mig.model_dump_json()
    falloc = mig.model_copy(update={"preallocation": Preallocation.FALLOC})
    assert json.loads(falloc.model_dump_json())["preallocation"] == "falloc"
    assert Migration.model_validate_json(falloc.model_dump_json()) == falloc


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"preallocation": "off"}, "preallocation says off, which is never recorded"),
        ({"preallocation": "metadata"}, "a raw disk has no metadata to preallocate"),
        (
            {"preallocation": "falloc", "backend": "ploop", "format": "ploop"},
            "allocates a cluster only when it is written",
        ),
        (
            {"preallocation": "metadata", "backend": "ploop", "format": "ploop"},
            "table is always whole",
        ),
        ({"preallocation": "full", "backend": "lvm"}, "only a file backend's, not lvm's"),
        ({"preallocation": "falloc", "backend": "rbd"}, "only a file backend's, not rbd's"),
    ],
)
def test_a_record_with_a_preallocation_its_disk_cannot_have_is_refused(
    kw: dict[str, Any], why: str
) -> None:
    rec = _record(**kw)
    found = problem(rec, rec.pool, rec.volume)
    assert found is not None and why in found, found
    # As every reader refuses it: the session's, a state file's, rebuild's (validate).
    good, bad = validate([rec], None)
    assert good == [] and why in bad[0].error


def test_records_with_each_mode_a_format_takes_pass() -> None:
    for fmt, backend, modes in (
        ("raw", "flat", ("falloc", "full")),
        ("qcow2", "flat", ("metadata", "falloc", "full")),
        ("qcow2", "qcow2", ("metadata", "falloc", "full")),
        ("ploop", "ploop", ("full",)),
    ):
        for mode in modes:
            rec = _record(backend=backend, format=fmt, preallocation=mode)
            assert problem(rec, rec.pool, rec.volume) is None, (fmt, mode)


def test_a_cache_entry_has_no_preallocation() -> None:
    entry = DiskRecord(
        kind=RecordKind.CACHE,
        backend=Backend.FLAT,
        pool="p",
        volume="_cache_template-blank",
        instance="",
        disk="",
        format=DiskFormat.RAW,
        virtual_size=SIZE,
        spec={"template": "ext4", "size": SIZE},
        source={},
        state="ready",
        generation=1,
        preallocation=Preallocation.FULL,
    )
    assert "a cache entry has no preallocation" in (problem(entry, "p", entry.volume) or "")


def test_block_backends_record_copies_and_rados_records_refuse_a_preallocation() -> None:
    """An LV's tags and a RADOS record object carry the field as JSON does; a record that
    names one for an lvm or rbd disk is refused where it is read, in words."""
    from reconciler.drivers.api import RecordCopies
    from reconciler.drivers.lvm.copies import decode_copy, encode_copy
    from reconciler.drivers.rbd import layout
    from reconciler.model.errors import RecordError

    lvm = _record(backend="lvm", preallocation=Preallocation.FULL)
    back = decode_copy(encode_copy(lvm))
    assert back is not None and back == lvm
    copies = RecordCopies.checked("p", [(lvm.volume, back)], [])
    assert copies.records == ()
    ((vol, why),) = copies.refused
    assert vol == lvm.volume and "only a file backend's, not lvm's" in why
    # A file disk's copy round-trips through the same encoding, and passes.
    flat = _record(preallocation=Preallocation.FALLOC)
    flat_back = decode_copy(encode_copy(flat))
    assert flat_back == flat
    assert RecordCopies.checked("p", [(flat.volume, flat_back)], []).records == (flat,)
    rbd = _record(backend="rbd", preallocation=Preallocation.FALLOC)
    oid = layout.record_object(rbd.pool, rbd.volume)
    with pytest.raises(RecordError, match="only a file backend's, not rbd's"):
        layout.decode(oid, layout.encode(rbd, "host-a"), "pool p")
    sparse = _record(backend="rbd")
    assert b"preallocation" not in layout.encode(sparse, "host-a")
    assert layout.decode(oid, layout.encode(sparse, "host-a"), "pool p").record == sparse


def test_an_exported_state_round_trips_a_records_preallocation(tmp_path: Path) -> None:
    cfg = load_config(
        str(_config(tmp_path, {"backends": ["flat", "qcow2"], "preallocation": "falloc"}))
    )
    recs = [
        _record(preallocation=Preallocation.FALLOC),
        _record(format="qcow2").model_copy(update={"disk": "e", "volume": volume_name(INST, "e")}),
    ]
    recs[1] = recs[1].model_copy(update={"spec": {**recs[1].spec, "name": "e"}})
    vols = {r.volume for r in recs}
    obs = Observed({"p": ObservedPool("p", frozenset(vols), None)}, tuple(recs), ())
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    path = tmp_path / "state.json"
    exported.write(str(path), exported.document(obs, cfg, now))
    text = path.read_text()
    assert text.count('"preallocation"') == 1  # the sparse disk's record is as before
    back, _ = exported.load(str(path))
    assert sorted(back.records, key=lambda r: r.volume) == sorted(recs, key=lambda r: r.volume)
    assert back.bad_records == ()
    # A state whose record claims what its disk cannot have is that volume's plan error.
    doc = json.loads(text)
    doc["records"][0]["preallocation"] = "metadata"  # on the raw disk
    path.write_text(json.dumps(doc))
    back, _ = exported.load(str(path))
    (bad,) = back.bad_records
    assert "a raw disk has no metadata to preallocate" in bad.error


# -- the plan (pure) ----------------------------------------------------------------


def _desired(tmp_path: Path, modes: dict[str, str], disks: list[dict[str, Any]]) -> Desired:
    """The example config with `modes` set on its pools, and one manifest of `disks`."""
    config = example_config(tmp_path)
    pools = {
        n: pc.model_copy(update={"preallocation": Preallocation(modes.get(n, "off"))})
        for n, pc in config.pools.items()
    }
    config = config.model_copy(update={"pools": pools})
    mdir = tmp_path / "m"
    mdir.mkdir(exist_ok=True)
    (mdir / "vm.yaml").write_text(
        json.dumps(
            {
                "apiVersion": "reconciler/v1",
                "kind": "InstanceStorage",
                "instance": INST,
                "disks": disks,
            }
        )
    )
    d = desired_from([str(mdir)], config)
    assert not d.failed, d.failed
    return d


def test_a_create_carries_the_pools_preallocation_and_a_format_that_cannot_is_an_error(
    tmp_path: Path,
) -> None:
    d = _desired(
        tmp_path,
        {"demo": "metadata", "demo-fast": "full"},
        [
            disk("raw", pool="demo"),
            disk("q", pool="demo", backend="qcow2", fmt="qcow2"),
            disk("fast", pool="demo-fast"),
        ],
    )
    p = plan(d, observed([], {"demo": set(), "demo-fast": set()}))
    made = {a.disk: a.preallocation for a in p.actions}
    assert made == {"q": Preallocation.METADATA, "fast": Preallocation.FULL}
    (err,) = p.errors
    assert (err.code, err.disk, err.pool) == ("preallocation-unsupported", "raw", "demo")
    assert "pool demo has preallocation metadata: a raw disk has no metadata" in (err.message)
    text = to_text(p)
    assert "preallocation metadata: its qcow2 tables allocated" in text
    assert "preallocation full: every block written with zeros" in text
    assert [a["preallocation"] for a in json.loads(to_json(p))["actions"]] == ["full", "metadata"]


def test_off_adds_nothing_to_a_plan(tmp_path: Path) -> None:
    d = _desired(tmp_path, {}, [disk("raw", pool="demo")])
    p = plan(d, observed([], {"demo": set(), "demo-fast": set()}))
    (a,) = p.actions
    assert a.preallocation is None and "preallocation" not in a.to_json()
    assert "preallocation" not in to_text(p) + to_markdown(p)


def test_a_disk_keeps_the_mode_it_was_made_with_when_the_pools_changes(tmp_path: Path) -> None:
    """Nothing is remade; a grow allocates as the record says, not as the pool says now."""
    for made, now in ((None, "full"), (Preallocation.FALLOC, "off")):
        d = _desired(tmp_path, {"demo": now}, [disk("raw", pool="demo", size=SIZE)])
        (dd,) = d.instances[0].disks
        rec = record_for(INST, dd.spec, dd.volume).model_copy(update={"preallocation": made})
        p = plan(d, observed([rec], {"demo": {dd.volume}, "demo-fast": set()}))
        assert (p.actions, p.errors, p.warnings) == ((), (), ())
        d = _desired(tmp_path, {"demo": now}, [disk("raw", pool="demo", size=GROWN)])
        (a,) = plan(d, observed([rec], {"demo": {dd.volume}, "demo-fast": set()})).actions
        assert (a.action.value, a.preallocation) == ("resize", made)
        if made is not None:
            assert "in the new part, as the disk was made" in to_text(
                plan(d, observed([rec], {"demo": {dd.volume}, "demo-fast": set()}))
            )


def test_a_migration_is_allocated_as_its_target_pool_makes_disks_and_needs_room_for_it(
    tmp_path: Path,
) -> None:
    d = _desired(tmp_path, {"demo-fast": "falloc"}, [disk("d", pool="demo-fast", size=SIZE)])
    (dd,) = d.instances[0].disks
    rec = record_for(INST, dd.spec, dd.volume, spec_override={"pool": "demo"}).model_copy(
        update={"pool": "demo"}
    )
    layouts = frozenset({"flat/raw", "flat/qcow2", "qcow2/qcow2"})

    def state(free: int) -> Observed:
        pools = {
            "demo": ObservedPool(
                "demo", frozenset({dd.volume}), None, allocated={dd.volume: MiB}, layouts=layouts
            ),
            "demo-fast": ObservedPool(
                "demo-fast", frozenset(), None, available=free, layouts=layouts
            ),
        }
        return Observed(pools, (rec,), ())

    # 8 MiB free: a sparse copy of 1 MiB of data fits; a falloc'd copy of 32 MiB does not.
    p = plan(d, state(8 * MiB))
    (err,) = p.errors
    assert err.code == "migrate-no-space" and "needs up to 33800 KiB" in err.message
    p = plan(d, state(64 * MiB))
    (a,) = p.actions
    assert (a.action.value, a.preallocation) == ("migrate", Preallocation.FALLOC)
    sparse = _desired(tmp_path, {}, [disk("d", pool="demo-fast", size=SIZE)])
    (a,) = plan(sparse, state(8 * MiB)).actions
    assert a.preallocation is None


def test_a_migration_into_a_format_the_pools_mode_cannot_make_is_an_error(
    tmp_path: Path,
) -> None:
    d = _desired(tmp_path, {"demo": "metadata"}, [disk("d", pool="demo", fmt="raw")])
    (dd,) = d.instances[0].disks
    rec = record_for(INST, dd.spec, dd.volume, fmt="qcow2", spec_override={"format": "qcow2"})
    layouts = frozenset({"flat/raw", "flat/qcow2"})
    pools = {
        "demo": ObservedPool(
            "demo", frozenset({dd.volume}), None, available=1 << 40, layouts=layouts
        ),
        "demo-fast": ObservedPool("demo-fast", frozenset(), None),
    }
    p = plan(d, Observed(pools, (rec,), ()))
    assert p.actions == ()
    assert [e.code for e in p.errors] == ["preallocation-unsupported"]


@pytest.mark.parametrize(
    ("render", "ext"),
    [(to_text, TextSnapshot), (to_json, JsonSnapshot), (to_markdown, MarkdownSnapshot)],
    ids=["text", "json", "markdown"],
)
def test_a_plan_with_preallocation(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    snapshot: SnapshotAssertion,
    render: Any,
    ext: Any,
) -> None:
    """The example manifests into pools that preallocate (demo: metadata, which its raw
    disks cannot have; demo-fast: full), on empty pools."""
    monkeypatch.chdir(ROOT)
    config = example_config(tmp_path)
    pools = {
        "demo": config.pools["demo"].model_copy(update={"preallocation": Preallocation.METADATA}),
        "demo-fast": config.pools["demo-fast"].model_copy(
            update={"preallocation": Preallocation.FULL}
        ),
    }
    config = config.model_copy(update={"pools": pools})
    d = desired_from([str(EXAMPLES.relative_to(ROOT) / "manifests")], config)
    p = plan(d, observed([], {"demo": set(), "demo-fast": set()}))
    assert {e.code for e in p.errors} == {"preallocation-unsupported"}
    assert snapshot(extension_class=ext) == render(p)


# -- against the real daemon ----------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A raw image of recognisable content (2 MiB), far smaller than the disks."""
    d = tmp_path / "images"
    d.mkdir()
    raw = d / "good.raw"
    raw.write_bytes(b"".join(i.to_bytes(4, "little") * 256 for i in range(2048)))
    return raw


# name -> (backend, format, source); each made at SIZE.
DISKS: dict[str, tuple[str, str, dict[str, str]]] = {
    "raw-img": ("flat", "raw", {"image": "img"}),
    "raw-ext4": ("flat", "raw", {"template": "ext4"}),
    "raw-blank": ("flat", "raw", {"template": "blank"}),
    "overlay-img": ("qcow2", "qcow2", {"image": "img"}),
    "overlay-ext4": ("qcow2", "qcow2", {"template": "ext4"}),
    "qcow2-blank": ("qcow2", "qcow2", {"template": "blank"}),
    "qcow2-img": ("flat", "qcow2", {"image": "img"}),  # a standalone qcow2 copy
    "ploop-img": ("ploop", "ploop", {"image": "img"}),
    "ploop-ext4": ("ploop", "ploop", {"template": "ext4"}),
    "ploop-blank": ("ploop", "ploop", {"template": "blank"}),
}
REFUSED = {
    "off": set(),
    "metadata": {"raw", "ploop"},
    "falloc": {"ploop"},
    "full": set(),
}


def _manifest_disks(size: int, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        backend, fmt, source = DISKS[name]
        d = disk(name, backend=backend, fmt=fmt, size=size, template=source.get("template"))
        if "image" in source:
            d["source"] = {"image": source["image"]}
        out.append(d)
    return out


def _qemu_format(fmt: str) -> str:
    return "parallels" if fmt == "ploop" else fmt


def _check_allocation(mode: str, vol: Path, fmt: str, size: int) -> None:
    """What each mode leaves the file system holding for a disk of virtual size `size`."""
    used, length = allocated(vol), os.lstat(vol).st_size
    if mode in ("falloc", "full"):
        assert used >= size, (vol.name, used, size)
    else:
        assert used < size // 4, (vol.name, used, size)
    if mode == "metadata":  # qcow2: every table written, the file as long as the disk
        assert fmt == "qcow2" and length >= size, (vol.name, length, size)


@pytest.mark.libvirtd
@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
def test_each_mode_allocates_what_the_plan_says_when_made_and_when_grown(
    env: Env, image: Path, mode: str
) -> None:
    env.backends = ["flat", "qcow2", "ploop"]
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    set_preallocation(env, {"local": mode})
    names = list(DISKS)
    refused = {n for n in names if DISKS[n][1] in REFUSED[mode]}
    inst = env.manifest("vm", _manifest_disks(SIZE, names))

    # The dry run: a create per disk its format can make, with the mode; an error per other.
    p = env.plan_json()
    want = None if mode == "off" else mode
    assert {a["disk"]: a.get("preallocation") for a in p["actions"]} == {
        n: want for n in names if n not in refused
    }
    assert {(e["disk"], e["code"]) for e in p["errors"]} == {
        (n, "preallocation-unsupported") for n in refused
    }
    rc, text, _ = env.run("--dry-run")
    assert rc == (1 if refused else 0)
    assert text.count(f"    preallocation {mode}:") == (
        0 if mode == "off" else len(names) - len(refused)
    )

    # Apply does exactly that: what the plan calls an error is refused and not made.
    rc, out, err = env.run()
    assert rc == (1 if refused else 0), out + err
    assert f"Apply: {len(names) - len(refused)} done, 0 skipped, 0 failed." in out
    recs = {r.disk: r for r in records(env) if r.kind is RecordKind.DISK}
    assert set(recs) == set(names) - refused
    for name in refused:
        assert not env.volume(inst, name).exists()
        assert f"{inst}/{name}: pool local has preallocation {mode}" in out
    entries = {r.spec.get("template", "img"): r.volume for r in records(env) if not r.disk}
    for name, rec in recs.items():
        vol = env.volume(inst, name)
        backend, fmt, source = DISKS[name]
        assert rec.preallocation == (None if mode == "off" else Preallocation(mode))
        copy = json.loads(os.getxattr(vol, "trusted.reconciler.record"))
        assert copy.get("preallocation") == want  # the copy says so too (absent: off)
        _check_allocation(mode, vol, fmt, SIZE)
        # The data is the source's, whatever the allocation.
        src = image if "image" in source else env.pool_dir() / entries.get("ext4", "")
        if source.get("template") == "blank":
            src = env.root / "empty.raw"
            src.write_bytes(b"")
        assert same_data(vol, _qemu_format(fmt), src), name
        if backend == "qcow2" and "image" in source:
            info = qemu_info(vol, "qcow2")
            assert info["backing-filename"] == str(env.pool_dir() / entries["img"])
            assert info["backing-filename-format"] == "raw"
            # A preallocated overlay has extended L2 entries (qemu-img's condition).
            assert info["format-specific"]["data"]["extended-l2"] is (mode != "off")
    again = env.plan_json()
    assert again["actions"] == [] and len(again["errors"]) == len(refused)

    # Grown (ploop disks cannot grow; the refused ones are left out): the new part is
    # allocated as each disk was made, and the plan says so.
    kept = [n for n in names if n not in refused]
    grown = [n for n in kept if not n.startswith("ploop")]
    env.manifest(
        "vm",
        _manifest_disks(GROWN, grown)
        + _manifest_disks(SIZE, [n for n in kept if n.startswith("ploop")]),
        instance=inst,
    )
    p = env.plan_json()
    assert {a["disk"]: (a["action"], a.get("preallocation")) for a in p["actions"]} == {
        n: ("resize", want) for n in grown
    }
    assert p["errors"] == []
    rc, out, err = env.run()
    assert rc == 0, out + err
    for name in grown:
        vol = env.volume(inst, name)
        fmt = DISKS[name][1]
        assert qemu_info(vol, _qemu_format(fmt))["virtual-size"] == GROWN
        _check_allocation(mode, vol, fmt, GROWN)
    assert env.plan_json()["actions"] == []


def qemu_info(path: Path, fmt: str) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "-f", fmt, "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


@pytest.mark.libvirtd
def test_changing_a_pools_preallocation_remakes_nothing_and_a_saved_plan_sees_it(
    env: Env, image: Path, tmp_path: Path
) -> None:
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    inst = env.manifest("vm", _manifest_disks(SIZE, ["raw-img"]))
    assert env.run()[0] == 0
    vol = env.volume(inst, "raw-img")
    before = (os.lstat(vol).st_ino, allocated(vol))
    set_preallocation(env, {"local": "full"})
    p = env.plan_json("--detailed-exitcode")
    assert (p["actions"], p["errors"], p["warnings"]) == ([], [], [])
    assert env.run()[0] == 0
    assert (os.lstat(vol).st_ino, allocated(vol)) == before
    (rec,) = [r for r in records(env) if r.disk]
    assert rec.preallocation is None  # as it was made
    # A saved plan holds the mode it shows; made under one mode, it is refused under another.
    env.manifest("vm", _manifest_disks(SIZE, ["raw-img", "raw-blank"]), instance=inst)
    saved = tmp_path / "plan.json"
    rc, _, err = env.run("--dry-run", "--plan-out", str(saved))
    assert rc == 0, err
    (a,) = json.loads(saved.read_text())["actions"]
    assert (a["disk"], a["preallocation"]) == ("raw-blank", "full")
    set_preallocation(env, {"local": "falloc"})
    rc, out, err = env.main(
        ["--config", str(env.config_path), "apply", str(saved), str(env.manifests)]
    )
    assert rc == 1 and "config" in out + err
    assert not env.volume(inst, "raw-blank").exists()
    set_preallocation(env, {"local": "full"})
    rc, out, err = env.main(
        ["--config", str(env.config_path), "apply", str(saved), str(env.manifests)]
    )
    assert rc == 0, out + err
    assert allocated(env.volume(inst, "raw-blank")) >= SIZE


@pytest.mark.libvirtd
@pytest.mark.parametrize(("fmt", "mode"), [("raw", "falloc"), ("qcow2", "full"), ("ploop", "full")])
def test_a_copy_migrated_into_a_preallocating_pool_is_allocated_and_recorded(
    env: Env, pools: Any, tmp_path: Path, image: Path, fmt: str, mode: str
) -> None:
    fast = pools.make(tmp_path / "fast")
    env.pools["fast"] = (fast.name, fast.path)
    env.backends = ["flat", "qcow2", "ploop"]
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    set_preallocation(env, {"fast": mode})
    inst = env.manifest("vm", [disk("d", size=SIZE, image="img", template=None)])
    assert env.run()[0] == 0
    assert allocated(env.volume(inst, "d")) < SIZE // 4
    backend = {"raw": "flat", "qcow2": "flat", "ploop": "ploop"}[fmt]
    moved = disk("d", size=SIZE, image="img", template=None, pool="fast", backend=backend, fmt=fmt)
    env.manifest("vm", [moved], instance=inst)
    (a,) = env.plan_json()["actions"]
    assert (a["action"], a["preallocation"]) == ("migrate", mode)
    rc, out, err = env.run()
    assert rc == 0, out + err
    vol = env.volume(inst, "d", pool="fast")
    assert allocated(vol) >= SIZE
    assert same_data(vol, _qemu_format(fmt), image)
    (rec,) = [r for r in records(env) if r.disk]
    assert (rec.pool, rec.format.value, rec.preallocation) == ("fast", fmt, Preallocation(mode))
    assert env.plan_json()["actions"] == []
