"""LVM pools: a volume group on this host serving the lvm backend."""
