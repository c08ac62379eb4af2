"""The process around the proxies: Plan sources, the runtime, workers, health probes and the admin server."""
