"""kopf's session: the operator's credentials, with a bounded connection pool (see login.py for why)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from kubernetes.config import kube_config
from layerlb_operator import login


def test_the_pool_leaves_room_for_every_watch_stream_per_namespace() -> None:
    assert login.connection_limit([]) == login.WATCH_STREAMS_PER_NAMESPACE + login.REQUEST_CONNECTIONS
    three = login.connection_limit(["a", "b", "c"])
    assert three == 3 * login.WATCH_STREAMS_PER_NAMESPACE + login.REQUEST_CONNECTIONS


def test_login_gives_kopf_a_session_with_the_kubeconfig_credentials_and_a_bounded_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": "u", "user": {"token": "s3cret"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    # The kubernetes client reads $KUBECONFIG once, at import.
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    async def log_in() -> Any:
        context = await login.session_login(7)(
            logger=logging.getLogger("test"), settings=kopf.OperatorSettings()
        )
        try:
            connector = context.aiohttp_session.connector
            return context, connector.limit, dict(context.aiohttp_session.headers)
        finally:
            await context.aiohttp_session.close()

    context, limit, headers = asyncio.run(log_in())
    assert isinstance(context, kopf.AiohttpSession)
    assert context.server == "https://127.0.0.1:6443"
    assert limit == 7
    assert headers["Authorization"] == "Bearer s3cret"
