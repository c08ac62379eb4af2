"""The operator and the speaker agree on the speakers' Service conditions (the operator drops them on release
without importing the speaker: components meet only in the API)."""

from __future__ import annotations

from layerlb_operator import service_frontend
from layerlb_speaker import statuses


def test_the_operator_knows_the_speakers_condition_types() -> None:
    assert service_frontend.SPEAKER_CONDITION_PREFIX == statuses.CONDITION_PREFIX
