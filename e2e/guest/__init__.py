"""A QEMU guest with Debian's stock kernel, for the kernel features this machine lacks (IPVS, IPIP)."""
