"""What keeps the services' memory flat however large the campaign (issue 7, R33)."""

from __future__ import annotations

import platform

import pytest

from services.pipeline import faust_app
from services.pipeline.settings import Settings


def test_streams_buffer_and_polls_are_bounded() -> None:
    app = faust_app.create_app("sender", Settings())
    assert app.conf.stream_buffer_maxsize == faust_app.STREAM_BUFFER <= 1024
    assert app.conf.broker_max_poll_records == faust_app.MAX_POLL_RECORDS <= 1000


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_arenas_are_capped_on_glibc() -> None:
    assert faust_app.limit_malloc_arenas() is True  # mallopt accepted M_ARENA_MAX
