"""One real `layerlb serve` of an HTTPS LoadBalancer per test module (starting one takes seconds)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.security.served import Backend, ServedHttps


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedHttps]:
    backend = Backend()
    running = ServedHttps(tmp_path_factory.mktemp("served"), backend)
    try:
        yield running
    finally:
        running.stop()
        backend.close()
