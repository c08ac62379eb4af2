"""The IPVS kernel engine (`engine.IpvsEngine`), which forwards `nat`, `dsr` and `tunnel` Plans with IPVS.

Its parts, by feature: `engine` (the sync a runtime drives) and `netlink` (IPVS's generic netlink
family, packed and parsed with `struct`).
"""
