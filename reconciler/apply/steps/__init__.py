"""One module per kind of step: create, resize, delete, migrate, ownership.

Each opens with the order in which it creates and removes things and the crash windows
between them, and does its own checks under the lock."""
