"""Mutation testing of the sans-IO cores with cosmic-ray: the kill rate per module, and each survivor's diff.

A mutant is the module with one small change (a comparison flipped, a constant moved, a `break` made a
`continue`, ...); the tests of that module's layer kill it when one fails. A survivor is a change nothing
notices: a missing test, or an equivalent mutant (one that cannot change behaviour), which `EQUIVALENT`
lists with the reason and the rate leaves out.

Each module runs in a private copy of the working tree (cosmic-ray writes the mutant into the file, so the
checkout others test in is never touched), against its own test subset only (`MODULES`), fail-fast, the
smallest module first. `cosmic-ray exec` resumes: a run cut by `--budget` continues where it stopped
when started again with the same `--workdir`.

    make bench-mutation                                  # every module, smallest first
    .venv/bin/python -m bench.mutation --modules targets state --budget 1800
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db  # type: ignore[import-untyped]
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
COPIED = (
    "layerlb",
    "dataplane",
    "operator",
    "speaker",
    "tests",
    "testdata",
    "examples",
    "crds",
    "templates",
    "docs",
    "charts",
    "pyproject.toml",
)
SOURCE_ROOTS = (".", "dataplane", "operator", "speaker")
PYTEST = "python -m pytest -x -q -p no:cacheprovider"


@dataclass(frozen=True)
class Module:
    """A module under mutation and the tests of its layer, as pytest arguments."""

    name: str
    path: str
    tests: str


DP = "dataplane/layerlb_dataplane"
# The readers' own tests, then the proxy's over sockets: local answers and framing decisions show there.
H1 = (
    " ".join(
        f"tests/dataplane/{name}.py"
        for name in (
            "test_local_answers",
            "test_chunked_decoder",
            "test_http1",
            "test_http1_strictness",
            "test_http1_own_checks",
            "test_http1_methods_versions",
        )
    )
    + " tests/dataplane/test_proxy_http.py"
)
UNIT_HEALTH = "tests/dataplane/test_health.py -k 'not checker and not probe'"
MODULES = (
    Module(
        "targets",
        f"{DP}/core/targets.py",
        f"tests/dataplane/test_targets.py tests/dataplane/test_balancing.py {UNIT_HEALTH}",
    ),
    Module("state", f"{DP}/core/state.py", f"tests/dataplane/test_state.py {UNIT_HEALTH}"),
    Module(
        "resolve",
        "layerlb/resolve.py",
        "tests/test_resolve.py tests/test_resolve_details.py tests/test_plan_contract.py tests/test_render.py",
    ),
    Module(
        "affinity",
        f"{DP}/core/affinity.py",
        "tests/dataplane/test_affinity.py tests/dataplane/test_proxy_http.py tests/dataplane/test_hash_keys.py"
        " -k 'affinity or cookie or client_ip'",
    ),
    Module("health", f"{DP}/core/health.py", f"tests/dataplane/test_health_state.py {UNIT_HEALTH}"),
    Module(
        "validation",
        "layerlb/validation.py",
        "tests/test_validation_messages.py tests/test_validation.py tests/test_bgp_validation.py",
    ),
    Module(
        "routing",
        f"{DP}/core/routing.py",
        "tests/dataplane/test_routing.py tests/dataplane/test_request_targets.py tests/dataplane/test_route_conditions.py",
    ),
    Module("metrics", f"{DP}/core/metrics.py", "tests/dataplane/test_admin.py"),
    Module("framing", f"{DP}/http/h1/framing.py", H1),
    Module("response", f"{DP}/http/h1/response.py", H1),
    Module(
        "balancing",
        f"{DP}/core/balancing.py",
        "tests/dataplane/test_balancing.py tests/dataplane/test_hash_keys.py",
    ),
    Module(
        "rules", "layerlb/rules.py", "tests/test_validation.py tests/test_bgp_validation.py tests/test_crd.py"
    ),
    Module("request", f"{DP}/http/h1/request.py", H1),
)


@dataclass(frozen=True)
class Equivalent:
    """A mutant that cannot change behaviour: matched by module, operator and the mutated line's text."""

    module: str
    operator: str
    line: str  # a substring of the source line the mutation starts on
    reason: str
    mutant: str = ""  # when given, a substring of the mutated line too (one line, several mutants)


CLOCK_FIRST = "0.0 <= clock() holds anyway: the first test only saves a clock call"
DOUBLE = "rendezvous' unit is a double: one more or less on a 64-bit integer is below its precision"
MODEL_PATH = "an unknown field always sits inside a model, so the walk to it meets only model annotations"
KEY_LAST = "pydantic puts `[key]` last in a location: nothing follows a map key"
FIND = "str.find returns -1 or more, and -1 is CPython's cached small int: `<= -1`, `is -1` are `== -1`"
EQUIVALENT: tuple[Equivalent, ...] = (
    Equivalent(
        "targets",
        "core/ReplaceComparisonOperator_Gt_NotEq",
        "self.weight > 0",
        "weights are never negative: api.Endpoint.weight is ge=0 and Plans come from resolve",
    ),
    *(
        Equivalent(
            "resolve",
            "core/NumberReplacer",
            line,
            "route_priority is a sort key: the mutant keeps the order of ranks",
        )
        for line in (
            "host_rank = 0",
            "host_rank = 2",
            "1 if route.path is not None else 0",
            "1 if route.methods else 0",
        )
    ),
    Equivalent(
        "resolve",
        "core/NumberReplacer",
        "if route.path_prefix else -1",
        "a sort key: -2 keeps the order",
        mutant="else - 2",
    ),
    Equivalent(
        "resolve",
        "core/ReplaceUnaryOperator_USub_Invert",
        "if route.path_prefix else -1",
        "a sort key: ~1 is -2",
    ),
    *(
        Equivalent("resolve", f"core/ReplaceComparisonOperator_{operator}", "spec.mode is api.Mode.L4", why)
        for operator, why in (
            ("Is_Eq", "an enum member is equal only to itself"),
            ("Is_LtE", "L7 > L4 and L4 == L4"),
        )
    ),
    *(
        Equivalent(
            "resolve", f"core/ReplaceComparisonOperator_{operator}", 'listener.protocol) == "TCP"', why
        )
        for operator, why in (
            ("Eq_Is", "api.transport returns the interned literal"),
            ("Eq_LtE", "a transport is TCP or UDP, and UDP > TCP"),
        )
    ),
    Equivalent(
        "resolve", "core/ReplaceComparisonOperator_Eq_LtE", "secret_index == 0", "enumerate counts from 0"
    ),
    Equivalent(
        "resolve", "core/NumberReplacer", "e.port or 0", "ports are None only under dsr/tunnel, all of them"
    ),
    Equivalent(
        "resolve",
        "core/ReplaceTrueWithFalse",
        "check=True,",
        "a failing openssl prints nothing: no names either way",
    ),
    Equivalent(
        "resolve",
        "core/NumberReplacer",
        "timeout=10,",
        "openssl answers in milliseconds: any timeout of seconds",
    ),
    *(
        Equivalent("affinity", operator, "unit = (int.from_bytes(digest", DOUBLE)
        for operator in (
            "core/NumberReplacer",
            *(
                f"core/ReplaceBinaryOperator_Add_{name}"
                for name in ("FloorDiv", "Pow", "Div", "BitXor", "Mul", "BitOr", "Sub")
            ),
        )
    ),
    *(
        Equivalent(
            "affinity", operator, "best_score = -1.0", "every score is positive: any start at or below 0"
        )
        for operator in ("core/NumberReplacer", "core/ReplaceUnaryOperator_USub_Not")
    ),
    Equivalent(
        "affinity",
        "core/ReplaceComparisonOperator_Gt_GtE",
        "if score > best_score:",
        "64-bit hashes never tie",
    ),
    Equivalent(
        "affinity",
        "core/ReplaceComparisonOperator_NotEq_IsNot",
        "cached[0] != plan_key",
        "an equal key that is another object only recomputes the same token",
    ),
    *(
        Equivalent("health", "core/NumberReplacer", line, why)
        for line, why in (
            ("self._successes = 0", "successes count only while down, and going down resets them"),
            ("self._ejected_until = 0.0", "-1.0 is as much in the past as 0.0 for a monotonic clock"),
        )
    ),
    *(
        Equivalent("health", f"core/ReplaceComparisonOperator_{operator}", line, why)
        for operator, line, why in (
            ("Eq_Lt", "self._ejected_until == 0.0 or", "a monotonic clock is never negative"),
            (
                "GtE_Eq",
                "self._successes >= check.healthy_threshold",
                "it is up at the threshold: never beyond",
            ),
            ("GtE_Is", "self._failures >= check.unhealthy_threshold", "small ints, down at the threshold"),
            (
                "Lt_IsNot",
                "self.passive_failures < self.passive_threshold",
                "small ints, reset at the threshold",
            ),
            ("NotEq_IsNot", "return self.healthy != before", "bools are singletons"),
            ("NotEq_Lt", "return self.healthy != before", "an ejection only ever turns healthy off"),
            ("GtE_Is", "self._successes >= check.healthy_threshold", "small ints, up at the threshold"),
            (
                "GtE_Eq",
                "self._failures >= check.unhealthy_threshold",
                "down at the threshold: never beyond while up",
            ),
            (
                "Lt_NotEq",
                "self.passive_failures < self.passive_threshold",
                "reset at the threshold: never beyond",
            ),
            (
                "NotEq_Gt",
                "if self._ejected_until != 0.0 and",
                "an ejection's end is a clock time, never negative",
            ),
            ("Eq_LtE", "return self._ejected_until == 0.0 or", CLOCK_FIRST),
        )
    ),
    *(
        Equivalent("health", "core/NumberReplacer", line, why)
        for line, why in (
            ("return self._ejected_until == 0.0 or", CLOCK_FIRST),
            ("self._last_ejection_end = 0.0", "read only once an ejection ended, which sets it"),
        )
    ),
    Equivalent(
        "health",
        "core/ReplaceBinaryOperator_Mul_Div",
        "*,",
        "`/` for `*`: every caller passes these by keyword",
    ),
    Equivalent(
        "framing",
        "core/ReplaceComparisonOperator_Eq_Is",
        'what == "response"',
        "both sides are interned literals",
    ),
    Equivalent(
        "framing",
        "core/ReplaceComparisonOperator_NotEq_Gt",
        'head.count(b"\\n") != crlf',
        "every CRLF holds an LF: the count is never below crlf",
    ),
    Equivalent(
        "framing",
        "core/NumberReplacer",
        'b"," in values[0]',
        "values[-1] is values[0] when there is only one value, the only case that reaches it",
    ),
    *(
        Equivalent(
            "framing",
            operator,
            "% bytes([c]) for c in",
            "a probe of llhttp: another control byte probes as well",
        )
        for operator in ("core/NumberReplacer", "core/ReplaceBinaryOperator_Mod_Add")
    ),
    *(
        Equivalent("validation", "core/ReplaceAndWithOr", line, MODEL_PATH)
        for line in (
            "if not (isinstance(current, type) and issubclass(current, pydantic.BaseModel)):",
            "return current if isinstance(current, type) and issubclass(current, pydantic.BaseModel) else None",
            "if isinstance(found, type) and issubclass(found, pydantic.BaseModel):",
        )
    ),
    Equivalent(
        "validation",
        "core/ReplaceComparisonOperator_Eq_Is",
        'if kind == "int_from_float":',
        "pydantic-core interns its error kinds: the real-error test passes with `is` too",
    ),
    Equivalent(
        "validation", "core/ReplaceTrueWithFalse", "@dataclass(frozen=True)", "nothing assigns to a Problem"
    ),
    Equivalent("validation", "core/ReplaceContinueWithBreak", "continue", KEY_LAST),
    *(
        Equivalent("validation", operator, 'location[index + 1 : index + 2] == ("[key]",)', KEY_LAST)
        for operator in ("core/NumberReplacer", "core/ReplaceBinaryOperator_Add_LShift")
    ),
    *(
        Equivalent(
            "validation",
            f"core/ReplaceComparisonOperator_{operator}",
            line,
            "too_short/too_long sort after string_*",
        )
        for operator in ("Eq_LtE",)
        for line in ('kind == "string_too_short"', 'kind == "string_too_long"')
    ),
    Equivalent(
        "framing",
        "core/NumberReplacer",
        "MAX_CHUNK_LINE: Final = ",
        "the limit's value: tests read it by name",
    ),
    Equivalent(
        "framing",
        "core/ReplaceComparisonOperator_Eq_GtE",
        'what == "response"',
        "request sorts before response",
    ),
    Equivalent(
        "framing",
        "core/ReplaceComparisonOperator_NotEq_Gt",
        'codings[-1] != b"chunked"',
        "a list not ending in chunked is refused with the same 400 by the count of chunked just after",
    ),
    Equivalent(
        "framing", "core/ReplaceComparisonOperator_Lt_NotEq", "while pos < size:", "pos never passes size"
    ),
    *(
        Equivalent("framing", f"core/ReplaceComparisonOperator_{operator}", "sink(data if take == size", why)
        for operator, why in (
            ("Eq_Is", "whole or sliced, the sink gets the same bytes"),
            ("Eq_GtE", "take never exceeds size"),
            ("Eq_Gt", "whole or sliced, the sink gets the same bytes"),
        )
    ),
    Equivalent(
        "state",
        "core/ReplaceComparisonOperator_Eq_LtE",
        "target.active == 0",
        "a target's active count never goes below 0 (one decrement per increment)",
    ),
    Equivalent(
        "routing",
        "core/NumberReplacer",
        "HOST_CACHE_SIZE = ",
        "the cache's bound, which the test reads by name: any bound is the same behaviour",
    ),
    *(
        Equivalent("routing", f"core/ReplaceComparisonOperator_{operator}", line, FIND)
        for operator in ("NotEq_IsNot", "Eq_Is", "Eq_LtE", "NotEq_Gt")
        for line in (
            "query != -1",
            "query == -1",
            'host.find("]", colon) == -1',
            "scheme == -1",
            "index != -1",
        )
    ),
    *(
        Equivalent(
            "routing", "core/NumberReplacer", line, "the first piece of a split is the same for any maxsplit"
        )
        for line in ('split("?", 1)[0]', 'split("#", 1)[0]')
    ),
    *(
        Equivalent(
            "routing", f"core/ReplaceComparisonOperator_{operator}", "if index != -1 and index < end:", why
        )
        for operator, why in (
            ("NotEq_Gt", "str.find returns -1 or more: `> -1` is `!= -1`"),
            ("NotEq_IsNot", FIND),
            ("Lt_LtE", "two different characters are never found at one index, and none at the end"),
        )
    ),
    *(
        Equivalent("routing", f"core/ReplaceComparisonOperator_{operator}", "len(name) > len(suffix)", why)
        for operator, why in (
            ("Gt_GtE", "a name equal to `.suffix` would start with a dot, which no Host does"),
            ("Gt_IsNot", "lengths of host names are cached small ints, and never shorter than the suffix"),
        )
    ),
    Equivalent(
        "routing",
        "core/ReplaceComparisonOperator_Eq_Is",
        'path[len(prefix)] == "/"',
        "CPython caches one-character strings: `is` is `==` for them",
    ),
    Equivalent(
        "routing",
        "core/ReplaceComparisonOperator_Eq_GtE",
        'host.find("]", colon) == -1',
        "a bracketed literal without a port ends with `]`, so what follows its last colon is never a port",
    ),
    Equivalent(
        "routing",
        "core/ReplaceComparisonOperator_GtE_Eq",
        "len(self._by_host) >= HOST_CACHE_SIZE",
        "cleared on reaching the bound, the cache never exceeds it: `==` is `>=`",
    ),
    Equivalent(
        "routing",
        "core/ReplaceComparisonOperator_Eq_LtE",
        "path.startswith(prefix) and (len(path) == len(prefix)",
        "a path that starts with the prefix is at least as long: `<=` is `==` there",
    ),
    Equivalent(
        "routing",
        "core/ReplaceBinaryOperator_Mul_Div",
        "*,",
        "`/` instead of `*` in match()'s signature: default_port is still passed by keyword everywhere",
    ),
    Equivalent(
        "routing",
        "core/ReplaceTrueWithFalse",
        "@dataclass(frozen=True, slots=True)",
        "frozen only forbids assignments that nothing makes",
    ),
    Equivalent(
        "routing",
        "core/ReplaceComparisonOperator_Gt_NotEq",
        "name.endswith(suffix) and len(name) > len(suffix)",
        "a name ending with the suffix is at least as long: `!=` is `>` there",
    ),
)


@dataclass
class Survivor:
    line: int
    operator: str
    occurrence: int
    diff: str
    equivalent: str | None = None  # the reason, when `EQUIVALENT` lists it


@dataclass
class ModuleResult:
    name: str
    path: str
    mutants: int
    done: int = 0
    killed: int = 0
    timeouts: int = 0
    survivors: list[Survivor] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    @property
    def equivalent(self) -> int:
        return sum(1 for s in self.survivors if s.equivalent)

    @property
    def rate(self) -> float | None:
        """Killed over done, equivalent mutants left out."""
        counted = self.done - self.equivalent
        return self.killed / counted if counted > 0 else None


def copy_tree(workdir: Path) -> None:
    """The working tree (committed or not) as the mutants' sandbox, without caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".mypy_cache", ".pytest_cache")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source, target = ROOT / name, workdir / name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, target)


def environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(workdir / root) for root in SOURCE_ROOTS)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant's bytecode must never be found by the next one
    return env


def cosmic_ray(*args: str, workdir: Path, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "cosmic-ray"
    return subprocess.run(
        [str(tool), *args],
        cwd=workdir,
        env=environment(workdir),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def baseline_seconds(module: Module, workdir: Path) -> float:
    """The unmutated tests' duration; they must pass, or every mutant would count as killed."""
    started = time.monotonic()
    result = subprocess.run(
        f"{PYTEST} {module.tests}", shell=True, cwd=workdir, env=environment(workdir),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{module.name}: the tests fail unmutated:\n{result.stdout[-2000:]}")
    return time.monotonic() - started


def config(module: Module, timeout: float) -> str:
    return (
        "[cosmic-ray]\n"
        f'module-path = "{module.path}"\n'
        f"timeout = {timeout:.0f}\n"
        "excluded-modules = []\n"
        f'test-command = "{PYTEST} {module.tests}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where a mutant cannot change behaviour by construction: a function's parameter and return annotations
    and annotations of local variables (Python never evaluates the latter; the modules here import
    `annotations` from `__future__`, so signatures are strings nobody reads). Class-level annotations are
    left in: dataclasses and pydantic read them."""
    tree = ast.parse(source)
    future = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(a.name == "annotations" for a in node.names)
        for node in tree.body
    )
    spans = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        annotations: list[ast.expr | None] = []
        if future:
            arguments = function.args
            every = [
                *arguments.posonlyargs,
                *arguments.args,
                *arguments.kwonlyargs,
                arguments.vararg,
                arguments.kwarg,
            ]
            annotations += [argument.annotation for argument in every if argument is not None]
            annotations.append(function.returns)
        annotations += [node.annotation for node in ast.walk(function) if isinstance(node, ast.AnnAssign)]
        for node in annotations:
            if node is not None and node.end_lineno is not None and node.end_col_offset is not None:
                spans.append(((node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)))
    return spans


def skip_annotations(module: Module, session: Path) -> int:
    """Mark the mutants inside annotations skipped (see `annotation_spans`); how many there were."""
    spans = annotation_spans((ROOT / module.path).read_text())
    skipped = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in db.work_items:
            (mutation,) = item.mutations
            start, end = tuple(mutation.start_pos), tuple(mutation.end_pos)
            if any(low <= start and end <= high for low, high in spans):
                skipped.append(item.job_id)
        if skipped:
            db.set_multiple_results(
                skipped, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="in an annotation")
            )
    return len(skipped)


def forget_survivors(session: Path) -> None:
    """Run the survivors again (after tests were added): their results are dropped, so exec redoes them."""
    with sqlite3.connect(session) as db:
        db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")


def equivalent_reason(module: Module, operator: str, line_text: str, diff: str = "") -> str | None:
    for known in EQUIVALENT:
        same = known.module == module.name and known.operator == operator and known.line in line_text
        if same and (not known.mutant or known.mutant in diff):
            return known.reason
    return None


def read_results(module: Module, workdir: Path, session: Path, result: ModuleResult) -> None:

    lines = (ROOT / module.path).read_text().splitlines()
    with use_db(str(session), WorkDB.Mode.open) as db:
        result.mutants = db.num_work_items
        for item, outcome in db.completed_work_items:
            if outcome.worker_outcome is WorkerOutcome.SKIPPED:
                result.mutants -= 1  # in an annotation: not a mutant of behaviour
                continue
            result.done += 1
            if outcome.test_outcome is not TestOutcome.SURVIVED:
                result.killed += 1
                if outcome.output == "timeout":
                    result.timeouts += 1
                continue
            (mutation,) = item.mutations
            line = mutation.start_pos[0]
            text = lines[line - 1] if 0 < line <= len(lines) else ""
            result.survivors.append(
                Survivor(
                    line=line,
                    operator=mutation.operator_name,
                    occurrence=mutation.occurrence,
                    diff="\n".join(
                        d
                        for d in (outcome.diff or "").splitlines()
                        if d[:1] in "+-" and d[:3] not in ("+++", "---")
                    ),
                    equivalent=equivalent_reason(module, mutation.operator_name, text, outcome.diff or ""),
                )
            )
    result.survivors.sort(key=lambda s: (s.line, s.operator, s.occurrence))


def run_module(
    module: Module, workdir: Path, deadline: float, recheck: bool = False, report_only: bool = False
) -> ModuleResult:
    session = workdir / f"mutation-{module.name}.sqlite"
    result = ModuleResult(module.name, module.path, mutants=0)
    if report_only:
        if not session.exists():
            result.note = "no session in --workdir"
            return result
        read_results(module, workdir, session, result)
        if result.done < result.mutants:
            result.note = f"partial: {result.done} of {result.mutants} run"
        return result
    started = time.monotonic()
    base = baseline_seconds(module, workdir)
    (workdir / f"mutation-{module.name}.toml").write_text(config(module, max(10.0, 5 * base)))
    if not session.exists():
        init = cosmic_ray("init", f"mutation-{module.name}.toml", session.name, workdir=workdir)
        if init.returncode != 0:
            raise RuntimeError(f"{module.name}: cosmic-ray init failed: {init.stderr[-2000:]}")
        skip_annotations(module, session)
    elif recheck:
        forget_survivors(session)
    remaining = deadline - time.monotonic()
    if remaining > 0:
        try:
            cosmic_ray(
                "exec", f"mutation-{module.name}.toml", session.name, workdir=workdir, timeout=remaining
            )
        except subprocess.TimeoutExpired:
            result.note = "budget ran out: partial (resume with the same --workdir)"
    else:
        result.note = "not run: budget spent"
    (workdir / module.path).write_text((ROOT / module.path).read_text())  # in case exec was cut mid-mutant
    read_results(module, workdir, session, result)
    result.seconds = time.monotonic() - started
    if result.done < result.mutants and not result.note:
        result.note = f"partial: {result.done} of {result.mutants} run"
    return result


def table(results: list[ModuleResult]) -> str:
    rows = [
        "| module | mutants | run | killed | survived | equivalent | kill rate | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = "—" if r.rate is None else f"{100 * r.rate:.1f} %"
        survived = len(r.survivors) - r.equivalent
        rows.append(
            f"| {r.name} (`{r.path}`) | {r.mutants} | {r.done} | {r.killed} | {survived} | {r.equivalent} "
            f"| {rate} | {r.seconds:.0f} s |" + (f" {r.note}" if r.note else "")
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modules", nargs="*", help="names from MODULES (default: all, smallest first)")
    parser.add_argument("--budget", type=float, default=4 * 3600, help="seconds for the whole run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/layerlb-mutation"))
    parser.add_argument("--fresh", action="store_true", help="forget earlier sessions in --workdir")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--report-only", action="store_true", help="print what the sessions in --workdir hold; run nothing"
    )
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="run the survivors of earlier sessions again, with today's tests",
    )
    args = parser.parse_args(argv)
    known = {m.name: m for m in MODULES}
    unknown = [name for name in args.modules or () if name not in known]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [known[name] for name in args.modules] if args.modules else list(MODULES)
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    if not args.report_only:
        copy_tree(args.workdir)
    deadline = time.monotonic() + args.budget
    results = []
    for module in chosen:
        print(f"mutating {module.name} ({module.path}) against: {module.tests}", flush=True)
        try:
            result = run_module(module, args.workdir, deadline, args.recheck, args.report_only)
        except RuntimeError as error:  # the module cannot run: say why, go on with the next
            print(error, flush=True)
            results.append(ModuleResult(module.name, module.path, mutants=0, note=str(error).splitlines()[0]))
            continue
        results.append(result)
        for survivor in result.survivors:
            mark = f"  [equivalent: {survivor.equivalent}]" if survivor.equivalent else ""
            print(f"  survived {module.path}:{survivor.line} {survivor.operator}{mark}\n    {survivor.diff}")
        print(table([result]).splitlines()[-1], flush=True)
    print("\n" + table(results))
    if args.json:
        payload = [{**asdict(r), "rate": r.rate, "equivalent": r.equivalent} for r in results]
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
