"""The fuzz targets in CI: every seed in-process, then a short coverage-guided atheris run of each target.

The short runs start from the committed corpora and stop after `RUNS` inputs or `SECONDS` (whichever
comes first; seven targets stay within 90 s on a busy two-core machine). A finding fails the test with
libFuzzer's report: the exception, and the input in hex, Base64 and as a file under the run's scratch
directory. The long run is `make bench-fuzz` (bench/fuzz.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import h11_differential, h11_response_differential, seeds, targets

ALL = {
    **targets.TARGETS,
    "differential": h11_differential.differential,
    "response_differential": h11_response_differential.response_differential,
}
RUNS = 20_000
SECONDS = 8
ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(
    ("target", "name"), [(target, name) for target, named in seeds.SEEDS.items() for name in named]
)
def test_each_seed_passes_its_target(target: str, name: str) -> None:
    ALL[target](seeds.SEEDS[target][name])


def test_the_committed_corpora_hold_every_seed() -> None:
    for target, named in seeds.SEEDS.items():
        for name, data in named.items():
            path = seeds.CORPUS / target / name
            assert path.is_file() and path.read_bytes() == data, f"run `python -m tests.fuzz.seeds`: {path}"


def test_every_framing_rule_of_the_issue_has_a_seed() -> None:
    rules = {name for name in seeds.REQUESTS if name.startswith("rule_")}
    assert rules == {
        "rule_length_over_64_bits",
        "rule_te_in_http10",
        "rule_length_and_te",
        "rule_duplicate_length",
        "rule_conflicting_length",
        "rule_list_length",
        "rule_bare_lf",
        "rule_bare_cr",
        "rule_obs_fold",
        "rule_chunk_extension_control",
    }
    for name in rules:  # each is refused by layerlb: nothing of it reaches an upstream
        events, refusal, _ = targets.frame_requests([seeds.REQUESTS[name]])
        assert refusal is not None and not [e for e in events if e[0] == "end"], name


@pytest.mark.parametrize("row", h11_differential.KNOWN_DIFFERENCES, ids=lambda row: row.name)
def test_each_known_difference_with_h11_still_shows_in_its_example(
    row: h11_differential.KnownDifference,
) -> None:
    ours = h11_differential.layerlb_reading(row.example)
    theirs = h11_differential.h11_reading(row.example)
    refusing, accepting = (ours, theirs) if row.refused_by == "layerlb" else (theirs, ours)
    assert refusing.stop == "refused" and all(message.end < 0 for message in refusing.messages)
    assert accepting.messages and accepting.messages[0].end > 0
    assert h11_differential.explain(row.refused_by, row.example, refusing.reason) == row
    h11_differential.differential(row.example)


@pytest.mark.parametrize("row", h11_response_differential.RESPONSE_DIFFERENCES, ids=lambda row: row.name)
def test_each_known_response_difference_with_h11_still_shows_in_its_example(
    row: h11_differential.KnownDifference,
) -> None:
    ours = h11_response_differential.layerlb_framing(row.example, head_request=False)
    theirs = h11_response_differential.h11_framing(row.example, head_request=False)
    refusing, accepting = (ours, theirs) if row.refused_by == "layerlb" else (theirs, ours)
    assert refusing.stop == "refused" and accepting.stop == "framed"
    assert h11_response_differential.explain(row.refused_by, row.example, refusing.reason) == row
    h11_response_differential.response_differential(b"\x00" + row.example)


def test_a_refusal_without_its_row_fails_the_differential_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h11_differential, "KNOWN_DIFFERENCES", ())
    with pytest.raises(targets.Finding, match="no row of KNOWN_DIFFERENCES"):
        h11_differential.differential(b"GET / HTTP/1.1\nHost: a\n\n")


def test_readers_that_end_a_message_at_different_bytes_fail_the_differential_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h11_reading = h11_differential.h11_reading

    def one_byte_later(data: bytes) -> h11_differential.Reading:
        reading = h11_reading(data)
        reading.messages[0].end += 1
        return reading

    monkeypatch.setattr(h11_differential, "h11_reading", one_byte_later)
    with pytest.raises(targets.Finding, match="framing differs"):
        h11_differential.differential(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")


@pytest.mark.parametrize("target", sorted(ALL))
def test_a_short_coverage_guided_run_finds_nothing(target: str, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "tests.fuzz.main",
        target,
        f"-runs={RUNS}",
        f"-max_total_time={SECONDS}",
        "-timeout=20",  # one input taking longer is a hang
        "-rss_limit_mb=1024",
        f"-artifact_prefix={tmp_path}/",
        str(tmp_path),
        str(seeds.CORPUS / target),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120)
    report = run.stderr[-4000:]
    assert run.returncode == 0, f"{' '.join(command)} found something:\n{report}"
    assert "Done " in run.stderr, report
