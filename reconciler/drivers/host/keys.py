"""Disk encryption keys: made here, kept only in a libvirt secret, handed to qemu-img only
as a descriptor. Never logged, never in a record, a plan, an exported state or an argv.

A disk's key is 32 random bytes written as 64 hex digits (the LUKS passphrase qemu and
libvirt are given; text, so every tool that takes a passphrase takes it). Its only home is
a libvirt secret on the daemon of the disk's pool (`<secret ephemeral='no'
private='yes'>`): persistent across daemon restarts, and never given back through
libvirt's API (virSecretGetValue refuses a private secret), so nothing that can reach the
daemon's socket can read it; libvirt itself hands it to qemu when a domain opens the disk.

Consequences, by design:
- the key exists in the reconciler's memory only while it makes the disk (`held`): the
  create step makes it, defines the secret and the driver's qemu-img calls read it from a
  memfd (`secret_object`);
- what grows a raw disk never needs it: a LUKS payload runs to its volume's end (a raw
  disk grows by growing the volume to the recorded header + size); qemu-img opens an
  encrypted qcow2 only with its key, so growing one needs the pool's key source, as
  does a migration that reads the disk decrypted (rekey, decrypt: model/keying.py),
  and each is a plan error without one.

Order (the create and delete steps): record with the secret's UUID (durable) -> [a key
source: the key stored there, `key.stored`] -> secret defined with the key
(`secret.defined`) -> volume made -> ready; delete: volume removed -> secret undefined
(`secret.undefined`, crypto-erase: whatever of the volume's bytes survive, on a file
system's free blocks or a snapshot, no longer decrypts) -> [the source's key deleted,
`key.deleted`] -> record removed. So neither a secret nor a stored key outlives its
record, and a record is never `ready` without its secret.

A key source (a pool's config `keys`: a `KeySource`, `KeyDirectory` for `{directory: DIR}`
or keycommand.py's `KeyCommand` for a KMS's `{command: [...]}`) is how another host
sharing a Ceph pool gets a key: a take-over of an encrypted disk reads it there by the
UUID its record names and defines the same secret on its own daemon (`restore`); the
`restore-key` step does the same for a disk of this host whose secret is gone. DIR is
root's and 0700, each key file root's and 0600 (anything else is refused, never read);
files are opened relative to the directory's descriptor, without following links,
written under a temporary name and renamed, and the directory fsynced.

The secret names its volume in its usage (libvirt's `volume` usage, the path a
domain opens), which libvirt keeps unique: a secret of someone else's for that path
makes the define fail, never replaced.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import libvirt

from reconciler.drivers.host.keycommand import KeyCommand, check_key
from reconciler.drivers.host.libvirt import Connections
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord, Encryption
from reconciler.schema.common import DiskFormat
from reconciler.schema.config import KeySourceConfig
from reconciler.util import faults

# The id qemu-img's `--object secret` has in every command line that names a key.
SECRET_ID = "sec0"
# Bytes before the payload of qemu's LUKS volume as made here (flows/qemuimg.py), recorded
# in each raw encrypted disk's record before it is made; the create checks the volume.
LUKS_HEADER = 2068480


class KeyError_(ReconcileError):
    """A disk's key is not where it must be (not held while its disk is made)."""


def new_encryption(spec: Mapping[str, Any]) -> Encryption | None:
    """The encryption a disk made to `spec` records before it is made: a new secret UUID
    (the key comes later, with the secret), and a raw disk's LUKS header size."""
    asked = spec.get("encryption")
    if asked is None:
        return None
    header = LUKS_HEADER if spec["format"] == DiskFormat.RAW.value else None
    return Encryption(format=asked["format"], secret=str(uuid.uuid4()), header=header)


def new_key() -> bytes:
    """A fresh disk key: 256 random bits as 64 hex digits."""
    return secrets.token_hex(32).encode()


_held: dict[str, bytes] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def held(uuid: str, key: bytes) -> Iterator[None]:
    """`key` is the key of secret `uuid` while the block runs (its disk is made)."""
    with _held_lock:
        _held[uuid] = key
    try:
        yield
    finally:
        with _held_lock:
            _held.pop(uuid, None)


def key_of(uuid: str) -> bytes:
    """The key of secret `uuid`, if it is held; raises otherwise (a private libvirt secret
    cannot be read back, so a key is only at hand while its disk is made)."""
    with _held_lock:
        key = _held.get(uuid)
    if key is None:
        raise KeyError_(
            f"the key of libvirt secret {uuid} is not at hand: it is kept only in that "
            "private secret, which libvirt never gives back"
        )
    return key


@contextlib.contextmanager
def key_object(key: bytes, secret_id: str) -> Iterator[tuple[list[str], int]]:
    """qemu-img's `--object secret` of `key` as `secret_id`, through a memfd (no file on
    any file system, no key in the argv): (argv words, the descriptor to pass)."""
    fd = os.memfd_create("reconciler-key", os.MFD_CLOEXEC)
    try:
        os.write(fd, key)
        os.lseek(fd, 0, os.SEEK_SET)
        yield ["--object", f"secret,id={secret_id},format=raw,file=/proc/self/fd/{fd}"], fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def secret_object(uuid: str) -> Iterator[tuple[list[str], int]]:
    """key_object of the held key of `uuid`, as SECRET_ID."""
    with key_object(key_of(uuid), SECRET_ID) as obj:
        yield obj


def secret_xml(uuid: str, usage: str, description: str) -> str:
    root = ET.Element("secret", ephemeral="no", private="yes")
    ET.SubElement(root, "uuid").text = uuid
    ET.SubElement(root, "description").text = description
    use = ET.SubElement(root, "usage", type="volume")
    ET.SubElement(use, "volume").text = usage
    return ET.tostring(root, encoding="unicode")


DESCRIPTION_PREFIX = "reconcile: key of "
# Ends the description of a secret defined but not yet given its value (Secrets.define).
UNSET = " (value not yet set)"


MAX_KEY_BYTES = 4096


class KeySource(Protocol):
    """Where a pool's disk keys are kept besides its daemon's libvirt secrets, by secret
    UUID: a directory (`KeyDirectory`) or a KMS's command (keycommand.py: `KeyCommand`).
    Each raises ReconcileError (never quoting a key) when it cannot do what it is asked."""

    label: str  # for messages: "key directory DIR", "key command PROG"

    def put(self, uuid_: str, key: bytes) -> None:
        """Keep `key` as `uuid_` (replacing one of a redo), durably, before it returns."""

    def get(self, uuid_: str) -> bytes:
        """The key kept as `uuid_`; ReconcileError when there is none."""

    def delete(self, uuid_: str) -> None:
        """Forget `uuid_`'s key; one already gone is fine (a redo)."""


def key_source(config: KeySourceConfig | None) -> KeySource | None:
    """The key source a pool's config `keys` names, if any."""
    if config is None:
        return None
    if config.command is not None:
        return KeyCommand(config.command, config.timeout)
    assert config.directory is not None
    return KeyDirectory(config.directory)


class KeyDirectory:
    """A directory of key files only root can read (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.label = f"key directory {path}"

    @contextlib.contextmanager
    def _dir(self) -> Iterator[int]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ReconcileError(f"key directory {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise ReconcileError(
                    f"key directory {self.path} is refused: it must be owned by uid "
                    f"{os.geteuid()} with mode 0700 (it is uid {st.st_uid}, mode "
                    f"{stat.S_IMODE(st.st_mode):04o})"
                )
            yield fd
        finally:
            os.close(fd)

    def put(self, uuid_: str, key: bytes) -> None:
        """Store `key` as the file `uuid_` (replacing one of a redo)."""
        tmp = f".tmp-{uuid_}"
        with self._dir() as d:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=d)
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=d,
            )
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, uuid_, src_dir_fd=d, dst_dir_fd=d)
            os.fsync(d)
        faults.point("key.stored")

    def get(self, uuid_: str) -> bytes:
        """The key stored as `uuid_`; ReconcileError (never a key) if it is not there or
        its file is not root's alone."""
        with self._dir() as d:
            try:
                fd = os.open(uuid_, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
            except OSError as e:
                raise ReconcileError(
                    f"the key of secret {uuid_} is not in key directory {self.path}: {e.strerror}"
                ) from None
            try:
                st = os.fstat(fd)
                if (
                    not stat.S_ISREG(st.st_mode)
                    or st.st_uid != os.geteuid()
                    or st.st_mode & 0o077
                    or not 0 < st.st_size <= MAX_KEY_BYTES
                ):
                    raise ReconcileError(
                        f"key file {self.path}/{uuid_} is refused: it must be a regular file "
                        f"of uid {os.geteuid()}, mode 0600, of 1-{MAX_KEY_BYTES} bytes"
                    )
                return os.read(fd, MAX_KEY_BYTES)
            finally:
                os.close(fd)

    def delete(self, uuid_: str) -> None:
        """Remove the key stored as `uuid_`, and a temporary file a crash in `put` left
        (one already gone is fine: a redo)."""
        with self._dir() as d:
            for name in (uuid_, f".tmp-{uuid_}"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=d)
            os.fsync(d)
        faults.point("key.deleted")


class Secrets:
    """The libvirt secrets of one daemon (a pool's `uri`) that hold disk keys, and the
    pool's key source, if its config names one."""

    def __init__(
        self, conns: Connections, uri: str, pool: str, source: KeySourceConfig | None = None
    ) -> None:
        self.conns = conns
        self.uri = uri
        self.pool = pool
        self.source = key_source(source)

    def _call(self, what: str, fn: Any) -> Any:
        return self.conns.call(self.uri, f"{what} (pool {self.pool})", fn)

    def define(self, uuid: str, usage: str, volume: str, key: bytes) -> None:
        """Define secret `uuid` (private, persistent) for the volume at `usage` and set
        its value to `key`. Again over our own secret of that UUID is fine (a redo).

        Three calls, not two: libvirt's define and setValue are separate, and a private
        secret answers "secret is private" whether or not it has a value (checked on
        libvirt 9.0), so a kill between them would leave an empty secret that looks like
        any other. So it is defined marked UNSET in its description, given its value,
        then defined again unmarked (a redefinition with the same usage keeps the value);
        a marked secret is counted as missing (`held`, `exists`)."""
        desc = f"{DESCRIPTION_PREFIX}{self.pool}/{volume}"
        marked = secret_xml(uuid, usage, desc + UNSET)
        final = secret_xml(uuid, usage, desc)

        def mark(conn: Any) -> None:
            conn.secretDefineXML(marked, 0)

        def set_value(conn: Any) -> None:
            conn.secretLookupByUUIDString(uuid).setValue(key, 0)

        def unmark(conn: Any) -> None:
            conn.secretDefineXML(final, 0)

        what = f"define libvirt secret {uuid}, the key of {volume}"
        self._call(what, mark)
        faults.point("secret.marked")
        self._call(what, set_value)
        self._call(what, unmark)
        faults.point("secret.defined")

    def _state(self, conn: Any, uuid: str) -> str:
        """`held` (defined, its value set), `unset` (defined marked UNSET) or `missing`."""
        try:
            xml = conn.secretLookupByUUIDString(uuid).XMLDesc(0)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return "missing"
            raise
        desc = ET.fromstring(xml).findtext("description") or ""
        return "unset" if desc.endswith(UNSET) else "held"

    def exists(self, uuid: str) -> bool:
        """Secret `uuid` is defined with its value (a marked one is not: see `define`)."""
        return bool(self._call("look up a key secret", lambda c: self._state(c, uuid) == "held"))

    def held(self, uuids: Iterable[str]) -> frozenset[str]:
        """Those of `uuids` whose secrets the daemon holds with their values."""
        wanted = sorted(set(uuids))
        if not wanted:
            return frozenset()
        return frozenset(
            self._call(
                "look up the key secrets of the pool's records",
                lambda c: [u for u in wanted if self._state(c, u) == "held"],
            )
        )

    def undefine(self, uuid: str, volume: str) -> None:
        """Undefine secret `uuid` (crypto-erase); one already gone is fine (a redo)."""

        def undefine(conn: Any) -> None:
            try:
                conn.secretLookupByUUIDString(uuid).undefine()
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                    raise

        self._call(f"undefine libvirt secret {uuid}, the key of {volume}", undefine)
        faults.point("secret.undefined")


@contextlib.contextmanager
def made_with_key(secrets_: Secrets, rec: DiskRecord, usage: str) -> Iterator[None]:
    """While `rec`'s disk is made: a new key, defined as its recorded secret (the record
    naming it is already durable) and held for the driver's qemu-img calls."""
    enc = rec.encryption
    assert enc is not None
    key = new_key()
    with held(enc.secret, key):
        if secrets_.source is not None:
            secrets_.source.put(enc.secret, key)
        secrets_.define(enc.secret, usage, rec.volume, key)
        yield


def erase(secrets_: Secrets, rec: DiskRecord) -> None:
    """Undefine the secret of `rec`, whose volume is gone (crypto-erase); none: nothing."""
    if rec.encryption is not None:
        secrets_.undefine(rec.encryption.secret, rec.volume)
        if secrets_.source is not None:
            secrets_.source.delete(rec.encryption.secret)


def restore(secrets_: Secrets, rec: DiskRecord, usage: str) -> None:
    """Define `rec`'s secret on this daemon from the pool's key source (a disk another
    host made, taken over here); ReconcileError where there is no source or no key."""
    enc = rec.encryption
    assert enc is not None
    if secrets_.source is None:
        raise ReconcileError(
            f"{rec.pool}/{rec.volume} is encrypted and its key is not on this host; pool "
            f"{rec.pool} has no key source (config `keys`) to get it from"
        )
    key = check_key(secrets_.source.get(enc.secret), f"the key {secrets_.source.label} gave")
    secrets_.define(enc.secret, usage, rec.volume, key)
