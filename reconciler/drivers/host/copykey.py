"""The key that authenticates record copies kept where others can write them.

A file's record copy belongs in `trusted.reconciler.record`, an extended attribute only a
process with CAP_SYS_ADMIN can read or write (root on the host: never the qemu process of
an unprivileged guest, never a tenant). A file system without the `trusted.*` namespace
(NFS keeps only `user.*`) gets the copy in `user.reconciler.record` instead, sealed with
HMAC-SHA256 under this key: anyone who can write the file can set that attribute, but
without the key they cannot make a copy that passes. A `user.*` copy that is unsealed, or
whose MAC fails, is not trusted: `records rebuild` reports it and skips it.

The key is 32 random bytes in `record-copy.key` beside the records database, mode 0600,
owned by the reconciler's user, made on the first copy that needs it (written whole, then
linked into place, so racing writers all use the first one). A key file that is not a
regular file of ours with no group or other access is refused: a key others could read
authenticates nothing. Losing the key (with the state directory) makes its copies
unverifiable, so rebuild skips them and says why; keep it with the database's backups.
A sealed copy binds nothing but its bytes, so an older copy of the same volume (a
generation ago) still passes: the key stops forgery by others, not replay of what this
host itself once wrote.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from reconciler.model.errors import ReconcileError

KEY_FILE = "record-copy.key"
KEY_BYTES = 32
SEAL = b"hmac-sha256:"


class CopyKeyError(ReconcileError):
    """The key file exists but cannot be used."""


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise CopyKeyError(
                f"{path} must be a regular file of uid {os.geteuid()} with mode 0600 "
                "(a key others can read authenticates nothing); record copies it seals "
                "are not trusted until it is"
            )
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise CopyKeyError(f"{path} does not hold a {KEY_BYTES}-byte key")
    return key


def load(state_dir: Path, *, create: bool) -> bytes | None:
    """The key (None: there is none and `create` is False). CopyKeyError if unusable."""
    path = state_dir / KEY_FILE
    try:
        return _read(path)
    except FileNotFoundError:
        if not create:
            return None
    except OSError as e:
        raise CopyKeyError(f"{path}: {e.strerror}") from None
    # Written whole under a temporary name, then linked into place (link never replaces):
    # a racing process or thread reads either no key or the whole key, and every racer
    # ends up with the one linked first.
    tmp = state_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    except OSError as e:
        raise CopyKeyError(f"cannot make {path}: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return _read(path)


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).hexdigest().encode()


def seal(key: bytes, data: bytes) -> bytes:
    """`data` with its MAC in front, as a `user.*` copy keeps it."""
    return SEAL + _mac(key, data) + b"\n" + data


def unseal(key: bytes | None, value: bytes) -> bytes | None:
    """The data of a sealed copy whose MAC passes under `key`; None otherwise."""
    if key is None or not value.startswith(SEAL):
        return None
    mac, sep, data = value[len(SEAL) :].partition(b"\n")
    if not sep or not hmac.compare_digest(mac, _mac(key, data)):
        return None
    return data


def no_trusted_namespace(e: OSError) -> bool:
    """Whether a `trusted.*` xattr failed because the file system (or our privilege) has
    no such namespace, rather than because of the file."""
    return e.errno in (errno.EOPNOTSUPP, errno.EPERM)
