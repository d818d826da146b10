"""LVM2's own tools, confined to one volume group, and the one way to reach an LV's bytes.

Every LVM2 command the lvm driver runs goes through `Lvm.run`:
- `--devices PV,...` when the pool's config lists the VG's physical volumes: LVM then
  scans and opens only those, never the host's other block devices (without the list it
  uses the host's own LVM device configuration, its devices file or filter);
- every command names the VG (`lvs VG`, `lvcreate ... VG`, `lvremove VG/LV`), so no other
  VG is ever read for a decision or changed;
- `--driverloaded n` when the pool's `activate` is false (the test mode of a host without
  device-mapper): real LVM2 metadata, no device-mapper;
- reports as JSON (`--reportformat json`, sizes in bytes), never parsed from columns;
- a minimal environment with LVM_SUPPRESS_FD_WARNINGS=1, plus LVM_SYSTEM_DIR if the
  reconciler was given one (LVM's own variable: where its lvm.conf, backups and archives
  are; the tests point it at a private directory);
- a bounded time (`TIMEOUT`), and on failure an error naming the pool, the VG (and LV) and
  LVM's own message.

`LvData` is the one interface to an LV's bytes: a list of pieces (descriptor, offset,
length). With activation (production) that is one piece, /dev/VG/LV opened O_NOFOLLOW.
With activation off there is no device node, and `segment_map` (the only test-only path,
kept tiny) reads the LV's linear segments (`lvs --segments -o seg_pe_ranges`) and the
PVs' first extent (`pvs -o pe_start`) and gives pieces of the PV itself: offset
pe_start + first_pe * extent_size, length extents * extent_size, in the LV's order.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from reconciler.drivers.flows.copy import is_zero, pwrite_all
from reconciler.drivers.host.run import execute
from reconciler.model.errors import PoolError, ReconcileError
from reconciler.schema.config import LvmConfig
from reconciler.util import progress

TIMEOUT = 120.0  # seconds any one LVM2 command may take
LVM_NOT_FOUND = 5  # LVM's exit status for "no such LV/VG" (ECMD_FAILED)
_RANGE = re.compile(r"^(?P<pv>/[^:]+):(?P<first>\d+)-(?P<last>\d+)$")
BLKZEROOUT = 0x127F  # _IO(0x12, 127): the block layer writes zeros (offset, length)
CHUNK = 4 << 20


class LvmError(ReconcileError):
    """An LVM2 command failed; the message names pool, VG, LV and LVM's own words."""


@dataclass(frozen=True)
class Piece:
    """`length` bytes of an LV at `offset` of the device behind `fd`."""

    fd: int
    offset: int
    length: int


def message(stderr: str, stdout: str) -> str:
    """LVM's own words of a failure, without its warnings (one line)."""
    lines = [ln.strip() for ln in (stderr or stdout).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("WARNING:")]
    return "; ".join(useful or lines) or "no message"


class Lvm:
    """LVM2 commands for one pool's VG (see the module's docstring for the confinement)."""

    def __init__(self, pool: str, config: LvmConfig) -> None:
        self.pool = pool
        self.vg = config.vg
        self.config = config
        common: list[str] = []
        if config.devices:
            common += ["--devices", ",".join(config.devices)]
        if not config.activate:
            common += ["--driverloaded", "n"]
        self.common = common
        env = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
        if os.environ.get("LVM_SYSTEM_DIR"):
            env["LVM_SYSTEM_DIR"] = os.environ["LVM_SYSTEM_DIR"]
        self.env = env
        self._mu = threading.Lock()
        self._pe_start: dict[str, int] = {}

    def where(self, lv: str | None = None) -> str:
        return f"pool {self.pool} (VG {self.vg}{', LV ' + lv if lv else ''})"

    def execute(self, cmd: str, *args: str, lv: str | None = None) -> tuple[int, str, str]:
        res = execute(
            [cmd, *self.common, *args],
            (),
            f"{cmd} in {self.where(lv)}",
            env=self.env,
            timeout=TIMEOUT,
        )
        return res.returncode, res.stdout, res.stderr

    def run(self, cmd: str, *args: str, lv: str | None = None) -> str:
        rc, out, err = self.execute(cmd, *args, lv=lv)
        if rc != 0:
            raise LvmError(f"{cmd} failed in {self.where(lv)}: {message(err, out)}")
        return out

    def report(
        self, cmd: str, fields: str, *args: str, lv: str | None = None
    ) -> list[dict[str, str]]:
        """One JSON report's rows (`lvs`, `vgs`, `pvs`), sizes in bytes without suffix."""
        out = self.run(
            cmd, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, *args, lv=lv
        )
        try:
            doc = json.loads(out)
            rows: list[dict[str, str]] = []
            for part in doc["report"]:
                for v in part.values():
                    rows.extend(v)
            return rows
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LvmError(
                f"{cmd} in {self.where(lv)} gave a report that is not JSON: {e}"
            ) from None

    def check_vg(self) -> dict[str, str]:
        """The VG's tags and extent size; PoolError if LVM does not know the VG."""
        rc, out, err = self.execute(
            "vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
            "-o", "vg_name,vg_tags,vg_extent_size", self.vg,
        )  # fmt: skip
        if rc != 0:
            raise PoolError(
                f"{self.where()}: LVM cannot read the volume group: {message(err, out)}"
            )
        try:
            (row,) = json.loads(out)["report"][0]["vg"]
            return dict(row)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise PoolError(f"{self.where()}: vgs gave an unexpected report ({e})") from None

    def pe_starts(self, pvs: frozenset[str]) -> dict[str, int]:
        """Where each PV of the VG has its first extent (`pvs -o pe_start`). Read once per
        PV: only pvcreate sets it."""
        with self._mu:
            if pvs <= self._pe_start.keys():
                return dict(self._pe_start)
        rows = self.report("pvs", "pv_name,pe_start,vg_name", "--select", f"vg_name={self.vg}")
        with self._mu:
            self._pe_start = {r["pv_name"]: int(r["pe_start"]) for r in rows}
            return dict(self._pe_start)

    def lv_names(self) -> frozenset[str]:
        """Every LV of the VG, by name (one `lvs` call)."""
        rows = self.report("lvs", "lv_name", self.vg)
        return frozenset(r["lv_name"] for r in rows)

    def lv_tags(self, lv: str | None = None) -> dict[str, list[str]]:
        """LV name -> its tags (of one LV, or of every LV of the VG)."""
        rows = self.report("lvs", "lv_name,lv_tags", f"{self.vg}/{lv}" if lv else self.vg, lv=lv)
        return {r["lv_name"]: [t for t in r["lv_tags"].split(",") if t] for r in rows}

    def lv_exists(self, lv: str) -> bool:
        rc, out, err = self.execute(
            "lvs", "--reportformat", "json", "-o", "lv_name", f"{self.vg}/{lv}", lv=lv
        )
        if rc == 0:
            return True
        msg = message(err, out)
        if rc == LVM_NOT_FOUND and "Failed to find logical volume" in msg:
            return False
        raise LvmError(f"lvs failed in {self.where(lv)}: {msg}")


# -- the data of an LV ------------------------------------------------------------------


class LvData:
    """Open an LV's bytes as pieces (see the module's docstring)."""

    def __init__(self, lvm: Lvm) -> None:
        self.lvm = lvm

    @contextmanager
    def open(self, lv: str, size: int | None, *, write: bool) -> Iterator[list[Piece]]:
        """The LV's first `size` bytes (None: all of it) as pieces, in order."""
        with self.open_many({lv: size}, write=write) as maps:
            yield maps[lv]

    @contextmanager
    def open_many(
        self, lvs: Mapping[str, int | None], *, write: bool
    ) -> Iterator[dict[str, list[Piece]]]:
        """Several LVs' first bytes at once (one pair of reports without activation)."""
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
        if not self.lvm.config.activate:
            with self.segment_map(lvs, flags) as maps:
                yield maps
            return
        fds: list[int] = []
        try:
            maps = {}
            for lv, size in lvs.items():
                path = f"/dev/{self.lvm.vg}/{lv}"
                # /dev/VG/LV is a link LVM (or udev) makes to /dev/dm-N: follow that one
                # link, then refuse anything but a block device.
                fds.append(os.open(os.path.realpath(path), flags))
                if not stat.S_ISBLK(os.fstat(fds[-1]).st_mode):
                    raise LvmError(f"{path} is not a block device; refusing to touch it")
                whole = os.lseek(fds[-1], 0, os.SEEK_END)
                maps[lv] = [Piece(fds[-1], 0, whole if size is None else size)]
            yield maps
        finally:
            for fd in fds:
                os.close(fd)

    @contextmanager
    def segment_map(
        self, lvs: Mapping[str, int | None], flags: int
    ) -> Iterator[dict[str, list[Piece]]]:
        """TEST-ONLY (activation off, no device-mapper): each LV's linear segments as
        pieces of its PVs, from two reports; nothing else differs from production."""
        lvm = self.lvm
        segs = lvm.report(
            "lvs", "lv_name,seg_start_pe,seg_pe_ranges,segtype,vg_extent_size", "--segments",
            *(f"{lvm.vg}/{lv}" for lv in lvs),
        )  # fmt: skip
        starts = lvm.pe_starts(frozenset(_pv_of(s) for s in segs))
        fds: dict[str, int] = {}
        try:
            maps: dict[str, list[Piece]] = {}
            left = {lv: (1 << 62) if n is None else n for lv, n in lvs.items()}
            for s in sorted(segs, key=lambda r: (r["lv_name"], int(r["seg_start_pe"]))):
                lv = s["lv_name"]
                m = _RANGE.match(s["seg_pe_ranges"].strip())
                if s["segtype"] != "linear" or m is None:
                    raise LvmError(
                        f"{lvm.where(lv)}: segment {s['seg_pe_ranges']!r} ({s['segtype']}) is "
                        "not one linear range; the segment map reads only those"
                    )
                pv, ext = m["pv"], int(s["vg_extent_size"])
                if pv not in starts:
                    raise LvmError(f"{lvm.where(lv)}: {pv} is not a PV of the VG")
                if pv not in fds:
                    fds[pv] = os.open(pv, flags)
                    if not stat.S_ISBLK(os.fstat(fds[pv]).st_mode):
                        raise LvmError(f"{pv} is not a block device; refusing to touch it")
                length = min(left[lv], (int(m["last"]) - int(m["first"]) + 1) * ext)
                if length > 0:
                    maps.setdefault(lv, []).append(
                        Piece(fds[pv], starts[pv] + int(m["first"]) * ext, length)
                    )
                    left[lv] -= length
            short = sorted(lv for lv, n in left.items() if n > 0 and lvs[lv] is not None)
            if short:
                raise LvmError(f"{lvm.where(short[0])}: the LV holds fewer bytes than asked for")
            yield maps
        finally:
            for fd in fds.values():
                os.close(fd)


def _pv_of(seg: Mapping[str, str]) -> str:
    return seg["seg_pe_ranges"].strip().rpartition(":")[0]


def zero(pieces: Sequence[Piece], limit: int | None = None) -> None:
    """Write zeros over the pieces (the first `limit` bytes of them, if given): the block
    layer's BLKZEROOUT where the device offers it, plain writes of zeros where not."""
    left = sum(p.length for p in pieces) if limit is None else limit
    with progress.task("wipe", left) as wiping:
        for p in pieces:
            n = min(p.length, left)
            if n <= 0:
                break
            if not _zero_range(p.fd, p.offset, n):
                buf = bytes(CHUNK)
                done = 0
                while done < n:
                    k = min(CHUNK, n - done)
                    pwrite_all(p.fd, buf[:k], p.offset + done)
                    done += k
                    wiping.advance(k)
            else:
                wiping.advance(n)
            left -= n
    for fd in {p.fd for p in pieces}:
        os.fsync(fd)


def pieces_reader(pieces: Sequence[Piece]) -> Callable[[int, int], bytes]:
    """Reads of an LV's bytes (a cache entry), through its pieces."""

    def read(pos: int, n: int) -> bytes:
        base = 0
        for p in pieces:  # within one piece (almost always): one pread, no copy
            if base <= pos and pos + n <= base + p.length:
                return os.pread(p.fd, n, p.offset + pos - base)
            base += p.length
        out = bytearray()
        base = 0
        for p in pieces:
            if n > 0 and base <= pos < base + p.length:
                k = min(n, base + p.length - pos)
                out += os.pread(p.fd, k, p.offset + pos - base)
                pos += k
                n -= k
            base += p.length
        return bytes(out)

    return read


class PiecesSource:
    """An LV's first bytes, as pieces, as a RawSource (drivers/api.py): all of them are
    read (an LV has no holes to know of)."""

    fd: int | None = None

    def __init__(self, pieces: Sequence[Piece], what: str, size: int | None = None) -> None:
        self.what = what
        self.size = sum(p.length for p in pieces) if size is None else size
        self._read = pieces_reader(pieces)

    def read(self, at: int, n: int) -> bytes:
        return self._read(at, n)

    def extents(self) -> Iterator[tuple[int, int]]:
        yield 0, self.size


class PiecesSink:
    """An LV's bytes, as pieces, as a RawSink: not zeroed (its extents may hold an earlier
    tenant's bytes), so a copy writes all of it. A run of zeros is zeroed by the block
    layer (BLKZEROOUT) rather than written, where the device offers it; finish() fsyncs
    the device(s)."""

    fd: int | None = None
    zeroed = False

    def __init__(self, pieces: Sequence[Piece], what: str) -> None:
        self.pieces = pieces
        self.what = what
        self.size = sum(p.length for p in pieces)

    def write(self, data: bytes, at: int) -> None:
        base = 0
        for p in self.pieces:
            lo, hi = max(at, base), min(at + len(data), base + p.length)
            if lo < hi:
                # The whole of `data` (almost always) is not copied; a run of zeros is
                # found by one comparison (raw_copy passes the same zero chunk each time).
                part = data if (lo, hi) == (at, at + len(data)) else data[lo - at : hi - at]
                offset = p.offset + lo - base
                if not (is_zero(part) and _zero_range(p.fd, offset, len(part))):
                    pwrite_all(p.fd, part, offset)
            base += p.length

    def finish(self) -> None:
        for fd in {p.fd for p in self.pieces}:
            os.fsync(fd)


def _zero_range(fd: int, offset: int, length: int) -> bool:
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
    except OSError:
        return False
    return True


def read_all(pieces: Sequence[Piece]) -> bytes:
    """Every byte of the pieces, in order (for tests and the benchmark's checks)."""
    return b"".join(os.pread(p.fd, p.length, p.offset) for p in pieces)
