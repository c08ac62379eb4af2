"""A BGPPeer's `Established` condition, from the sessions the speakers report in `status.nodes` (pure).

Each node whose speaker peers with the router owns one entry of `status.nodes` (server-side apply under its
own field manager, speaker/layerlb_speaker/bgp_status.py): its session's state, since when, the last error.
The operator turns them into one condition that `kubectl get bgppeer` (columns ESTABLISHED and, with `-o
wide`, SESSIONS) and `kubectl wait --for=condition=Established` read, as it does a VIPPool's
`InterfacesFound` (pool_status):

- True, reason `Established`, when every entry is Established: "3/3 nodes Established";
- False, reason `NotEstablished`, when some are not, naming them with their state and last error:
  "2/3 nodes Established; node-c: Active (Error: Hold timer expired)";
- False, reason `NoSessions`, when no speaker reports a session (no node selected, speakers without BGP).

The count is of the nodes that report: the speakers know which nodes a peer selects (their labels), the
operator does not watch Nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layerlb_operator import node_entries, status

ESTABLISHED = "Established"
NOT_ESTABLISHED = "NotEstablished"
NO_SESSIONS = "NoSessions"
MAX_NAMED = 5  # nodes named in the message; the rest are counted


def established(peer: Mapping[str, Any]) -> dict[str, Any]:
    """The peer's `Established` condition (without its transition time: `status.merge` adds it)."""
    generation = node_entries.generation(peer)
    entries = node_entries.entries(peer)
    if not entries:
        return status.condition(
            ESTABLISHED, False, NO_SESSIONS,
            "0/0 nodes Established: no speaker reports a session with this router (no node matches "
            "spec.nodeSelector, or the speakers run without BGP: chart value speaker.bgp.enabled)",
            generation,
        )  # fmt: skip
    down = [entry for entry in entries if entry.get("state") != ESTABLISHED]
    count = f"{len(entries) - len(down)}/{len(entries)} nodes Established"
    if not down:
        return status.condition(ESTABLISHED, True, ESTABLISHED, count, generation)
    named = []
    for entry in down[:MAX_NAMED]:
        error = f" ({entry['lastError']})" if entry.get("lastError") else ""
        named.append(f"{entry['node']}: {entry.get('state') or 'unknown'}{error}")
    more = f"; {len(down) - MAX_NAMED} more" if len(down) > MAX_NAMED else ""
    return status.condition(
        ESTABLISHED, False, NOT_ESTABLISHED, f"{count}; {'; '.join(named)}{more}", generation
    )


# The peer's condition as the reconciler writes it: computed, its transition time kept, compared, applied.
CONDITION = node_entries.Condition("BGPPeer", ESTABLISHED, established)
conditions = CONDITION.conditions
stale = CONDITION.stale
apply_body = CONDITION.apply_body
