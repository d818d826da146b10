"""What drivers share on this host: the SQLite record store and the one record decoder every
store uses (decode.py), file locks, the libvirt connection, which domains use a volume,
which store manages a pool, the record-copy key and the one way tools (qemu-img, mkfs) are
run."""
