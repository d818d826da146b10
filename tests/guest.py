"""Boot the test guest on the private libvirtd and read what it saw on each disk.

The guest (scripts/guest.sh builds it; the `guest_image` fixture of tests/conftest_guest.py
gives its path, size and sha256) is Debian's kernel and a busybox initramfs on a small FAT
image. It boots under TCG, prints one `REPORT` line per virtio disk on its serial console,
writes a qcow2 header onto the disk whose serial is `scribble`, prints `REPORT done` and
powers off. `boot()` starts it as a transient domain whose devices are exactly the given
`<disk>` elements (plus its serial console), waits for that, and returns the parsed lines.

    report = boot(libvirt_uri, [root_xml, eph_xml], name="guest-x")
    assert report.disk("root").sha256 == guest_image.sha256
    assert report.disk("eph").ext4label == "eph0"

The domain boots from its first disk in target order (`<os><boot dev='hd'/>`: libvirt
gives the first `hd` disk bootindex 1), so the root disk should be `vda`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as _escape

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "guest.sh"
# Where the `guest_image` fixture builds (and caches) the image: the checkout's .run.
CACHE = ROOT / ".run" / "guest"


@dataclass(frozen=True)
class GuestImage:
    """The image scripts/guest.sh built (its guest.env)."""

    path: Path
    size: int  # bytes; the guest hashes each disk's first `size` bytes
    sha256: str
    kernel: str
    header_backing: str  # the host path the qcow2 header on a `scribble` disk names
    label: str  # the image's FAT volume label


def build_guest_image(out_dir: Path = CACHE, timeout: float = 900) -> GuestImage:
    """Run scripts/guest.sh OUT_DIR (a no-op when its cached image is current); the image.
    Fails the test with the script's error if it cannot build."""
    try:
        res = subprocess.run(
            ["bash", str(SCRIPT), str(out_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"scripts/guest.sh {out_dir} took over {timeout:g} s: {e.stderr!r}", pytrace=False
        )
    if res.returncode != 0:
        pytest.fail(
            f"scripts/guest.sh {out_dir} failed (exit {res.returncode}):\n{res.stderr.strip()}",
            pytrace=False,
        )
    env = dict(
        line.split("=", 1)
        for line in (out_dir / "guest.env").read_text().splitlines()
        if "=" in line
    )
    return GuestImage(
        path=Path(env["GUEST_IMAGE"]),
        size=int(env["GUEST_SIZE"]),
        sha256=env["GUEST_SHA256"],
        kernel=env["GUEST_KERNEL"],
        header_backing=env["GUEST_HEADER_BACKING"],
        label=env["GUEST_LABEL"],
    )


@dataclass(frozen=True)
class DiskReport:
    """One `REPORT dev=...` line: what the guest read on one disk."""

    dev: str  # vda, vdb, ...
    serial: str  # /sys/block/DEV/serial ("" if none)
    size: int  # bytes
    sha256: str  # of the first GuestImage.size bytes (all of it if smaller)
    magic: str  # hex of the first 8 bytes
    ext4label: str | None  # the ext4 label, if an ext4 superblock is at 1024
    swap: bool  # a swap signature (SWAPSPACE2) at 4086
    swaplabel: str | None
    vfatlabel: str | None  # the FAT boot sector's volume label, if FAT12/16/32

    @property
    def magic_bytes(self) -> bytes:
        return bytes.fromhex(self.magic)


@dataclass
class GuestReport:
    """What one boot printed: the disks by serial, and the console for messages."""

    console: str
    disks: list[DiskReport] = field(default_factory=list)
    scribbled: list[str] = field(default_factory=list)  # devs the guest wrote the header on
    errors: list[str] = field(default_factory=list)  # its `REPORT error` lines
    booted: bool = False  # its init ran (`REPORT boot`)
    done: bool = False  # it reached `REPORT done`
    seconds: float = 0.0  # wall time from starting the domain to `done` (or its stop)

    @property
    def by_serial(self) -> dict[str, DiskReport]:
        return {d.serial: d for d in self.disks}

    def disk(self, serial: str) -> DiskReport:
        """The disk whose serial is `serial`; fails with what the guest did see."""
        got = [d for d in self.disks if d.serial == serial]
        if len(got) != 1:
            pytest.fail(
                f"the guest saw {len(got)} disks of serial {serial!r} (serials: "
                f"{[d.serial for d in self.disks]}); console:\n{tail(self.console)}",
                pytrace=False,
            )
        return got[0]


def escape(value: str) -> str:
    """Text for XML content or a single-quoted attribute."""
    return _escape(value, {"'": "&apos;", '"': "&quot;"})


_REPORT = re.compile(r"REPORT (.*)$")


def _text(value: str) -> str | None:
    """A hex field as text: `-` is None; trailing NULs and spaces (the padding) go."""
    if value == "-":
        return None
    return bytes.fromhex(value).rstrip(b"\0 ").decode("utf-8", "replace")


def parse_console(console: str) -> GuestReport:
    """The REPORT lines of a console capture. Kernel and firmware output around them (a
    terminal reset sequence may precede a line's `REPORT`) is ignored."""
    report = GuestReport(console=console)
    for raw in console.splitlines():
        m = _REPORT.search(raw.rstrip("\r"))
        if not m:
            continue
        words = m[1].split()
        if not words:
            continue
        head = words[0]
        if head == "boot":
            report.booted = True
        elif head == "done":
            report.done = True
        elif head == "error":
            report.errors.append(" ".join(words[1:]))
        elif head == "scribbled":
            report.scribbled.append(dict(w.split("=", 1) for w in words[1:] if "=" in w)["dev"])
        elif head.startswith("dev="):
            f = dict(w.split("=", 1) for w in words if "=" in w)
            try:
                report.disks.append(
                    DiskReport(
                        dev=f["dev"],
                        serial=_text(f["serial"]) or "",
                        size=int(f["size"]),
                        sha256=f["sha256"],
                        magic="" if f["magic"] == "-" else f["magic"],
                        ext4label=_text(f["ext4label"]),
                        swap=f["swap"] == "1",
                        swaplabel=_text(f["swaplabel"]),
                        vfatlabel=_text(f["vfatlabel"]),
                    )
                )
            except (KeyError, ValueError) as e:
                report.errors.append(f"unparsable report line {raw!r}: {e!r}")
    return report


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def domain_xml(name: str, disk_xmls: list[str], console: Path, memory_mib: int = 256) -> str:
    """A TCG domain (machine pc) whose devices are the given disks and a serial console
    written to `console`; no network, no graphics, no USB, no balloon. Every way it can
    end (power off, reboot, crash) stops it: its init powers off when done, and a panic
    reboots (panic=-1)."""
    disks = "\n".join(disk_xmls)
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{disks}
    <serial type='file'><source path='{escape(str(console))}'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _active(conn: Any, uuid: str) -> bool:
    """Whether the domain runs (by listing: a lookup of a transient domain that stopped
    would fail, and libvirt prints every failure on stderr)."""
    import libvirt

    flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
    return any(d.UUIDString() == uuid for d in conn.listAllDomains(flags))


def _stage(console: str) -> str:
    """How far the boot got, from the console (syslinux prints its banner on it)."""
    if "REPORT boot" in console:
        return " (its init ran)"
    if "SYSLINUX" in console:
        return " (syslinux ran, the kernel's init never did)"
    return " (nothing booted: the first disk is not the guest image, or the BIOS hung)"


def _qemu_log(conn: Any, name: str) -> str:
    """The tail of the domain's qemu log, when the connection is to a private daemon."""
    uri = conn.getURI()
    if "socket=" not in uri:
        return ""
    log = Path(uri.split("socket=", 1)[1]).parent.parent / "log" / "qemu" / f"{name}.log"
    text = _read(log)
    return f"\nqemu log {log}:\n{tail(text, 15)}" if text else ""


def boot(
    conn_or_uri: Any,
    disk_xmls: list[str],
    *,
    name: str,
    timeout: float = 180,
    workdir: Path | None = None,
    require_done: bool = True,
    memory_mib: int = 256,
) -> GuestReport:
    """Boot the test guest with exactly these `<disk>` elements (the first in target order
    is booted from) and return what it reported. Waits, up to `timeout` seconds, for the
    domain to stop after `REPORT done` (or to stop without it), polling its console file;
    the domain is destroyed whatever happens (and is transient, started with
    AUTODESTROY: a test process that dies takes it along). Fails the test, with the
    console's tail, on timeout, and when the guest stopped without `REPORT done` unless
    `require_done` is False. The console is written to WORKDIR/NAME.console (a temporary
    directory, removed after, if no `workdir`)."""
    import libvirt

    own_conn = isinstance(conn_or_uri, str)
    conn = libvirt.open(conn_or_uri) if own_conn else conn_or_uri
    tmp = None
    if workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="rcl-guest-"))
        workdir = tmp
    console = workdir / f"{name}.console"
    console.unlink(missing_ok=True)
    dom = None
    try:
        # A domain of this name an interrupted run left (transient: destroying ends it).
        for old in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            if old.name() == name:
                old.destroy()
        xml = domain_xml(name, disk_xmls, console, memory_mib)
        start = time.monotonic()
        try:
            dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY)
        except libvirt.libvirtError as e:
            pytest.fail(f"starting guest {name} failed: {e}\ndomain XML:\n{xml}", pytrace=False)
        uuid = dom.UUIDString()
        deadline = start + timeout
        pause = threading.Event()
        while _active(conn, uuid) and "REPORT done" not in _read(console):
            if time.monotonic() > deadline:
                text = _read(console)
                pytest.fail(
                    f"guest {name} did not reach REPORT done within {timeout:g} s"
                    f"{_stage(text)}; console {console}:\n{tail(text)}{_qemu_log(conn, name)}",
                    pytrace=False,
                )
            pause.wait(0.05)
        seconds = time.monotonic() - start
        # After `done` its init syncs and powers off: let it (its writes were synced
        # already, so a guest that hangs there is destroyed below, not failed).
        grace = min(deadline, time.monotonic() + 30)
        while _active(conn, uuid) and time.monotonic() < grace:
            pause.wait(0.05)
        report = parse_console(_read(console))
        report.seconds = seconds
        if require_done and not report.done:
            pytest.fail(
                f"guest {name} stopped without REPORT done; console {console}:\n"
                f"{tail(report.console)}{_qemu_log(conn, name)}",
                pytrace=False,
            )
        return report
    finally:
        if dom is not None and _active(conn, dom.UUIDString()):
            try:
                dom.destroy()
            except libvirt.libvirtError:  # it stopped meanwhile
                if _active(conn, dom.UUIDString()):
                    raise
        if own_conn:
            conn.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def file_disk_xml(path: Path | str, dev: str, serial: str, fmt: str = "raw") -> str:
    """A hand-written `<disk type='file'>` for tests: `path` as `fmt`, on virtio `dev`."""
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='{escape(fmt)}'/>"
        f"<source file='{escape(os.fspath(path))}'/><target dev='{escape(dev)}' bus='virtio'/>"
        f"<serial>{escape(serial)}</serial></disk>"
    )
