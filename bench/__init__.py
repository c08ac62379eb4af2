"""The layerlb benchmark harness, so every claim about speed is measured in one run against HAProxy,
nginx and a direct connection on the same machine; `bench/run.py` (or `make bench`) is its entry point.
"""
