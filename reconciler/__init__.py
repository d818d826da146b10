"""A declarative reconciler for virtual-machine instance storage on libvirt pools."""

__version__ = "0.1.0"
