"""The L7 proxy: the asyncio connection, exchange and upstream code over the sans-IO HTTP/1 codec in `h1`."""
