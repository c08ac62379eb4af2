# syntax=docker/dockerfile:1
# One image for the operator and the forwarding pods (`layerlb operator`, `layerlb dataplane`).
# The chart's Deployment passes `operator ...` as args; the operator gives the forwarding pods the
# command `layerlb dataplane ...`. Build: docker build -t ghcr.io/layerlb/layerlb:0.1.0 .
#
# Without Docker, e2e/images/build.py builds the same image (localhost/layerlb:dev, for the e2e
# nodes): a debootstrapped bookworm with the packages of images/layerlb-rootfs.sh, the same script's
# `venv` step with the project's wheel (dependencies pinned to the versions in the repository's .venv;
# here pip takes the newest that pyproject.toml allows), and the ENV, WORKDIR, USER, ENTRYPOINT and CMD
# read from the end of this file. Keep those literal (no `$VAR`) and in exec form: build.py refuses
# anything else.
FROM debian:bookworm-slim

# python3, python3-venv, iproute2, nftables, ipvsadm, ca-certificates (the script says why).
RUN --mount=type=bind,source=images/layerlb-rootfs.sh,target=/tmp/layerlb-rootfs.sh \
    sh /tmp/layerlb-rootfs.sh system

# layerlb and its dependencies into the virtual environment /opt/layerlb. The build context is mounted
# (writes discarded), so layerlb/templates, a symlink to the top-level templates/, resolves: the wheel
# carries the renderers' jinja2 files.
RUN --mount=type=bind,target=/src,rw \
    sh /src/images/layerlb-rootfs.sh venv /src

ENV PATH=/opt/layerlb/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /
# The UID the chart's podSecurityContext and the operator's non-root forwarding pods run as (the pods
# that program the kernel, nat, dsr and tunnel, run as root with NET_ADMIN).
USER 65532:65532
ENTRYPOINT ["layerlb"]
CMD ["--help"]
