"""The forwarding process: L7 and L4 userspace proxies, kernel engines, health checks, admin server."""
