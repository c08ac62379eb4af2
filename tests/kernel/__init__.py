"""Kernel engines (nftables, IPVS) tested with real packets."""
