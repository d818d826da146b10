"""drivers/api.py's implements(): isinstance of an opt-in capability, answered from the
class where the class has it (issue 27), and as isinstance answers it otherwise."""

from __future__ import annotations

from typing import Any

from reconciler.drivers.api import Encrypts, Snapshots, implements
from reconciler.drivers.file.pool import FilePoolDriver
from reconciler.drivers.lvm.pool import LvmPoolDriver


class _Keys:
    def secrets(self) -> Any:
        return None

    def key_usage(self, volume: str) -> str:
        return volume


class _Bare:
    pass


def test_implements_answers_as_isinstance() -> None:
    keys, bare = _Keys(), _Bare()
    for obj, cap in ((keys, Encrypts), (keys, Snapshots), (bare, Encrypts)):
        for _ in range(2):  # the second answer comes from the class's cached one
            assert implements(obj, cap) is isinstance(obj, cap)
    assert implements(keys, Encrypts) and not implements(bare, Encrypts)


def test_an_object_given_the_methods_is_seen_though_its_class_lacks_them() -> None:
    assert not implements(_Bare(), Encrypts)
    late = _Bare()
    late.secrets = lambda: None  # type: ignore[attr-defined]
    late.key_usage = lambda volume: volume  # type: ignore[attr-defined]
    assert isinstance(late, Encrypts)
    assert implements(late, Encrypts)
    assert not implements(_Bare(), Encrypts)


def test_the_drivers_capabilities() -> None:
    for cls in (FilePoolDriver, LvmPoolDriver):
        assert issubclass(cls, Encrypts) and issubclass(cls, Snapshots)
