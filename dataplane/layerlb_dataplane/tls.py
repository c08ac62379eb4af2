"""TLS termination: server contexts from the Plan's certificates, chosen by SNI.

STUB to be completed (issue 3 item 7). The signatures are the contract the runtime relies on.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from layerlb import plan


class CertificateStore:
    """One listener's certificates; `context` is handed to the server once, `update` swaps certificates
    in place on reload (the SNI callback reads the current set), so the listener never closes."""

    def __init__(self, certificates: Sequence[plan.Certificate]) -> None:
        raise NotImplementedError

    @property
    def context(self) -> ssl.SSLContext:
        raise NotImplementedError

    def update(self, certificates: Sequence[plan.Certificate]) -> None:
        raise NotImplementedError
