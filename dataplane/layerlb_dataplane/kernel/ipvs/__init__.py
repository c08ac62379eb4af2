"""The IPVS kernel engine (`engine.IpvsEngine`), which forwards `nat`, `dsr` and `tunnel` Plans with IPVS.

Its parts, by feature:

- `engine`: the sync a runtime drives (desired state, the no-op fast path, node settings);
- `desired`: the table a Plan should give, from the render and the targets' health (pure);
- `diff`: the changes from the kernel's table to the desired one, and the drain of what leaves (pure);
- `table`: services, real servers and changes, in ipvsadm's spelling (pure);
- `kernel`: what the engine needs of the kernel (`IpvsKernel`) and the real one (`NetlinkIpvs`);
- `netlink`: IPVS's generic netlink family, packed and parsed with `struct`;
- `proc`: the kernel's listings in /proc/net/ip_vs and ip_vs_conn, parsed (pure);
- `vip`: the VIP as an address of the node (`VipAddresses`, `NodeVipAddresses`).
"""
