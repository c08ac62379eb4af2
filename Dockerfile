# One image for the operator and the forwarding pods (`layerlb operator`, `layerlb dataplane`).
# The chart's Deployment passes `operator ...` as args; the operator gives the forwarding pods the
# command `layerlb dataplane ...`. Build: docker build -t ghcr.io/layerlb/layerlb:0.1.0 .
# (Not built by the tests: this machine has no container runtime. `pip wheel .` over the same files was
# checked to hold every package, the jinja2 templates and the `layerlb` entry point.)
FROM python:3.12-slim-bookworm

# The kernel architectures (nat, dsr, tunnel) program IPVS and nftables, the transparent proxy routes
# with `ip`; the pods that do so run as root with NET_ADMIN, everything else as the non-root user below.
# The IPVS engine speaks netlink itself; ipvsadm is there for people inspecting a node (`ipvsadm -Ln`).
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 nftables ipvsadm \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY layerlb ./layerlb
# layerlb/templates is a symlink to the top-level templates/ (the renderers' jinja2 files): copy both.
COPY templates ./templates
COPY operator ./operator
COPY dataplane ./dataplane
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /
# The UID the chart's podSecurityContext and the operator's non-root forwarding pods run as.
USER 65532:65532
ENTRYPOINT ["layerlb"]
CMD ["--help"]
