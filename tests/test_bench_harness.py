"""The bench harness starts, measures and writes its JSON (a smoke run of two rows with 1-second wrk runs),
so `make bench` is known to work without running the full five minutes; no figure is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import processes, report, wrk

REPO = Path(__file__).resolve().parent.parent


def test_smoke_run_measures_two_rows_and_writes_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, result.stdout
    document = json.loads(files[0].read_text())
    rows = {row["key"]: row for row in document["rows"]}
    assert set(rows) == {"direct", "haproxy_http"}
    tools = all(processes.tool(name) for name in ("wrk", "nginx", "haproxy"))
    for row in rows.values():
        if tools:
            assert row["status"] == "ok", row["reason"]
            assert row["c50"]["requests"] > 0 and row["c50"]["p99_ms"] > 0
            assert row["c1"]["requests"] > 0
            assert row["subject_cpu_us_per_request"] > 0  # the subject's CPU time over its requests
        else:  # the harness must say what is missing rather than crash
            assert row["status"] == "unavailable" and "not installed" in row["reason"]
    targets = {target["name"]: target for target in document["targets"]}
    assert targets["L7 throughput, layerlb / HAProxy http"]["verdict"] == "unavailable"  # layerlb not run
    assert "| direct to nginx |" in result.stdout and str(files[0]) in result.stdout


def test_wrk_summary_line_is_parsed_into_a_measurement() -> None:
    line = (
        'BENCH-JSON {"requests":1000,"duration_us":2000000,"bytes":1,"connect":1,"read":2,"write":0,'
        '"status":3,"timeout":0,"p50_us":150,"p90_us":300,"p99_us":1250,"max_us":9000,"mean_us":170.0}'
    )
    measured = wrk.parse(f"Running 2s test\n{line}\n  Latency Distribution\n")
    assert measured.rps == 500.0
    assert (measured.p50_ms, measured.p99_ms) == (0.15, 1.25)
    assert measured.failed == 6


def test_a_target_missing_an_input_is_unavailable_not_missed() -> None:
    fast = wrk.parse(
        'BENCH-JSON {"requests":100,"duration_us":1000000,"bytes":1,"connect":0,"read":0,"write":0,'
        '"status":0,"timeout":0,"p50_us":100,"p90_us":100,"p99_us":100,"max_us":100,"mean_us":100.0}'
    )
    haproxy = report.Row("haproxy_http", "HAProxy", status=report.OK, c50=fast)
    layerlb = report.Row("layerlb_l7", "layerlb", reason="`layerlb serve` is not available yet")
    judged = {
        target.name: target for target in report.targets({"haproxy_http": haproxy, "layerlb_l7": layerlb}, {})
    }
    throughput = judged["L7 throughput, layerlb / HAProxy http"]
    assert throughput.met is None and "not available yet" in (throughput.why or "")
    layerlb.status, layerlb.c50 = report.OK, fast
    judged = {
        target.name: target for target in report.targets({"haproxy_http": haproxy, "layerlb_l7": layerlb}, {})
    }
    assert judged["L7 throughput, layerlb / HAProxy http"].met is True


def test_cpu_per_request_is_the_subjects_cpu_time_over_its_requests_and_compared_per_mode() -> None:
    measured = wrk.parse(
        'BENCH-JSON {"requests":40000,"duration_us":1000000,"bytes":1,"connect":0,"read":0,"write":0,'
        '"status":0,"timeout":0,"p50_us":100,"p90_us":100,"p99_us":100,"max_us":100,"mean_us":100.0}'
    )
    haproxy = report.Row("haproxy_http", "HAProxy", status=report.OK, c50=measured, subject_cpu_seconds=0.8)
    layerlb = report.Row("layerlb_l7", "layerlb", status=report.OK, c50=measured, subject_cpu_seconds=1.0)
    assert haproxy.cpu_us_per_request == 20.0 and layerlb.cpu_us_per_request == 25.0
    assert report.cpu_ratios([haproxy, layerlb]) == {"layerlb_l7 / haproxy_http": 1.25}
    assert report.cpu_ratios([layerlb]) == {}  # no HAProxy row: nothing to compare


def test_hot_path_cost_drives_requests_through_the_proxy_objects() -> None:
    """`bench/hotpath.py` serves its requests through pooled upstream connections (it asserts that)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hotpath.py"), "--requests", "500", "--passes", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "µs CPU per request" in result.stdout
