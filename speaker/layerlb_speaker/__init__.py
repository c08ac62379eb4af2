"""layerlb's speaker: makes every VIP attract its traffic on a LAN by answering ARP (IPv4) and NDP (IPv6).

One speaker runs on every node (a DaemonSet, host network). For each VIP exactly one node answers, the one
that `announcement.holder` picks among the nodes that can serve it and are alive; every speaker computes
the same answer from the same inputs, so they never negotiate. Layers, from pure to I/O:

- `announcement`: who announces which VIP (rendezvous hashing), a pure function;
- `framing`: ARP and NDP packets as bytes, parsed and built by hand (see its docstring for why);
- `membership`: which speakers are alive, from heartbeats, with an injected clock;
- `inventory`: Kubernetes objects → VIPs and their eligible nodes, a pure function;
- `config`: the static file form of the same inputs (how the network-namespace tests drive it);
- `heartbeat`, `responder`, `kube`, `runtime`: the thin asyncio shell (UDP, AF_PACKET, API watches).

The VIP is never added to an interface (as MetalLB does): the node's forwarding (kube-proxy, or the
kernel rules layerlb programs) catches packets for it once they arrive.
"""
