"""Flows written once for every backend: making and using a cache entry, taking a file into
a pool, raw and sparse copies between volumes, and qemu-img command lines built in one place."""
