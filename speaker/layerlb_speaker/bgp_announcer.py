"""The BIRD process this node's speaker drives: desired routes in, bird.conf reloaded, session states out.

One `bird` per speaker, in the foreground as its child (`bird -f`, its own config, control socket and pid
file under the speaker's runtime directory), started when the first session is wanted. Its parent-death
signal is SIGTERM, so a speaker that dies unannounced (SIGKILL, a crash) takes BIRD with it: BIRD closes
its sessions and the routers drop this node's routes at once, instead of a stale node advertising VIPs
nobody on it serves.

- `want(desired)`: the latest desired state; the loop renders it (`bird.render`), and when the text
  changed, writes bird.conf atomically (a temporary file renamed over it) and runs `birdc configure`, which
  swaps the whole configuration at once. Route changes send UPDATEs; sessions stay up.
- Every `poll` seconds (and after each reload) `birdc show protocols all` and `show bfd sessions` give each
  peer's state (`bird.sessions`); transitions are logged (`bgp peer tor1 10.0.60.254: Established (was
  Active)`, with BIRD's last error), written to `status.json` in the runtime directory for static mode
  and tests, and handed to `on_status` (the seam for the BGPPeers' `status.nodes[]` in Kubernetes).
- On stop (SIGTERM): withdraw first, then stop. bird.conf is reloaded with the same sessions and no
  routes, the speaker waits (at most `withdraw_wait` seconds) until BIRD reports nothing exported on any
  established session and gives the UPDATEs a moment to leave, then `birdc down` closes the sessions
  (Cease) and BIRD exits. The router thus withdraws this node's VIPs while the session is still up, and
  traffic moves to the other nodes before the process goes. On restart the routes are announced again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from layerlb_speaker import bgp, bird

log = logging.getLogger("layerlb.speaker")

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class BgpAnnouncer:
    """Drives one BIRD: `want` the desired state, `run` until stop (then withdraw and stop BIRD)."""

    def __init__(
        self,
        node: str,
        directory: str | os.PathLike[str],
        *,
        bird_binary: str = "bird",
        birdc_binary: str = "birdc",
        poll: float = 1.0,
        withdraw_wait: float = 3.0,
        on_status: Callable[[Mapping[str, bird.SessionState]], None] | None = None,
    ) -> None:
        self.node = node
        self.directory = Path(directory)
        self.config = self.directory / "bird.conf"
        self.socket = self.directory / "bird.ctl"
        self.bird_binary = bird_binary
        self.birdc_binary = birdc_binary
        self.poll = poll
        self.withdraw_wait = withdraw_wait
        self.on_status = on_status
        self.status: dict[str, bird.SessionState] = {}
        self._wanted: bgp.Desired | None = None
        self._applied: bgp.Desired | None = None
        self._text: str | None = None
        self._changed = asyncio.Event()
        self._process: asyncio.subprocess.Process | None = None

    def want(self, desired: bgp.Desired) -> None:
        """The state to reach; applied by the loop (the latest wins)."""
        self._wanted = desired
        self._changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Applies what is wanted and reads the sessions' states until `stop`; then withdraws and stops."""
        try:
            while not stop.is_set():
                if self._changed.is_set():
                    self._changed.clear()
                    await self._apply_wanted()
                await self._read_status()
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._changed.wait())]
                await asyncio.wait(waits, timeout=self.poll, return_when=asyncio.FIRST_COMPLETED)
                for each in waits:
                    each.cancel()
        finally:
            await self.shutdown()

    async def _apply_wanted(self) -> None:
        desired = self._wanted
        if desired is None:
            return
        try:
            await self.apply(desired)
        except Exception:  # BIRD refused or died: logged, retried on the next change or poll
            log.exception("bgp: applying the configuration failed")
            self._text = None
            self._changed.set()

    async def apply(self, desired: bgp.Desired) -> None:
        """Renders `desired`; when the text changed, writes it and reloads BIRD (started if needed)."""
        if not desired.sessions and self._process is None:
            self._applied = desired
            return
        text = bird.render(desired, self.node)
        if text == self._text and self._alive():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.config.with_suffix(".tmp")
        # Owner-only: the configuration carries the BGPPeers' TCP-MD5 passwords.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file left by an older speaker keeps its mode through O_CREAT
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, self.config)
        if not self._alive():
            await self._start()
        else:
            await self._birdc("configure", f'"{self.config}"')
        self._text = text
        before = self._applied.prefixes() if self._applied else set()
        after = desired.prefixes()
        self._applied = desired
        for prefix in sorted(after - before, key=str):
            log.info("bgp: announcing %s", prefix)
        for prefix in sorted(before - after, key=str):
            log.info("bgp: withdrawing %s", prefix)
        log.info(
            "bgp: %d prefixes to %d peers: %s",
            len(after),
            len(desired.sessions),
            ", ".join(f"{s.peer.name} {len(s.routes)}" for s in desired.sessions) or "-",
        )

    def _alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def _start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        argv = [self.bird_binary, "-f", "-c", str(self.config), "-s", str(self.socket)]
        argv += ["-P", str(self.directory / "bird.pid")]
        self._process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self._process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bird exited ({self._process.returncode}) or opened no control socket")
            await asyncio.sleep(0.02)
        log.info("bgp: bird started (pid %d, %s)", self._process.pid, self.config)

    async def _birdc(self, *command: str) -> str:
        process = await asyncio.create_subprocess_exec(
            self.birdc_binary,
            "-s",
            str(self.socket),
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RuntimeError(f"birdc {' '.join(command)}: no answer in 10 s") from None
        text = out.decode(errors="replace")
        refused = command[0] == "configure" and "Reconfigur" not in text  # "Reconfigured", "... in progress"
        if process.returncode != 0 or refused:
            raise RuntimeError(f"birdc {' '.join(command)}: {text.strip()}")
        return text

    async def _read_status(self) -> None:
        if not self._alive() or self._applied is None:
            return
        try:
            protocols = await self._birdc("show", "protocols", "all")
            bfd = await self._birdc("show", "bfd", "sessions") if "layerlb_bfd" in (self._text or "") else ""
        except Exception as error:  # a reload in progress, BIRD gone: the next poll tells
            log.debug("bgp: reading the sessions failed: %s", error)
            return
        now = bird.by_peer(self._applied, bird.sessions(protocols, bfd))
        for name, state in now.items():
            before = self.status.get(name)
            if before is None or before.state != state.state or before.bfd != state.bfd:
                address = next(str(s.peer.address) for s in self._applied.sessions if s.peer.name == name)
                log.info(
                    "bgp peer %s %s: %s%s%s%s",
                    name,
                    address,
                    state.state,
                    f" (was {before.state})" if before else "",
                    f", BFD {state.bfd}" if state.bfd else "",
                    f"; last error: {state.last_error}" if state.last_error else "",
                )
        if now != self.status:
            self.status = now
            self._write_status()
            if self.on_status is not None:
                self.on_status(now)

    def _write_status(self) -> None:
        document = {"peers": {name: state.as_status(self.node) for name, state in self.status.items()}}
        target = self.directory / "status.json"
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(document, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(temporary, target)

    async def shutdown(self) -> None:
        """Withdraws every route (the sessions stay up meanwhile), waits until BIRD has, then stops BIRD."""
        if not self._alive() or self._applied is None:
            return
        started = time.monotonic()
        try:
            await self.apply(self._applied.withdrawn())
            deadline = started + self.withdraw_wait
            while time.monotonic() < deadline:
                states = bird.sessions(await self._birdc("show", "protocols", "all"))
                if all(not s.prefixes_advertised for s in states.values()):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)  # the withdrawals are queued; let them leave before the Cease
            log.info("bgp: withdrew every route in %.3f s; stopping bird", time.monotonic() - started)
            await self._birdc("down")
        except Exception as error:
            log.error("bgp: withdrawing before exit failed (%s); stopping bird", error)
        assert self._process is not None
        try:
            await asyncio.wait_for(self._process.wait(), 5)
        except TimeoutError:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 2)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        log.info("bgp: bird stopped")
