"""Ceph RBD pools serving the rbd backend: disks, clones of cached images, the records kept in
RADOS beside them, and leases every host sharing the pool sees.

pool.py is the driver (its face: observing, and each concern handed to its module, all
through cluster.py's one client); clone.py makes disks, cache.py the image cache's
entries, disks.py grows, deletes and renames images, images.py makes and removes plain
images, io.py reads and writes an image's raw bytes, copies.py keeps each image's record
copy, owner.py the pool's owner, migrate.py migrations, adopt.py adoption, monitors.py the
monitors a domain's rbd disk is given (reconcile disks), listing.py the pool's image names
kept between runs while the pool's directory is unchanged. records.py is
the RADOS record store's face (reads, compare-and-swap writes, hand-overs, its write order),
over layout.py (object names, the stored format), namespace.py (every RADOS call, errors
mapped once), index.py (each host's index shards), hosts.py (heartbeats, fencing),
claims.py (instance claims) and refs.py (a cache entry's references); leases.py holds the
locks every host sees, outage.py one deadline per step while the cluster does not answer."""
