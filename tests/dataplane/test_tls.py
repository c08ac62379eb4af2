"""TLS termination, checked with real handshakes on loopback so that SNI, versions and ALPN are OpenSSL's own.

Certificates are self-signed, made with the `openssl` CLI; the client trusts all of them and reads the
served certificate's subject, which tells which one the server chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from layerlb_dataplane.net import tls

from layerlb import plan
from tests.dataplane.conftest import ServerThread
from tests.dataplane.helpers_runtime import make_certificate


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, plan.Certificate]:
    directory = tmp_path_factory.mktemp("certs")
    specs = {
        "default": ["default.example.org"],
        "exact": ["www.example.com"],
        "wild": ["*.example.com"],
        "other": ["api.example.net", "*.example.net"],
        "exact2": ["www.example.com"],
    }
    return {label: make_certificate(directory, label, names) for label, names in specs.items()}


@pytest.fixture(scope="module")
def cafile(certs: dict[str, plan.Certificate], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "all.pem"
    path.write_text("".join(c.cert_pem for c in certs.values()))
    return str(path)


class EchoServer(ServerThread):
    """An asyncio TLS echo server on its own thread, so the test thread can use blocking clients."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(self.handle, ssl=context)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
def serve() -> Iterator[Callable[[ssl.SSLContext], EchoServer]]:
    servers: list[EchoServer] = []

    def start(context: ssl.SSLContext) -> EchoServer:
        servers.append(EchoServer(context))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def client_context(cafile: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # unknown names must still complete, to see the default served
    context.load_verify_locations(cafile)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def connect(port: int, server_name: str | None, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return context.wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


def served(conn: ssl.SSLSocket) -> str:
    """The CN of the certificate the server presented."""
    peer = conn.getpeercert()
    assert peer
    for rdn in peer["subject"]:
        for attribute in rdn:
            if attribute[0] == "commonName":
                return str(attribute[1])
    raise AssertionError(peer)


def echo(conn: ssl.SSLSocket, text: bytes) -> bytes:
    conn.sendall(text + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    return data[:-1]


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        ("www.example.com", "exact"),  # exact beats the wildcard, and the first of two exact claims wins
        ("WWW.Example.COM.", "exact"),  # case and a trailing dot do not matter
        ("a.example.com", "wild"),
        ("a.b.example.com", "default"),  # a wildcard covers one label only
        ("example.com", "default"),
        ("api.example.net", "other"),
        ("x.example.net", "other"),
        ("unknown.test", "default"),
        (None, "default"),  # no SNI at all
    ],
)
def test_sni_selects_the_certificate(
    certs: dict[str, plan.Certificate],
    cafile: str,
    serve: Callable[[ssl.SSLContext], EchoServer],
    server_name: str | None,
    expected: str,
) -> None:
    order = ["default", "exact", "wild", "other", "exact2"]
    store = tls.CertificateStore([certs[label] for label in order])
    server = serve(store.context)
    with connect(server.port, server_name, client_context(cafile)) as conn:
        assert conn.server_hostname == server_name
        assert served(conn) == expected
        assert echo(conn, b"hello") == b"hello"


def test_alpn_and_protocol_version(
    certs: dict[str, plan.Certificate], cafile: str, serve: Callable[[ssl.SSLContext], EchoServer]
) -> None:
    server = serve(tls.CertificateStore([certs["default"]]).context)
    with connect(server.port, "default.example.org", client_context(cafile)) as conn:
        assert conn.selected_alpn_protocol() == "http/1.1"
        assert conn.version() in {"TLSv1.2", "TLSv1.3"}
    twelve = client_context(cafile)
    twelve.maximum_version = ssl.TLSVersion.TLSv1_2
    with connect(server.port, "default.example.org", twelve) as conn:
        assert conn.version() == "TLSv1.2"
        assert conn.selected_alpn_protocol() == "http/1.1"
        cipher = conn.cipher()
        assert cipher is not None and ("GCM" in cipher[0] or "CHACHA20" in cipher[0])


def old_client(cafile: str) -> ssl.SSLContext:
    """A client that offers TLS 1.1 at most (security level 0 so OpenSSL 3 lets it try at all)."""
    context = client_context(cafile)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_is_refused(
    certs: dict[str, plan.Certificate], cafile: str, serve: Callable[[ssl.SSLContext], EchoServer]
) -> None:
    # Control: the old client does complete a TLS 1.1 handshake with a server that allows it, so the
    # refusal below is the store's minimum version, not a client that cannot speak at all.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    tls.load_certificate(permissive, certs["default"])
    with connect(serve(permissive).port, "default.example.org", old_client(cafile)) as conn:
        assert conn.version() == "TLSv1.1"

    store = tls.CertificateStore([certs["default"]])
    assert store.context.minimum_version == ssl.TLSVersion.TLSv1_2
    server = serve(store.context)
    with pytest.raises(ssl.SSLError):
        connect(server.port, "default.example.org", old_client(cafile)).close()
    # The same handshake in memory shows the server's own reason: the protocol version.
    assert "UNSUPPORTED_PROTOCOL" in memory_handshake_error(store.context, old_client(cafile))


def memory_handshake_error(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> str:
    """The server side's error for a handshake run over memory BIOs (the network hides it behind an EOF)."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, to_server, server_hostname="default.example.org")
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        server_in.write(to_server.read())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as error:
            return str(error.reason)
        to_client.write(server_out.read())
    raise AssertionError("the handshake did not fail")


def test_update_switches_new_handshakes_and_keeps_existing_connections(
    certs: dict[str, plan.Certificate], cafile: str, serve: Callable[[ssl.SSLContext], EchoServer]
) -> None:
    store = tls.CertificateStore([certs["default"], certs["exact"]])
    listener_context = store.context
    server = serve(store.context)
    context = client_context(cafile)
    with connect(server.port, "www.example.com", context) as before:
        assert served(before) == "exact"
        store.update([certs["other"], certs["exact2"], certs["wild"]])
        assert store.context is listener_context  # the listener keeps its context
        with connect(server.port, "www.example.com", context) as after:
            assert served(after) == "exact2"
        with connect(server.port, "nothing.test", context) as after:
            assert served(after) == "other"  # the new default
        assert echo(before, b"still here") == b"still here"
        assert served(before) == "exact"


def test_update_with_a_broken_set_keeps_serving_the_old_one(
    certs: dict[str, plan.Certificate], cafile: str, serve: Callable[[ssl.SSLContext], EchoServer]
) -> None:
    store = tls.CertificateStore([certs["default"]])
    server = serve(store.context)
    broken = plan.Certificate(
        source="Secret/broken", cert_pem=certs["exact"].cert_pem, key_pem=certs["wild"].key_pem
    )
    with pytest.raises(tls.TLSConfigError, match="Secret/broken"):
        store.update([certs["exact"], broken])
    with pytest.raises(tls.TLSConfigError, match="at least one"):
        store.update([])
    with connect(server.port, "www.example.com", client_context(cafile)) as conn:
        assert served(conn) == "default"


def test_encrypted_keys_are_refused_without_prompting(
    certs: dict[str, plan.Certificate], tmp_path: Path
) -> None:
    key = tmp_path / "plain.key"
    key.write_text(certs["default"].key_pem)
    encrypted = subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    # A PKCS#8 header without the word ENCRYPTED would still reach OpenSSL: the password callback refuses.
    for key_pem in (encrypted, encrypted.replace("ENCRYPTED ", "")):
        cert = certs["default"].model_copy(update={"key_pem": key_pem})
        with pytest.raises(tls.TLSConfigError, match="test/default"):
            tls.CertificateStore([cert])


def test_pem_reaches_openssl_through_memory_or_a_private_directory(
    certs: dict[str, plan.Certificate],
) -> None:
    seen: list[tuple[str, int, int]] = []

    class Recording(ssl.SSLContext):
        def load_cert_chain(self, certfile: object, keyfile: object = None, password: object = None) -> None:
            for path in (str(certfile), str(keyfile)):
                seen.append(
                    (path, stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), os.stat(path).st_mode)
                )
            super().load_cert_chain(certfile, keyfile, password)  # type: ignore[arg-type]

    cert = certs["default"]
    with tls.memfd_paths(cert.cert_pem, cert.key_pem) as (cert_path, key_path):
        assert cert_path.startswith("/proc/self/fd/")
        assert Path(cert_path).read_text() == cert.cert_pem
        assert Path(key_path).read_text() == cert.key_pem
    with tls.tempdir_paths(cert.cert_pem, cert.key_pem) as (cert_path, key_path):
        context = Recording(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        directory = os.path.dirname(cert_path)
    assert not os.path.exists(directory)
    assert [(mode_dir, stat.S_IMODE(mode)) for _, mode_dir, mode in seen] == [(0o700, 0o600)] * 2
