"""The LoadBalancer derived from a Service that asks for one of layerlb's architectures — pure (no kopf, no
API server, no clock): the translation Service → LoadBalancer document, its refusals, and how the derived
LoadBalancer's own status reads on the Service.

The decisions, also in the README ("Services of type LoadBalancer"):

- **When.** A served Service with an address and the annotation `layerlb.dev/architecture: nat|dsr|tunnel|
  proxy` gets a LoadBalancer (layerlb.dev/v1alpha1) that layerlb's own forwarding runs; without the
  annotation (or with a value or a Service it cannot serve) there is none and the cluster's kube-proxy
  forwards the address (`ipMode: VIP`). So the derived LoadBalancer exists exactly while it can serve,
  and the address always has a forwarder: removing the annotation, a refusal, or the Service leaving the
  class or type deletes it (the operator's only `delete`, on LoadBalancers it controls).
- **Its name** is `svc-<service>` in the Service's namespace (shortened with a hash to a 63-character DNS
  label), unlikely to be a user's own; it carries the label `layerlb.dev/service=<service>` and a
  controller owner reference to the Service (`blockOwnerDeletion`), so the garbage collector deletes it
  with the Service. A LoadBalancer of that name that the Service does not control is the user's:
  `NameInUse`, never overwritten or deleted.
- **Its spec**: mode L4, the annotation's architecture, `vip` = the Service's address, one listener per
  Service port (TCP or UDP), one backend: the Service itself by name and port (resolved through its
  EndpointSlices, like any `backends[].service`), `replicas: 1`, round-robin, and the Service's
  `sessionAffinity: ClientIP` (with its timeout) when it has one. `engine` is left to the default (ipvs)
  unless the annotation `layerlb.dev/engine: ipvs|nftables` names one (kernel architectures only).
- **What it cannot serve is refused on the Service** (condition `layerlb.dev/ArchitectureAccepted`
  False, a Warning Event; the address stays and kube-proxy forwards it), with the field, the value and
  what would work:
  - `UnsupportedService`: more than one port (an L4 LoadBalancer sends every listener to its one
    backend, i.e. one Service port); protocol SCTP (layerlb forwards TCP and UDP); two addresses
    (a dual-stack Service: a LoadBalancer holds one VIP); for `dsr` and `tunnel` a `targetPort` other
    than the port, or a named one (they forward to the endpoint's port = the VIP's port: only the MAC
    or the outer header changes); `sessionAffinity: ClientIP` with engine nftables.
    `nat` may map the port (IPVS masquerading and nftables DNAT rewrite address and port, and the
    endpoints carry the target port from the EndpointSlices, named ports included), as may `proxy`.
  - `InvalidEngine`: an unknown engine, an engine with `proxy`, or nftables with `tunnel`.
  - `NameInUse`: see above.
- **Status on the Service**: `ipMode: Proxy` while its LoadBalancer is in place, for every architecture:
  layerlb forwards the address, so kube-proxy must neither program it on every node nor short-circuit it
  for in-cluster clients (it would take the packets to the endpoints itself, past the load balancer: for
  nat, dsr and tunnel its DNAT would run before layerlb's rules on the node). `VIP` whenever kube-proxy
  forwards. `ArchitectureAccepted` is True
  `LoadBalancerCreated` naming the LoadBalancer, or False with the LoadBalancer's own `Accepted` reason
  and message when it refuses; `layerlb.dev/LoadBalancerReady` copies its `Ready`.
- **The address is shared**, not in conflict: the derived LoadBalancer claims its Service's address in
  the VIP ledger, and each side ignores the other's claim (`vips.shared`, `sharing_owner`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from layerlb import api, validation
from layerlb.resolve import Unresolvable
from layerlb.validation import Problem
from layerlb_operator import objects, status, vips

ARCHITECTURE_ANNOTATION: Final = "layerlb.dev/architecture"
ENGINE_ANNOTATION: Final = "layerlb.dev/engine"
ARCHITECTURE_PATH: Final = f"metadata.annotations[{ARCHITECTURE_ANNOTATION}]"
ENGINE_PATH: Final = f"metadata.annotations[{ENGINE_ANNOTATION}]"
SERVICE_LABEL: Final = "layerlb.dev/service"
NAME_PREFIX: Final = "svc-"
ARCHITECTURES: Final = tuple(a.value for a in api.ARCHITECTURES[api.Mode.L4])
ENGINES: Final = tuple(e.value for e in api.Engine)
LOADBALANCER_READY: Final = "layerlb.dev/LoadBalancerReady"
CREATED: Final = "LoadBalancerCreated"
NAME_IN_USE: Final = "NameInUse"
UNSUPPORTED: Final = "UnsupportedService"
INVALID_ENGINE: Final = "InvalidEngine"
DELETING: Final = "LoadBalancerDeleting"
# dsr and tunnel leave the destination port alone: an endpoint is reached on the VIP's port.
FIXED_PORT: Final = ("dsr", "tunnel")
DEFAULT_AFFINITY_SECONDS: Final = 10800  # Kubernetes' default for sessionAffinityConfig.clientIP


def name_of(service: str) -> str:
    """The derived LoadBalancer's name: `svc-<service>`, shortened with a hash to a 63-character DNS label."""
    return objects.label_value(f"{NAME_PREFIX}{service}")


def key_of(namespace: str, service: str) -> str:
    """The derived LoadBalancer's `namespace/name`: its key in the index and its owner in the VIP ledger."""
    return f"{namespace}/{name_of(service)}"


def ip_mode(architecture: str | None) -> str:
    """`status.loadBalancer.ingress[].ipMode` for a Service forwarded by `architecture` (None: kube-proxy):
    `Proxy` keeps kube-proxy off an address layerlb's own forwarding serves."""
    return "VIP" if architecture is None else "Proxy"


def owner_reference(service: Mapping[str, Any]) -> dict[str, Any]:
    """The controller reference to the Service: the garbage collector deletes the LoadBalancer with it."""
    meta = service.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "name": str(meta.get("name")),
        "uid": str(meta.get("uid", "")),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _controller(loadbalancer: Mapping[str, Any]) -> Mapping[str, Any] | None:
    references = (loadbalancer.get("metadata") or {}).get("ownerReferences") or []
    return next((r for r in references if isinstance(r, dict) and r.get("controller")), None)


def controlled_by(loadbalancer: Mapping[str, Any], service: Mapping[str, Any]) -> bool:
    """Whether the LoadBalancer is this Service's derived one (its controller reference names the Service's uid)."""
    reference = _controller(loadbalancer) or {}
    uid = (service.get("metadata") or {}).get("uid")
    return (
        (reference.get("apiVersion"), reference.get("kind")) == ("v1", "Service")
        and bool(uid)
        and (reference.get("uid") == uid)
    )


def sharing_owner(loadbalancer: Mapping[str, Any]) -> str | None:
    """The VIP ledger owner (`Service namespace/name`) whose address this LoadBalancer may share: the
    Service controlling it, when the LoadBalancer bears that Service's derived name; else None."""
    reference = _controller(loadbalancer)
    meta = loadbalancer.get("metadata") or {}
    if reference is None or (reference.get("apiVersion"), reference.get("kind")) != ("v1", "Service"):
        return None
    service = str(reference.get("name"))
    if meta.get("name") != name_of(service):
        return None
    return f"{vips.SERVICE_OWNER}{meta.get('namespace') or 'default'}/{service}"


def _refuse(reason: str, path: str, message: str) -> Unresolvable:
    return Unresolvable(reason, [Problem(path, message)])


def _describe_port(port: Mapping[str, Any]) -> str:
    name = f"{port['name']} " if port.get("name") else ""
    return f"{name}{port.get('port')}/{port.get('protocol') or 'TCP'}"


def _engine(annotations: Mapping[str, Any], architecture: str) -> str | None:
    value = annotations.get(ENGINE_ANNOTATION)
    if value is None:
        return None
    if value not in ENGINES:
        raise _refuse(
            INVALID_ENGINE,
            ENGINE_PATH,
            f"{value!r} is not an engine; valid: {', '.join(ENGINES)} (or no annotation: ipvs)",
        )
    if architecture not in ("nat", "dsr", "tunnel"):
        raise _refuse(
            INVALID_ENGINE,
            ENGINE_PATH,
            f"{value!r} applies only to the kernel architectures nat, dsr and tunnel, not to {architecture} "
            "(layerlb's userspace relay); remove the annotation",
        )
    if value == "nftables" and architecture == "tunnel":
        raise _refuse(
            INVALID_ENGINE,
            ENGINE_PATH,
            "engine nftables cannot do architecture tunnel (IP-in-IP); use engine ipvs, or architecture nat or dsr",
        )
    return str(value)


def _port(spec: Mapping[str, Any], architecture: str) -> dict[str, Any]:
    ports = [p for p in spec.get("ports") or [] if isinstance(p, dict)]
    if len(ports) != 1:
        found = ", ".join(_describe_port(p) for p in ports) or "none"
        raise _refuse(
            UNSUPPORTED,
            "spec.ports",
            f"the Service has {len(ports)} ports ({found}), but a LoadBalancer derived for architecture "
            f"{architecture} must have exactly one: an L4 LoadBalancer sends every listener to its one backend "
            "(one Service port); make one Service per port, or remove the annotation "
            f"{ARCHITECTURE_ANNOTATION} (kube-proxy forwards every port)",
        )
    port = ports[0]
    protocol = str(port.get("protocol") or "TCP")
    if protocol not in ("TCP", "UDP"):
        raise _refuse(
            UNSUPPORTED,
            "spec.ports[0].protocol",
            f"{protocol} is not forwarded by layerlb (TCP and UDP are); remove the annotation "
            f"{ARCHITECTURE_ANNOTATION} to have kube-proxy forward it",
        )
    target = port.get("targetPort")
    if architecture in FIXED_PORT and target is not None and target != port.get("port"):
        number = port.get("port")
        what = "is a named port" if isinstance(target, str) else f"differs from port {number}"
        raise _refuse(
            UNSUPPORTED,
            "spec.ports[0].targetPort",
            f"{target!r} {what}, but architecture {architecture} cannot change the destination port (the "
            f"endpoints are reached on the VIP's port, {number}); set targetPort to {number}, or use "
            "architecture nat or proxy, which map ports",
        )
    return port


def _affinity(spec: Mapping[str, Any], engine: str | None) -> dict[str, Any] | None:
    if spec.get("sessionAffinity") != "ClientIP":
        return None
    if engine == "nftables":
        raise _refuse(
            UNSUPPORTED,
            "spec.sessionAffinity",
            "ClientIP cannot be kept by engine nftables (it balances by hashing, without timeouts); "
            f"use engine ipvs ({ENGINE_ANNOTATION}: ipvs), or sessionAffinity None",
        )
    config = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
    return {"type": "ClientIP", "timeoutSeconds": int(config or DEFAULT_AFFINITY_SECONDS)}


def translate(service: Mapping[str, Any], architecture: str, addresses: Sequence[str]) -> dict[str, Any]:
    """The derived LoadBalancer of a Service (its address(es) assigned); `Unresolvable` (UnsupportedService,
    InvalidEngine) saying why it cannot be one.

    Every field the API server would default is written out (replicas, algorithm), so the stored spec
    equals this one and an unchanged Service writes nothing (`up_to_date`)."""
    meta = service.get("metadata") or {}
    spec = service.get("spec") or {}
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
    annotations = meta.get("annotations") or {}
    engine = _engine(annotations, architecture)
    if len(addresses) != 1:
        raise _refuse(
            UNSUPPORTED,
            "spec.ipFamilyPolicy",
            f"the Service has {len(addresses)} addresses ({', '.join(addresses)}; spec.ipFamilyPolicy "
            f"{spec.get('ipFamilyPolicy') or 'SingleStack'}), but a LoadBalancer holds one VIP; make the "
            f"Service SingleStack, or remove the annotation {ARCHITECTURE_ANNOTATION}",
        )
    port = _port(spec, architecture)
    protocol = str(port.get("protocol") or "TCP")
    number = int(port["port"])
    lb_spec: dict[str, Any] = {"mode": "L4", "architecture": architecture}
    if engine is not None:
        lb_spec["engine"] = engine
    lb_spec.update(
        vip=addresses[0],
        replicas=1,
        listeners=[{"name": str(port.get("name") or f"{protocol.lower()}-{number}"), "port": number,
                    "protocol": protocol}],
        backends=[{"name": name, "service": {"name": name, "port": number}, "algorithm": "round-robin"}],
    )  # fmt: skip
    affinity = _affinity(spec, engine)
    if affinity is not None:
        lb_spec["sessionAffinity"] = affinity
    document = {
        "apiVersion": api.API_VERSION,
        "kind": "LoadBalancer",
        "metadata": {
            "name": name_of(name),
            "namespace": namespace,
            "labels": {SERVICE_LABEL: name, objects.MANAGED_BY_LABEL: "layerlb-operator"},
            "ownerReferences": [owner_reference(service)],
        },
        "spec": lb_spec,
    }
    try:  # the same validation as any LoadBalancer: a Service must never produce an invalid one
        validation.validate(document)
    except validation.Invalid as error:
        raise _refuse(
            UNSUPPORTED, ARCHITECTURE_PATH, f"the derived LoadBalancer would be invalid: {error}"
        ) from None
    return document


def _covers(stored: Any, desired: Any) -> bool:
    if isinstance(desired, dict):
        return isinstance(stored, dict) and all(_covers(stored.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(stored, list)
            and len(stored) == len(desired)
            and all(_covers(s, d) for s, d in zip(stored, desired, strict=True))
        )
    return bool(stored == desired)


def up_to_date(stored: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether the stored LoadBalancer already says what `desired` says (its spec has no field more, so a
    field the operator stopped setting is written away), its labels and owner references included."""
    stored_meta, desired_meta = stored.get("metadata") or {}, desired.get("metadata") or {}
    stored_spec = stored.get("spec") or {}
    return (
        set(stored_spec) <= set(desired["spec"])
        and _covers(stored_spec, desired["spec"])
        and _covers(stored_meta.get("labels") or {}, desired_meta.get("labels") or {})
        and _covers(stored_meta.get("ownerReferences") or [], desired_meta.get("ownerReferences") or [])
    )


def describe(document: Mapping[str, Any]) -> str:
    """`LoadBalancer shop/svc-web`."""
    meta = document.get("metadata") or {}
    return f"LoadBalancer {meta.get('namespace') or 'default'}/{meta.get('name')}"


def reflected(
    stored: Mapping[str, Any] | None, desired: Mapping[str, Any]
) -> tuple[bool, str, str, dict[str, Any] | None]:
    """How the derived LoadBalancer reads on the Service: (accepted, reason, message) of
    `ArchitectureAccepted`, and its `Ready` as `layerlb.dev/LoadBalancerReady` (None while it has none).

    `stored` is the LoadBalancer as watched (None: just created, its status not seen yet)."""
    spec = desired["spec"]
    what = f"{describe(desired)} (L4 {spec['architecture']}, VIP {spec['vip']})"
    conditions = ((stored or {}).get("status") or {}).get("conditions") or []
    accepted = next((c for c in conditions if c.get("type") == status.ACCEPTED), None)
    if accepted is not None and accepted.get("status") == "False":
        message = f"{what} refused: {accepted.get('message', '')}"
        return False, str(accepted.get("reason") or "LoadBalancerRefused"), message, _ready(stored, what)
    message = f"{what} forwards the Service through layerlb's forwarding pods (ipMode {ip_mode(spec['architecture'])})"
    return True, CREATED, message, _ready(stored, what)


def _ready(stored: Mapping[str, Any] | None, what: str) -> dict[str, Any] | None:
    conditions = ((stored or {}).get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == status.READY), None)
    if ready is None:
        return None
    return {
        "type": LOADBALANCER_READY,
        "status": str(ready.get("status") or "Unknown"),
        "reason": str(ready.get("reason") or "Unknown"),
        "message": f"{what}: {ready.get('message', '')}",
    }
