"""Strict HTTP/1.1 framing, sans-IO: bytes in, requests and responses out, nothing unparsed forwarded."""
