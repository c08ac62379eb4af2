"""TLS defaults of an HTTPS listener, tried with real clients (`openssl s_client`, `curl`) against a real
`layerlb serve`: the claims of docs/security.md's "TLS defaults".

Old protocol versions are offered with the client's own security level lowered (`@SECLEVEL=0`), so a
refusal is the server's doing and not the local OpenSSL's policy.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.security.served import SERVER_NAME, VIP, ServedHttps, make_certificate, wait_until

REQUEST = f"GET / HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n"


def s_client(served: ServedHttps, *args: str) -> str:
    """What `openssl s_client` prints for one connection that sends a GET and reads until the server closes
    (so TLS 1.3 session tickets, sent after the handshake, have arrived by then)."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"{VIP}:{served.port}", "-servername", SERVER_NAME, "-ign_eof",
         *args],
        input=REQUEST, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return done.stdout + done.stderr


def negotiated(output: str) -> tuple[str, str] | None:
    """(protocol, cipher) of a completed handshake, None for a refused one."""
    found = re.search(r"^(?:New|Reused), (TLSv[\d.]+), Cipher is (\S+)", output, flags=re.M)
    return (found.group(1), found.group(2)) if found else None


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_tls_1_0_and_1_1_are_refused(served: ServedHttps, version: str) -> None:
    output = s_client(served, version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert negotiated(output) is None, output
    assert "HTTP/1.1 200" not in output


@pytest.mark.parametrize(("version", "name"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_tls_1_2_and_1_3_are_accepted_and_served(served: ServedHttps, version: str, name: str) -> None:
    output = s_client(served, version)
    found = negotiated(output)
    assert found is not None and found[0] == name, output
    assert "HTTP/1.1 200 OK" in output and re.search(r"^ok", output, flags=re.M), output


def curl(served: ServedHttps, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sk", "--max-time", "30", "--resolve", f"{SERVER_NAME}:{served.port}:{VIP}",
         f"https://{SERVER_NAME}:{served.port}/", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_curl_gets_through_on_1_2_and_1_3_and_not_below(served: ServedHttps) -> None:
    assert curl(served, "--tlsv1.2", "--tls-max", "1.2").stdout == "ok"
    assert curl(served, "--tlsv1.3").stdout == "ok"
    old = curl(served, "--tlsv1.0", "--tls-max", "1.1", "--ciphers", "DEFAULT@SECLEVEL=0")
    assert old.returncode == 35 and old.stdout == "", old  # 35: the TLS handshake failed


@pytest.mark.parametrize(
    "cipher",
    [
        "AES128-SHA",  # RSA key exchange (no forward secrecy), CBC
        "AES256-GCM-SHA384",  # RSA key exchange, AEAD
        "ECDHE-RSA-AES128-SHA",  # forward secret, but CBC with SHA-1
        "ECDHE-RSA-AES256-SHA384",  # CBC
        "ECDHE-RSA-DES-CBC3-SHA",  # 3DES (Sweet32)
    ],
)
def test_tls_1_2_refuses_suites_without_forward_secrecy_or_aead(served: ServedHttps, cipher: str) -> None:
    output = s_client(served, "-tls1_2", "-cipher", f"{cipher}@SECLEVEL=0")
    assert negotiated(output) is None, output


@pytest.mark.parametrize(
    "cipher", ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"]
)
def test_tls_1_2_takes_the_ecdhe_aead_suites(served: ServedHttps, cipher: str) -> None:
    assert negotiated(s_client(served, "-tls1_2", "-cipher", cipher)) == ("TLSv1.2", cipher)


@pytest.mark.parametrize(("group", "shown"), [("X25519", "X25519"), ("P-256", "prime256v1")])
def test_x25519_and_p256_key_exchange(served: ServedHttps, group: str, shown: str) -> None:
    output = s_client(served, "-tls1_3", "-groups", group)
    assert negotiated(output) is not None, output
    assert re.search(rf"^Server Temp Key: (ECDH, )?{shown}", output, flags=re.M), output


def test_a_default_client_needs_no_hello_retry(served: ServedHttps) -> None:
    """OpenSSL's client (like curl and browsers) sends an X25519 key share: one ServerHello, no retry."""
    output = s_client(served, "-tls1_3", "-msg")
    assert negotiated(output) is not None, output
    assert output.count("ServerHello") == 1, output


def test_no_session_tickets_in_tls_1_2_yet_sessions_resume(served: ServedHttps, tmp_path: Path) -> None:
    """No stateless ticket (its key could never rotate); the server's session cache resumes instead."""
    session = tmp_path / "tls12.session"
    first = s_client(served, "-tls1_2", "-sess_out", str(session))
    assert negotiated(first) is not None, first
    assert "TLS session ticket:" not in first, first
    again = s_client(served, "-tls1_2", "-sess_in", str(session))
    assert again.startswith("Reused") or "\nReused, TLSv1.2" in again, again


def test_tls_1_3_sessions_resume(served: ServedHttps, tmp_path: Path) -> None:
    session = tmp_path / "tls13.session"
    assert negotiated(s_client(served, "-tls1_3", "-sess_out", str(session))) is not None
    again = s_client(served, "-tls1_3", "-sess_in", str(session))
    assert "\nReused, TLSv1.3" in again, again


def test_a_rotated_certificate_reaches_new_handshakes(served: ServedHttps) -> None:
    """Writing a new certificate into the Secret is a reload: new handshakes get it, without a restart."""

    def serial(output: str) -> str:
        assert "-----BEGIN CERTIFICATE-----" in output, output
        pem = output[
            output.index("-----BEGIN CERTIFICATE-----") : output.index("-----END CERTIFICATE-----") + 25
        ]
        done = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256"],
            input=pem,
            capture_output=True,
            text=True,
        )
        return done.stdout.strip()

    before = serial(s_client(served, "-tls1_3"))
    cert, key = make_certificate(served.folder, "rotated")
    expected = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256"], input=cert, capture_output=True, text=True
    ).stdout.strip()
    assert expected != before
    pid = served.process.pid
    served.write(cert, key)
    wait_until("the rotated certificate served", lambda: serial(s_client(served, "-tls1_3")) == expected)
    assert served.process.pid == pid and served.process.poll() is None
    served.cert_pem, served.key_pem = cert, key


def test_client_initiated_renegotiation_is_refused(served: ServedHttps) -> None:
    """A renegotiation is a full handshake the client can ask for at will on one connection (a CPU
    amplification), and the source of old attacks on TLS 1.2: refused with a `no_renegotiation` alert."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"{VIP}:{served.port}", "-servername", SERVER_NAME, "-tls1_2"],
        input="R\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert negotiated(output) is not None and "RENEGOTIATING" in output, output
    assert "no renegotiation" in output, output


def test_one_tls_1_3_session_ticket_per_connection(served: ServedHttps) -> None:
    """Each ticket is a session held in the listener's cache (tickets are stateful): one per connection."""
    output = s_client(served, "-tls1_3", "-msg")
    assert negotiated(output) is not None, output
    assert output.count("NewSessionTicket") == 1, output
