"""Backend drivers: everything that differs between flat, qcow2, lvm, rbd and ploop.

api.py is what a driver provides (the Volumes core and the ManagingDriver the layers above
call), registry.py which driver serves a pool; flows/ holds what every backend does the
same way (a cache entry made and used, a file taken in, raw copies, qemu-img command
lines); ingest/ what comes in (fetch, checks, headers); host/ this host's infrastructure
(records database, locks, libvirt, domains); file/, lvm/ and rbd/ one backend each.
No backend package imports another."""
