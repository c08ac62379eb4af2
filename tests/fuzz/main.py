"""Runs one fuzz target under atheris, coverage-guided: `python -m tests.fuzz.main TARGET [libFuzzer flags] DIR...`.

atheris is libFuzzer driving Python: the parsers (and h11, for the differential target) are instrumented
on import, so the fuzzer keeps inputs that reach new branches. Everything after TARGET goes to libFuzzer
(`-runs=N`, `-max_total_time=S`, `-timeout=S` for a hang, corpus directories: the first one receives the
new inputs, so pass a scratch directory before the committed `tests/fuzz/corpus/TARGET`). A broken
property or any exception ends the run with a failing exit code and the input, written to
`-artifact_prefix` and printed (`-print_final_stats=1` adds the executions per second).
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]  # no type information published

with atheris.instrument_imports(include=["layerlb_dataplane", "layerlb", "h11", "tests.fuzz"]):
    from tests.fuzz import h11_differential, h11_response_differential, targets

ALL = {
    **targets.TARGETS,
    "differential": h11_differential.differential,
    "response_differential": h11_response_differential.response_differential,
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in ALL:
        sys.exit(
            f"usage: python -m tests.fuzz.main TARGET [libFuzzer flags] [DIR...]; TARGET: {', '.join(ALL)}"
        )
    target = ALL[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
