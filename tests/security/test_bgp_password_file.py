"""The speaker writes BIRD's configuration, which holds the BGPPeers' TCP-MD5 passwords, readable by its
owner only (docs/security.md, "Secrets"). A stand-in `bird` opens the control socket and waits, so the
speaker's own write and start run for real without a routing daemon on the host's port 179."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from layerlb_speaker import bgp
from layerlb_speaker.bgp_announcer import BgpAnnouncer

from tests.speaker.test_bgp import VIPS, peer

FAKE_BIRD = """#!/bin/sh
# bird -f -c CONFIG -s SOCKET -P PIDFILE: open the "control socket" and stay up
while [ $# -gt 0 ]; do [ "$1" = "-s" ] && socket="$2"; shift; done
: > "$socket"
exec sleep 600
"""


def test_bird_conf_with_a_password_is_owner_only(tmp_path: Path) -> None:
    bird = tmp_path / "bird"
    bird.write_text(FAKE_BIRD)
    bird.chmod(0o755)
    directory = tmp_path / "bgp"
    directory.mkdir()
    (directory / "bird.tmp").write_text("left by an older speaker")
    (directory / "bird.tmp").chmod(0o644)
    intent = bgp.Intent((peer(password="s3cret"),), (bgp.Advertisement("all"),))
    desired = bgp.desired(intent, "node1", "10.0.60.1", VIPS)
    announcer = BgpAnnouncer("node1", directory, bird_binary=str(bird))

    async def apply() -> None:
        try:
            await announcer.apply(desired)
        finally:
            process = announcer._process
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()

    asyncio.run(apply())
    config = directory / "bird.conf"
    assert 's3cret"' in config.read_text()  # the password is there: the mode is what protects it
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
