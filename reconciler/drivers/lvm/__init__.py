"""LVM pools: a volume group on this host serving the lvm backend.

pool.py is the driver's face (observing, header checks, adoption, the raw-bytes core)
handing each concern to its module: tools.py (LVM2's own commands confined to the VG, the
one way to an LV's bytes), volumes.py (LVs under their locks: create, delete with
volumeClear, rename, size), disks.py (disks from an image or a template, cache entries
filled, resize), copies.py (record copies in LV tags), owner.py (the VG's owner tag) and
migrate.py. An lvm pool has no overlays: the Overlays capability is not declared."""
