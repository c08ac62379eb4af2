"""The forwarding pod's Plan source: its ConfigMap, read and watched through the Kubernetes API.

Why the API and not the mounted volume: the kubelet refreshes ConfigMap volumes after a minute or more,
a watch delivers a change within milliseconds.

The contract with the operator (keys, values, the Secret reference) is `layerlb.plan_contract`'s; the
pod's side of it:
- ConfigMap NS/NAME holds the Plan JSON of one LoadBalancer; no Plan (`[]`) means "serve nothing and
  remove the kernel state" (the runtime does that when a Plan leaves its source). A ConfigMap that
  disappears, or one without a valid Plan, changes nothing: the last good Plans keep serving and the
  reason is logged.
- Each received Plan JSON is parsed first; the Secrets the Plans then name give their certificates'
  chains and keys (`kubernetes.io/tls` Secrets of the pod's namespace; the pod's Role may `get` exactly
  those). They are fetched before a Plan naming them is loaded and every `secret_poll` seconds after (a
  renewed certificate is served without a new Plan, on the same sockets); a Secret that cannot be read
  or turns invalid keeps the last good pair serving.
- The report goes to the ConfigMap the annotation names: the generation once that Plan is fully applied
  (kernel engines: after their sync succeeded), or `removed` once no Plan is. The pod's Role may patch
  that one object and nothing else, so a compromised data plane cannot touch pods or other ConfigMaps.
  The pod's warnings (what the node lacks though the pod serves, one a line: today strict ARP that could
  not be set, `kernel.strict_arp`) are written with the pod's first report (absent: null, which also
  drops one a restarted container left) and whenever they change; the operator turns them into a
  condition.

The kubernetes client blocks, so list and watch run in a daemon thread that hands every ConfigMap it
sees to the event loop with `call_soon_threadsafe`; reports are PATCHed from `asyncio.to_thread`. Neither
ever gives up: a watch that expires (410 Gone) relists at once, other failures retry with backoff.
The Role allows list/watch only by name, hence the `metadata.name` field selector on both.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

from layerlb import plan, plan_contract
from layerlb_dataplane.control import config

log = logging.getLogger("layerlb.source")

_UNSENT: Final = "\0unsent"  # no warnings reported yet by this process (not even "none")
WATCH_SECONDS: Final = 240  # the API server ends each watch after this; the next resumes where it ended
REQUEST_SECONDS: Final = 30.0
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 30.0
SECRET_POLL_SECONDS: Final = 10.0
_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a namespace name
_SUBDOMAIN: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # a ConfigMap name


class ApiFailure(Exception):
    """The API server refused a request or could not be reached; `status` is the HTTP code (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status


class ConfigMapApi(Protocol):
    """The four requests the source makes; `KubeApi` sends them, tests fake them."""

    def list(self, namespace: str, name: str) -> tuple[dict[str, Any] | None, str]:
        """The ConfigMap (None when absent) and the list's resourceVersion to watch from."""
        ...

    def watch(
        self, namespace: str, name: str, version: str, seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event type, object) from `version` on, ending after about `seconds`; ERROR events raise `ApiFailure`."""
        ...

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        """JSON merge-patch a ConfigMap."""
        ...

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Secret (None when absent)."""
        ...


def api_client() -> Any:
    """A kubernetes `ApiClient`: the pod's ServiceAccount when KUBERNETES_SERVICE_HOST is set (token and CA
    from /var/run/secrets/kubernetes.io/serviceaccount, the token re-read as the kubelet rotates it), else
    the current kubeconfig. Raises OSError with one readable line when neither can be loaded."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    loaders: Any = k8s_config  # the kubernetes package ships no types for its config loaders
    configuration = k8s.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            loaders.load_incluster_config(client_configuration=configuration)
        else:
            loaders.load_kube_config(client_configuration=configuration)
    except (loaders.ConfigException, OSError, ValueError) as error:
        raise OSError(f"no Kubernetes credentials (in-cluster or kubeconfig): {error}") from None
    return k8s.ApiClient(configuration)


class KubeApi:
    """`ConfigMapApi` over the kubernetes client's `ApiClient`, JSON in and out (no model classes)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def _send(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        body: Any = None,
        timeout: float | tuple[float, float] = REQUEST_SECONDS,
        content_type: str = "application/json",
    ) -> Any:
        from kubernetes.client import ApiException

        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            method, url, headers, body, _ = self.client.param_serialize(
                method,
                path,
                query_params=query,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self.client.call_api(
                method, url, header_params=headers, body=body, _request_timeout=timeout
            )
        except ApiException as error:
            raise ApiFailure(int(error.status or 0), str(error.reason)) from None
        except Exception as error:  # refused, TLS, timeouts: all mean "try again later" here
            raise ApiFailure(0, f"{type(error).__name__}: {error}") from None
        if not 200 <= response.status < 300:
            text = (response.read() or b"").decode("utf-8", "replace")
            try:
                message = str(json.loads(text).get("message") or text)
            except (ValueError, AttributeError):
                message = text or str(response.reason)
            raise ApiFailure(response.status, message)
        return response

    @staticmethod
    def _path(namespace: str, name: str | None = None) -> str:
        return f"/api/v1/namespaces/{namespace}/configmaps" + (f"/{name}" if name else "")

    def list(self, namespace: str, name: str) -> tuple[dict[str, Any] | None, str]:
        response = self._send("GET", self._path(namespace), [("fieldSelector", f"metadata.name={name}")])
        answer = json.loads(response.read() or b"{}")
        items = answer.get("items") or []
        return (items[0] if items else None), str((answer.get("metadata") or {}).get("resourceVersion", ""))

    def watch(
        self, namespace: str, name: str, version: str, seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        query = [
            ("fieldSelector", f"metadata.name={name}"),
            ("watch", "true"),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(seconds)),
        ]
        response = self._send(
            "GET", self._path(namespace), query, timeout=(REQUEST_SECONDS, seconds + REQUEST_SECONDS)
        )
        stream = response.response
        try:
            pending = b""
            for chunk in stream.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _event(line)
        except ApiFailure:
            raise
        except Exception as error:  # the connection broke mid-stream
            raise ApiFailure(0, f"{type(error).__name__}: {error}") from None
        finally:  # closed, not pooled: a watch left mid-stream must not hand its socket to the next request
            stream.close()
            stream.release_conn()

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            response = self._send("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}", [])
        except ApiFailure as error:
            if error.status == 404:
                return None
            raise
        found: dict[str, Any] = json.loads(response.read() or b"{}")
        return found

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self._send(
            "PATCH", self._path(namespace, name), [], body, content_type="application/merge-patch+json"
        ).read()


def _event(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        event = json.loads(line)
        kind, obj = str(event["type"]), event["object"]
    except (ValueError, KeyError, TypeError):
        raise ApiFailure(0, f"unreadable watch event: {line[:200]!r}") from None
    if kind == "ERROR":
        raise ApiFailure(int(obj.get("code") or 0), str(obj.get("message") or obj))
    return kind, obj


class ConfigMapSource(config.PlanSource):
    """Plans from the ConfigMap `namespace/name`, watched; what is served is reported for pod `pod`."""

    def __init__(
        self,
        namespace: str,
        name: str,
        api: ConfigMapApi,
        pod: str | None,
        secret_poll: float = SECRET_POLL_SECONDS,
    ) -> None:
        self.namespace, self.name, self.api, self.pod = namespace, name, api, pod
        self.secret_poll = secret_poll
        self.pairs: dict[str, tuple[str, str]] = {}  # Secret name -> (tls.crt, tls.key), last good
        self.wanted: set[str] = set()  # the Secrets the received Plans take keys from
        self.fetch = asyncio.Event()  # fetch the Secrets now (the Plans changed)
        self.description = f"ConfigMap {namespace}/{name}"
        self.where = f"{self.description}: {plan_contract.PLAN_KEY}"
        self.text: str | None = None  # the Plan JSON as last received
        self.stored: list[plan.Plan] = []  # the Plans of `text`, keys left out
        self.problems: list[str] = []  # why `text` holds no valid Plans (empty: it does)
        self.target: str | None = None  # the ConfigMap to report to
        self.loaded: list[plan.Plan] | None = None  # what load() last returned
        self.report: str | None = None  # what should be reported now
        self.reported: tuple[str, str] | None = None  # (target, value) last reported
        self.warnings: str | None = None  # what should be reported as warnings now (None: none)
        self.reported_warnings: str | None = _UNSENT  # the warnings last reported (to the same target)
        self.event = asyncio.Event()  # new Plans since load()
        self.valid = asyncio.Event()  # valid Plans were received, with their keys (start() waits for it)
        self.reporting = asyncio.Event()  # the report (or its target) changed
        self.closed = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.thread: threading.Thread | None = None

    # --- PlanSource ------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.thread is None:
            self.loop = asyncio.get_running_loop()
            self.thread = threading.Thread(target=self._watch, name=f"watch {self.description}", daemon=True)
            self.thread.start()
            self.tasks.append(asyncio.create_task(self._report()))
            self.tasks.append(asyncio.create_task(self._poll_secrets()))
        await self.valid.wait()

    def load(self) -> list[plan.Plan]:
        self.event.clear()
        self.loaded = self._plans()
        return self.loaded

    async def changed(self) -> None:
        await self.event.wait()

    def applied(self, serving: Mapping[str, int], warnings: Sequence[str] = ()) -> None:
        text = "\n".join(warnings) or None
        if text != self.warnings:
            self.warnings = text
            self.reporting.set()
        if self.loaded is None:
            return
        if not self.loaded:
            value = None if serving else plan_contract.REMOVED
        elif all(serving.get(p.key) == p.generation for p in self.loaded):
            value = str(min(p.generation for p in self.loaded))
        else:
            value = None  # not (fully) applied: the last report stays true, as the previous Plan serves
        if value is not None and value != self.report:
            self.report = value
            self.reporting.set()

    def close(self) -> None:
        """Stop watching and reporting (the thread ends at its next event or timeout)."""
        self.closed.set()
        for task in self.tasks:
            task.cancel()

    # --- the watch thread ------------------------------------------------------------------------------

    def _watch(self) -> None:
        delay = BACKOFF_FIRST
        version: str | None = None
        while not self.closed.is_set():
            try:
                if version is None:
                    obj, version = self.api.list(self.namespace, self.name)
                    self._hand(obj)
                for kind, obj in self.api.watch(self.namespace, self.name, version, WATCH_SECONDS):
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind in ("ADDED", "MODIFIED"):
                        self._hand(obj)
                    elif kind == "DELETED":
                        self._hand(None)
                    if self.closed.is_set():
                        return
                delay = BACKOFF_FIRST
            except ApiFailure as error:
                if error.status == 410:  # the watch expired: list again for a fresh resourceVersion
                    log.info("%s: watch expired (410 Gone), listing again", self.description)
                    version = None
                    continue
                log.warning(
                    "%s: %s; retrying in %.1f s, the current Plans keep serving",
                    self.description,
                    _why(error),
                    delay,
                )
                self.closed.wait(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX)
            except Exception:  # a bug must not end the watch: the pod would serve stale Plans forever
                log.exception("%s: watch failed; retrying in %.1f s", self.description, delay)
                self.closed.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def _hand(self, obj: dict[str, Any] | None) -> None:
        """Give the loop what the thread saw (the loop may be closing: then stop)."""
        assert self.loop is not None
        try:
            self.loop.call_soon_threadsafe(self._received, obj)
        except RuntimeError:
            self.closed.set()

    # --- on the event loop -------------------------------------------------------------------------------

    def _received(self, obj: dict[str, Any] | None) -> None:
        if obj is None:
            log.warning("%s does not exist (yet); the current Plans keep serving", self.description)
            return
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        target = annotations.get(plan_contract.SERVING_ANNOTATION)
        if target != self.target:
            self.target = target
            self.reporting.set()
        text = (obj.get("data") or {}).get(plan_contract.PLAN_KEY)
        if text is None:
            log.error(
                "%s has no key %s; the current Plans keep serving", self.description, plan_contract.PLAN_KEY
            )
            return
        if text == self.text:
            return  # labels, annotations or other keys changed: nothing to reload
        self.text = text
        self.stored, self.wanted, self.problems = _parsed(self.where, text)
        if self.wanted:
            self.fetch.set()  # the Secrets first (a renewed chain comes with its key), then the reload
            return
        self._ready()

    def _ready(self) -> None:
        """The Plans, with the keys they need, are here: reload (and let start() return once they are valid)."""
        if not self.valid.is_set():
            try:
                self._plans()
            except config.InvalidConfig as error:
                log.error("%s: no valid Plan yet, waiting for one:", self.description)
                for line in error.lines:
                    log.error("  %s", line)
                return
            self.valid.set()
        self.event.set()

    def _plans(self) -> list[plan.Plan]:
        """The received Plans with each Secret certificate's chain and key filled in from the last good
        pair; InvalidConfig saying why they cannot be served (naming each Secret not read yet)."""
        if self.text is None:
            raise config.InvalidConfig([f"{self.where}: no Plan received yet"])
        if self.problems:
            raise config.InvalidConfig(self.problems)
        try:
            return [plan_contract.with_keys(p, self.pairs) for p in self.stored]
        except plan_contract.MissingSecret as missing:
            raise config.InvalidConfig(
                [
                    f"{self.description}: waiting for Secret {self.namespace}/{name} (tls.crt, tls.key)"
                    for name in missing.names
                ]
            ) from None

    async def _poll_secrets(self) -> None:
        """Reads the wanted Secrets when the Plans name new ones and every `secret_poll` seconds."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.fetch.wait(), self.secret_poll)
            requested = self.fetch.is_set()
            self.fetch.clear()
            changed = False
            for name in sorted(self.wanted):
                pair = await self._read_secret(name)
                if pair is not None and pair != self.pairs.get(name):
                    self.pairs[name] = pair
                    changed = True
                    log.info("%s: Secret %s/%s read", self.description, self.namespace, name)
            if self.text is not None and (changed or requested) and self.wanted <= set(self.pairs):
                self._ready()

    async def _read_secret(self, name: str) -> tuple[str, str] | None:
        """(tls.crt, tls.key) of a Secret, or None (logged) when it cannot be read or is not TLS."""
        try:
            secret = await asyncio.to_thread(self.api.get_secret, self.namespace, name)
        except ApiFailure as error:
            log.warning(
                "%s: Secret %s/%s: %s; the last good key keeps serving",
                self.description,
                self.namespace,
                name,
                _why(error),
            )
            return None
        data = (secret or {}).get("data") or {}
        try:
            cert = base64.b64decode(str(data.get("tls.crt", ""))).decode()
            key = base64.b64decode(str(data.get("tls.key", ""))).decode()
        except ValueError:
            cert = key = ""
        if "BEGIN CERTIFICATE" not in cert or "PRIVATE KEY" not in key:
            why = "does not exist" if secret is None else "has no PEM tls.crt and tls.key"
            log.warning(
                "%s: Secret %s/%s %s; the last good key keeps serving",
                self.description,
                self.namespace,
                name,
                why,
            )
            return None
        return cert, key

    async def _report(self) -> None:
        delay = BACKOFF_FIRST
        warned = False
        while True:
            await self.reporting.wait()
            self.reporting.clear()
            if self.report is None:
                continue
            if not self.pod or not self.target:
                if not warned:
                    warned = True
                    log.warning(
                        "%s: not reporting what is served (%s)",
                        self.description,
                        "POD_NAME is not set"
                        if not self.pod
                        else f"the ConfigMap has no {plan_contract.SERVING_ANNOTATION} annotation",
                    )
                continue
            wanted = (self.target, self.report)
            warnings = self.warnings
            if self.reported is None or self.reported[0] != wanted[0]:
                self.reported_warnings = _UNSENT
            if wanted == self.reported and warnings == self.reported_warnings:
                continue
            try:
                data: dict[str, str | None] = {self.pod: wanted[1]}
                if warnings != self.reported_warnings:
                    data[self.pod + plan_contract.WARNINGS_SUFFIX] = warnings
                body = {"data": data}
                await asyncio.to_thread(self.api.patch, self.namespace, wanted[0], body)
            except ApiFailure as error:
                log.warning(
                    "reporting to ConfigMap %s/%s failed: %s; retrying in %.1f s",
                    self.namespace,
                    wanted[0],
                    _why(error),
                    delay,
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX)
                self.reporting.set()
                continue
            delay = BACKOFF_FIRST
            self.reported = wanted
            self.reported_warnings = warnings
            log.info("reported serving %s to ConfigMap %s/%s", wanted[1], self.namespace, wanted[0])


def _parsed(where: str, text: str) -> tuple[list[plan.Plan], set[str], list[str]]:
    """The Plans of a Plan JSON text as stored (keys left out), the Secrets they take keys from, and why
    they cannot be served (nothing, or no Plans and no Secrets)."""
    try:
        stored = config.parse_plans(where, text, allow_empty=True)
    except config.InvalidConfig as error:
        return [], set(), error.lines
    wanted: set[str] = set()
    problems: list[str] = []
    for p in stored:
        try:
            wanted |= plan_contract.secrets_named(p)
        except ValueError as error:  # a malformed Secret reference
            problems.append(f"{where}: Plan/{p.key}: {error}")
    return ([], set(), problems) if problems else (stored, wanted, [])


def _why(error: ApiFailure) -> str:
    if error.status in (401, 403):
        return f"the API server refused the ServiceAccount ({error})"
    if error.status == 0:
        return f"the API server cannot be reached ({error})"
    return str(error)


def parse_reference(text: str) -> tuple[str, str]:
    """`NAMESPACE/NAME` of `--plan-configmap`; ValueError with the reason when it is not one."""
    namespace, slash, name = text.partition("/")
    if not slash or "/" in name:
        raise ValueError(f"{text!r} is not NAMESPACE/NAME")
    if not _LABEL.match(namespace) or len(namespace) > 63:
        raise ValueError(f"{namespace!r} is not a namespace name")
    if not _SUBDOMAIN.match(name) or len(name) > 253:
        raise ValueError(f"{name!r} is not a ConfigMap name")
    return namespace, name
