"""TLS termination: server contexts from the Plan's certificates, chosen by SNI.

A listener is handed one `ssl.SSLContext` (`CertificateStore.context`) for its whole life. Its SNI callback
moves each new handshake onto a per-certificate context taken from the *current* mapping, so a reload
(`update`) changes the certificates served to new handshakes without closing the listener, and connections
already established keep the context they negotiated with.

Selection: an exact name over a wildcard (`*.example.com` matches exactly one label: `a.example.com`, not
`example.com` nor `a.b.example.com`) over the first certificate, which is the default (also for clients that
send no SNI). Among certificates claiming the same name, the earlier one wins.

PEM from the Plan reaches OpenSSL through anonymous memory files (`memfd_create`, read via
`/proc/self/fd/N`), so no key material ever touches a file system; where memfd is unavailable, a private
temporary directory (0700, files 0600) is used and removed right after loading.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from layerlb import plan

# Mozilla's "intermediate" profile for TLS 1.2 (forward secrecy and AEAD only); TLS 1.3 suites are
# OpenSSL's defaults. SECLEVEL=2 refuses keys under 2048-bit RSA / 224-bit EC and SHA-1 signatures.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:@SECLEVEL=2"
)
ALPN_PROTOCOLS = ("http/1.1",)


class TLSConfigError(ValueError):
    """A certificate the Plan carries cannot be served; the message names its source."""


def new_server_context() -> ssl.SSLContext:
    """A server context with layerlb's protocol settings, so every context a handshake may use agrees.

    The settings must be identical on the listener's context and on each per-certificate context: OpenSSL
    takes the protocol versions and cipher list from the first, but ALPN selection and session tickets from
    the context the SNI callback switched to.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    # No stateless session tickets: Python exposes no ticket-key callback, so a ticket key could never be
    # rotated and would decrypt every TLS 1.2 session of the process's life (Mozilla's "intermediate"
    # profile turns tickets off for that reason). Sessions still resume from the server's own cache
    # (TLS 1.2 session IDs, TLS 1.3 stateful tickets). The key-exchange groups are OpenSSL's defaults
    # (X25519 first, as HAProxy and Envoy): naming P-256 alone made every client that sends an X25519 key
    # share (curl, browsers) pay a HelloRetryRequest round trip, and X25519-only clients fail.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    # Stateful TLS 1.3 tickets live in the listener's session cache (OpenSSL keeps up to 20,480): one per
    # connection instead of OpenSSL's two halves what a flood of new connections can make it hold
    # (measured 2.7-2.9 KiB per new TLS 1.3 connection with two, 1.5-1.8 KiB with one).
    context.num_tickets = 1
    return context


def normalize_name(name: str) -> str:
    """The form names are compared in, so that SNI and the Plan's names meet: lower case, no trailing dot,
    IDNA A-labels (clients send A-labels)."""
    name = name.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return name
    return name


def load_certificate(context: ssl.SSLContext, certificate: plan.Certificate) -> None:
    """Loads a Plan certificate into `context`, because OpenSSL reads chains and keys from paths only."""
    if "ENCRYPTED" in certificate.key_pem:
        raise TLSConfigError(f"{certificate.source}: encrypted private keys are not supported")
    try:
        with _pem_paths(certificate.cert_pem, certificate.key_pem) as (cert_path, key_path):
            context.load_cert_chain(cert_path, key_path, password=_refuse_password)
    except TLSConfigError:
        raise
    except (OSError, ssl.SSLError, ValueError) as error:
        raise TLSConfigError(f"{certificate.source}: cannot load certificate and key: {error}") from error


def _refuse_password() -> bytes:
    """Never prompt on a terminal for a key's passphrase, which OpenSSL would do without a callback."""
    raise TLSConfigError("encrypted private keys are not supported")


def _memfd_usable() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


@contextlib.contextmanager
def _pem_paths(cert_pem: str, key_pem: str) -> Iterator[tuple[str, str]]:
    """Paths OpenSSL can read the PEM from, valid inside the block only."""
    if _memfd_usable():
        with memfd_paths(cert_pem, key_pem) as paths:
            yield paths
    else:
        with tempdir_paths(cert_pem, key_pem) as paths:
            yield paths


@contextlib.contextmanager
def memfd_paths(cert_pem: str, key_pem: str) -> Iterator[tuple[str, str]]:
    """Anonymous in-memory files, because nothing then exists to leak or clean up on a crash."""
    fds: list[int] = []
    try:
        for name, text in (("layerlb-cert", cert_pem), ("layerlb-key", key_pem)):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, text.encode())
        yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def tempdir_paths(cert_pem: str, key_pem: str) -> Iterator[tuple[str, str]]:
    """Files in a private directory (0700, files 0600), for systems without memfd; removed on exit."""
    with tempfile.TemporaryDirectory(prefix="layerlb-tls-") as directory:
        os.chmod(directory, 0o700)
        paths = []
        for name, text in (("cert.pem", cert_pem), ("key.pem", key_pem)):
            path = os.path.join(directory, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(text)
            paths.append(path)
        yield paths[0], paths[1]


@dataclass(frozen=True)
class _Selection:
    """One immutable certificate set: swapped whole by `update`, so a handshake never sees half of one."""

    default: ssl.SSLContext
    exact: Mapping[str, ssl.SSLContext]
    wildcard: Mapping[str, ssl.SSLContext]  # "example.com" for "*.example.com"

    def choose(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = normalize_name(server_name)
        found = self.exact.get(name)
        if found is not None:
            return found
        _, dot, parent = name.partition(".")
        if dot and parent:
            found = self.wildcard.get(parent)
            if found is not None:
                return found
        return self.default


def _build(certificates: Sequence[plan.Certificate]) -> _Selection:
    if not certificates:
        raise TLSConfigError("an HTTPS listener needs at least one certificate")
    contexts: list[ssl.SSLContext] = []
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    for certificate in certificates:
        context = new_server_context()
        load_certificate(context, certificate)
        contexts.append(context)
        for raw in certificate.names:
            name = normalize_name(raw)
            if name.startswith("*."):
                wildcard.setdefault(name[2:], context)
            elif name:
                exact.setdefault(name, context)
    return _Selection(default=contexts[0], exact=exact, wildcard=wildcard)


class CertificateStore:
    """One listener's certificates; `context` is handed to the server once, `update` swaps certificates
    in place on reload (the SNI callback reads the current set), so the listener never closes."""

    def __init__(self, certificates: Sequence[plan.Certificate]) -> None:
        self._selection = _build(certificates)
        self._context = new_server_context()
        # Loaded here too so that the listener's own context is never certificate-less; the callback
        # replaces it on every handshake anyway, including those without SNI.
        load_certificate(self._context, certificates[0])
        self._context.sni_callback = self._on_server_name

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    def update(self, certificates: Sequence[plan.Certificate]) -> None:
        """Serves `certificates` to new handshakes; a set that fails to load leaves the current one serving."""
        self._selection = _build(certificates)

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context a handshake naming `server_name` is served from (None: no SNI)."""
        return self._selection.choose(server_name)

    def _on_server_name(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        ssl_object.context = self._selection.choose(server_name)
