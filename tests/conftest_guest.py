"""The test guest's image, for tests that boot a guest (tests/guest.py).

Built once per session by scripts/guest.sh into the checkout's .run/guest, where it stays
cached across sessions (the script rebuilds only when it changed; `make clean` removes it).
"""

from __future__ import annotations

import pytest

from tests.guest import CACHE, GuestImage, build_guest_image


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest image: its path (never boot it in place: copy it), size and sha256."""
    return build_guest_image(CACHE)
