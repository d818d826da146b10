"""Ceph RBD pools serving the rbd backend: disks, clones of cached images, the records kept in
RADOS beside them, and leases every host sharing the pool sees."""
