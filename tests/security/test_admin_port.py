"""The admin port of a real `layerlb serve` with an HTTPS listener: what it shows and what it never shows
(docs/security.md, "The admin port")."""

from __future__ import annotations

import http.client
import json
import re

import pytest

from tests.security.served import ServedHttps, make_certificate, wait_until


def key_lines(key_pem: str) -> list[str]:
    """The base64 lines of a PEM private key: any one of them in a page is key material leaking."""
    return [line for line in key_pem.splitlines() if line and not line.startswith("-----")]


def assert_no_key_material(text: str, *keys: str) -> None:
    assert "PRIVATE KEY" not in text
    for key in keys:
        leaked = [line for line in key_lines(key) if line in text]
        assert not leaked, f"{len(leaked)} lines of a private key in the page"


def test_config_shows_the_certificate_and_no_private_key(served: ServedHttps) -> None:
    status, body = served.admin("/config")
    assert status == 200
    [served_plan] = json.loads(body)
    [certificate] = served_plan["listeners"][0]["certificates"]
    assert certificate["key_pem"] == "REDACTED"
    assert certificate["cert_pem"].strip() == served.cert_pem.strip()  # the public part is there to read
    assert_no_key_material(body, served.key_pem)


def test_a_rotated_key_does_not_appear_either(served: ServedHttps) -> None:
    cert, key = make_certificate(served.folder, "admin-rotated")
    served.write(cert, key)

    def served_certificate() -> str:
        plans = json.loads(served.admin("/config")[1] or "[]")
        return str(plans[0]["listeners"][0]["certificates"][0]["cert_pem"]).strip() if plans else ""

    wait_until("the rotated certificate in /config", lambda: served_certificate() == cert.strip())
    served.cert_pem, served.key_pem = cert, key
    for path in ("/config", "/metrics", "/readyz", "/healthz", "/nothing"):
        assert_no_key_material(served.admin(path)[1], key)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/config", "/healthz", "/readyz", "/metrics"])
def test_the_admin_port_is_read_only(served: ServedHttps, method: str, path: str) -> None:
    """Nothing on the admin port changes the process: every other method is 405."""
    connection = http.client.HTTPConnection("127.0.0.1", served.admin_port, timeout=10)
    try:
        connection.request(method, path, body=b"{}")
        answer = connection.getresponse()
        assert answer.status == 405 and answer.read() == b"only GET and HEAD\n"
    finally:
        connection.close()
    assert served.admin("/readyz")[0] == 200


def test_metrics_name_the_loadbalancer_not_its_secrets(served: ServedHttps) -> None:
    status, text = served.admin("/metrics")
    assert status == 200 and 'loadbalancer="demo/shop-tls"' in text
    assert not re.search(r"secret|key_pem|tls\.key", text, flags=re.I)
