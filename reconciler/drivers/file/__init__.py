"""File pools (libvirt `dir`, `fs`, `netfs`) serving the flat, qcow2 and ploop backends."""
