"""The sans-IO core: targets, balancing, health state, routing, affinity and metrics, as plain objects."""
