"""The forwarding process: L7 and L4 userspace proxies, kernel engines, health checks, admin server.

Layers, top down. A package imports from the packages below it, never above; inside one, modules are
listed top down too. `make lint` checks this (the import contracts in pyproject.toml).

    control/   asyncio   the process: serve (the entry point) > workers > runtime > admin, probes,
                         kube_source > config (where Plans come from)
    http/      asyncio   the L7 proxy: proxy (HttpListener) > connection > exchange > listener > upstream
      h1/      sans-IO   strict HTTP/1.1 framing: request, response > framing
    l4/        asyncio   the TCP and UDP relay
    kernel/              IPVS and nftables engines: desired state applied to the kernel
    net/                 below the protocols: proxy_protocol (sans-IO), tls contexts, transparent sockets
    core/      sans-IO   affinity > state > balancing, routing > targets > health; metrics

`http/`, `l4/` and `kernel/` do not import each other. From the rest of layerlb the data plane reads the
Plan (`layerlb.plan`, `layerlb.api`, and `layerlb.plan_contract` for how it travels from the operator),
and the kernel engines `layerlb.render`'s rule renderers; never kopf, the operator, the speaker or the
YAML and validation front end (`layerlb serve` turns its YAML into Plans in `layerlb.cli`). Only
`control/` talks to Kubernetes.
"""
