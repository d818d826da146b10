"""Bringing images from outside into a pool's cache: fetch (a location read under one
deadline, retried while another try may help), check (the bytes against the catalogue's
sha256, size and format, qemu-img under limits), images (one streamed into the other and
written sparse), headers (read only to warn)."""
