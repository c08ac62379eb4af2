"""The userspace L4 proxy: TCP and UDP relayed over asyncio."""
