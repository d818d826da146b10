"""File pools (libvirt `dir`, `fs`, `netfs`) serving the flat, qcow2 and ploop backends.

pool.py is the driver's face (observing, header checks, ownership, the raw-bytes core)
handing each concern to its module: volumes.py (the pool directory through libvirt: list,
create, delete, rename, locks, scratch files), disks.py (disks from an image or a
template over the pool's cache entries, resize), ploop.py (ploop's own making),
copies.py (record copies in `trusted.*` xattrs, sealed `user.*` ones),
intake.py (adopting a volume, taking a file in, Nova's overlays) and migrate.py."""
