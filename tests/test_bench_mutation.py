"""bench/mutation.py's own logic, without running a mutant: what it skips, what it calls equivalent, and
that every module and test file it names exists (a rename would otherwise fail only in the long run)."""

from __future__ import annotations

import shlex
import textwrap
from pathlib import Path

from bench import mutation

ROOT = Path(__file__).resolve().parent.parent


def test_every_module_and_test_file_named_exists() -> None:
    for module in mutation.MODULES:
        assert (ROOT / module.path).is_file(), module.path
        files = [word for word in shlex.split(module.tests) if word.endswith(".py")]
        assert files, module.name
        for name in files:
            assert (ROOT / name).is_file(), f"{module.name}: {name}"
    names = [module.name for module in mutation.MODULES]
    assert len(names) == len(set(names))
    assert {known.module for known in mutation.EQUIVALENT} <= set(names)


def test_signature_and_local_annotations_are_skipped_class_level_ones_are_not() -> None:
    source = textwrap.dedent(
        """\
        from __future__ import annotations

        class Pool:
            size: int | None = None

            def pick(self, key: bytes | None) -> Target | None:
                found: list[int] = []
                return found or None
        """
    )
    spans = mutation.annotation_spans(source)
    covered = {(start[0], source.splitlines()[start[0] - 1][start[1] : end[1]]) for start, end in spans}
    assert covered == {(6, "bytes | None"), (6, "Target | None"), (7, "list[int]")}


def test_without_the_future_import_only_local_annotations_are_skipped() -> None:
    source = "def pick(key: bytes | None) -> int | None:\n    found: list[int] = []\n    return None\n"
    assert [start[0] for start, _ in mutation.annotation_spans(source)] == [2]


def test_equivalent_mutants_are_matched_by_module_operator_and_line() -> None:
    routing = next(module for module in mutation.MODULES if module.name == "routing")
    targets = next(module for module in mutation.MODULES if module.name == "targets")
    line = "        if query != -1:"
    assert mutation.equivalent_reason(routing, "core/ReplaceComparisonOperator_NotEq_IsNot", line)
    assert mutation.equivalent_reason(routing, "core/ReplaceComparisonOperator_NotEq_Eq", line) is None
    assert mutation.equivalent_reason(targets, "core/ReplaceComparisonOperator_NotEq_IsNot", line) is None


def test_an_equivalent_entry_can_name_one_of_several_mutants_of_a_line() -> None:
    resolve = next(module for module in mutation.MODULES if module.name == "resolve")
    line = '        len(route.path_prefix.rstrip("/")) if route.path_prefix else -1,'
    kept = '+        len(route.path_prefix.rstrip("/")) if route.path_prefix else - 2,'
    changed = '+        len(route.path_prefix.rstrip("/")) if route.path_prefix else - 0,'
    assert mutation.equivalent_reason(resolve, "core/NumberReplacer", line, kept)
    assert mutation.equivalent_reason(resolve, "core/NumberReplacer", line, changed) is None
