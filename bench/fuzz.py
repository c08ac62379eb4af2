"""The long fuzz run of #18: each parser target under atheris for 10 million executions (or a time budget).

`make bench-fuzz` (FUZZ_ARGS: `--runs N`, `--seconds S` per target, `--targets a,b`, `--rounds R`). Each
target runs in its own process (`python -m tests.fuzz.main`), from the committed corpus
`tests/fuzz/corpus/<target>/` plus a scratch directory that keeps what the run learns, one round after
another so a time budget still gives a spread: the table reports executions, execs/s per round (median,
min-max), corpus growth and the time 10 million executions take at the median rate. Any finding ends the
round with libFuzzer's exit code, and its input lands in `bench/results/fuzz-<time>/` (reproduce it with
`python -m tests.fuzz.main TARGET FILE`). Results also go to `bench/results/fuzz-<time>.json`.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
TARGETS = (
    "http_request",
    "differential",
    "http_response",
    "response_differential",
    "chunked",
    "proxy_protocol",
    "plan_json",
)
GOAL = 10_000_000


@dataclass
class Round:
    executions: int
    seconds: float
    execs_per_second: int
    execs_per_cpu_second: int  # what one quiet core would do: the machine running this may be shared
    new_units: int
    peak_rss_mb: int
    exit_code: int


@dataclass
class TargetRun:
    target: str
    rounds: list[Round] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    @property
    def executions(self) -> int:
        return sum(r.executions for r in self.rounds)

    @property
    def rates(self) -> list[int]:
        return [r.execs_per_second for r in self.rounds if r.seconds >= 1]


def _stat(text: str, name: str) -> int:
    match = re.search(rf"stat::{name}:\s+(\d+)", text)
    return int(match.group(1)) if match else 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_round(target: str, runs: int, seconds: int, scratch: Path, artifacts: Path) -> tuple[Round, str]:
    """One atheris process: at most `runs` inputs or `seconds`; libFuzzer's final statistics read back."""
    command = [
        sys.executable,
        "-m",
        "tests.fuzz.main",
        target,
        f"-runs={runs}",
        f"-max_total_time={seconds}",
        "-timeout=20",  # a hang: one input running 20 s
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/{target}-",
        str(scratch),
        str(CORPUS / target),
    ]
    started, cpu = time.monotonic(), _children_cpu()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 600)
    elapsed, cpu = time.monotonic() - started, _children_cpu() - cpu
    executions = _stat(done.stderr, "number_of_executed_units")
    result = Round(
        executions=executions,
        seconds=round(elapsed, 1),
        execs_per_second=_stat(done.stderr, "average_exec_per_sec"),
        execs_per_cpu_second=round(executions / cpu) if cpu > 0 else 0,
        new_units=_stat(done.stderr, "new_units_added"),
        peak_rss_mb=_stat(done.stderr, "peak_rss_mb"),
        exit_code=done.returncode,
    )
    return result, done.stdout + done.stderr  # atheris prints the Python exception on stdout


def _finding(report: str) -> str:
    """The exception and the input from libFuzzer's report, without its progress lines."""
    start = report.find("=== Uncaught Python exception")
    lines = report[start if start >= 0 else 0 :].splitlines()
    return "\n".join(line for line in lines if not re.match(r"#\d+\s", line))[-6000:]


def fuzz(target: str, runs: int, seconds: int, rounds: int, artifacts: Path) -> TargetRun:
    """`rounds` rounds sharing one scratch corpus, splitting the executions and the time between them."""
    run = TargetRun(target)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as scratch:
        for index in range(rounds):
            left = runs - run.executions
            if left <= 0:
                break
            result, report = run_round(
                target, -(-left // (rounds - index)), max(1, seconds // rounds), Path(scratch), artifacts
            )
            run.rounds.append(result)
            print(
                f"  {target} round {index + 1}: {result.executions:,} executions in {result.seconds} s, "
                f"{result.execs_per_second:,}/s ({result.execs_per_cpu_second:,} per CPU second), "
                f"exit {result.exit_code}",
                flush=True,
            )
            if result.exit_code != 0:
                run.findings.append(_finding(report))
                break
    return run


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def table(runs: list[TargetRun]) -> str:
    lines = [
        "| target | executions | execs/s median (min-max over rounds) | execs per CPU second, median | "
        "10 M executions take | new corpus units | findings |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        rates = run.rates or [0]
        median = statistics.median(rates)
        take = _duration(GOAL / median) if median else "-"
        cpu = statistics.median([r.execs_per_cpu_second for r in run.rounds] or [0])
        lines.append(
            f"| {run.target} | {run.executions:,} | {median:,.0f} ({min(rates):,}-{max(rates):,}) | {cpu:,.0f} | {take} | "
            f"{sum(r.new_units for r in run.rounds)} | {len(run.findings) or 'none'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated, of: " + ", ".join(TARGETS)
    )
    parser.add_argument("--runs", type=int, default=GOAL, help="executions per target (default 10,000,000)")
    parser.add_argument("--seconds", type=int, default=24 * 3600, help="time budget per target")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per target, for the spread of execs/s")
    args = parser.parse_args(argv)
    names = [name for name in args.targets.split(",") if name]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = ROOT / "bench" / "results"
    artifacts = results / f"fuzz-{stamp}"
    artifacts.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in names:
        print(f"{name}: up to {args.runs:,} executions or {_duration(args.seconds)}", flush=True)
        runs.append(fuzz(name, args.runs, args.seconds, args.rounds, artifacts))
    print(table(runs))
    for run in runs:
        for report in run.findings:
            print(f"\n{run.target}: finding\n{report}")
    (results / f"fuzz-{stamp}.json").write_text(
        json.dumps([{**asdict(run), "executions": run.executions} for run in runs], indent=2)
    )
    if not any(artifacts.iterdir()):
        artifacts.rmdir()
    return 1 if any(run.findings for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
