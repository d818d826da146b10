"""Bringing images from outside into a pool's cache: fetch under deadlines and size caps,
check the bytes against the catalogue's sha256 and format, and read headers only to warn."""
