"""Attach: what a compute service needs to give the reconciler's disks to a domain.

The pipeline's last folder: after a plan is applied, `ready` says whether each disk of an
instance is made, at rest, at its manifest's current content (its record ready, no step
planned for it, no error), and `xml` builds each ready disk's libvirt `<disk>` element
from its record (format, backing chain) and its pool's config (where the volume is, the
driver's cache, io, discard and detect_zeroes, Ceph's monitors and secret), never from the
volume or libvirt's probing. reconciler.client is the Python API over both;
`reconcile disks` and `reconcile wait` the commands.

Modules: ready (DiskState, readiness of an instance's disks), xml (the `<disk>` element).
"""
