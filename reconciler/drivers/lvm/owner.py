"""Which record store manages an lvm pool: a tag on its VG.

The VG carries `reconciler.owner:OWNER` (base64 JSON, as drivers/host/ownership.py's file):
the store that manages the pool, added once, under a host lock (`.owner`), so of two
reconcilers claiming together exactly one wins; replaced only by `records rebuild`
(take_over: the old tags deleted and the new one added in one `vgchange`). A damaged or
doubled tag is a PoolError naming the way out, never read as no owner.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from reconciler.drivers.host import ownership
from reconciler.drivers.lvm.volumes import Lvs
from reconciler.model.errors import PoolError
from reconciler.schema.bounded import load_json

OWNER_TAG = "reconciler.owner:"


class VgOwner:
    """The owner tag of one lvm pool's VG."""

    def __init__(self, lvs: Lvs) -> None:
        self.lvs = lvs
        self.name = lvs.name

    def owner_from(self, vg: Mapping[str, str]) -> ownership.Owner | None:
        tags = [t for t in vg.get("vg_tags", "").split(",") if t.startswith(OWNER_TAG)]
        if not tags:
            return None
        try:
            if len(tags) > 1:
                raise ValueError("it has more than one owner tag")
            doc = load_json(base64.b64decode(tags[0][len(OWNER_TAG) :]), what="the tag")
            return ownership.Owner(
                str(doc["store"]), str(doc["location"]), str(doc["host"]), str(doc["since"])
            )
        except (ValueError, KeyError, TypeError) as e:
            raise PoolError(
                f"pool {self.name}: the owner tag of VG {self.lvs.vg} is damaged ({e}); it "
                "names the record store that manages the pool. Run 'reconcile records rebuild "
                f"{self.name}' to have this store manage it"
            ) from None

    def _tag(self) -> str:
        owner = ownership.Owner.of(self.lvs.store().identity())
        return OWNER_TAG + base64.b64encode(owner.to_json().encode()).decode()

    def check(self, owner: ownership.Owner | None) -> ownership.Owner | None:
        """`owner`, unless it is another store (ManagedElsewhere)."""
        if owner is not None:
            why = ownership.refusal(self.name, owner, self.lvs.store().identity())
            if why is not None:
                raise ownership.ManagedElsewhere(why)
        return owner

    def owner(self) -> ownership.Owner | None:
        return self.owner_from(self.lvs.lvm.check_vg())

    def claim(self) -> None:
        """Tag the VG with this store unless it is tagged; under the host's lock, so of
        two reconcilers claiming together exactly one wins."""
        lvs = self.lvs
        with lvs.lock(".owner"):
            if self.check(self.owner()) is None:
                lvs.lvm.run("vgchange", "--addtag", self._tag(), lvs.vg)

    def take_over(self) -> None:
        lvs = self.lvs
        with lvs.lock(".owner"):
            vg = lvs.lvm.check_vg()
            old = [t for t in vg.get("vg_tags", "").split(",") if t.startswith(OWNER_TAG)]
            args = [a for t in old for a in ("--deltag", t)]
            lvs.lvm.run("vgchange", *args, "--addtag", self._tag(), lvs.vg)
