"""The `layerlb` command: validate, render, crd (and, as they land, serve, dataplane, operator).

Exit codes: 0 success, 2 invalid input (with one `FILE: KIND/NAME: path: reason` line per problem),
1 an internal failure (one line, no traceback; `LAYERLB_DEBUG=1` shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from layerlb import crd, documents, render

EXIT_INVALID = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_INVALID, f"{self.prog}: error: {message}\n")


def _validate(args: argparse.Namespace) -> int:
    bundle = documents.load(args.files)
    for item in bundle.items:
        if item.problems:
            for line in item.error_lines():
                print(line, file=sys.stderr)
        else:
            print(f"{item.file}: {item.name}: ok")
    return 0 if bundle.ok else EXIT_INVALID


def _render(args: argparse.Namespace) -> int:
    bundle = documents.load(args.files)
    errors = [line for item in bundle.items for line in item.error_lines()]
    resolved, unresolved = documents.plans(bundle)
    errors += unresolved
    outputs = []
    for item, plan in resolved:
        reason = render.unsupported(plan, args.format)
        if reason is not None:
            errors.append(f"{item.file}: {item.name}: {reason}")
        else:
            outputs.append(render.render(plan, args.format))
    if not resolved and not errors:
        errors.append(f"{', '.join(args.files)}: no LoadBalancer to render")
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        return EXIT_INVALID
    sys.stdout.write("".join(outputs))
    return 0


def _crd(args: argparse.Namespace) -> int:
    if args.write is None:
        sys.stdout.write(crd.render_all())
        return 0
    folder = Path(args.write)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in crd.files().items():
        (folder / name).write_text(text, encoding="utf-8")
        print(f"wrote {folder / name}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    top = _Parser(prog="layerlb", description="LoadBalancer resources in, L4 and L7 load balancers out.")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    validate = sub.add_parser("validate", help="check LoadBalancer and VIPPool files; exit 2 when invalid")
    validate.add_argument("files", nargs="+", metavar="FILE", help="multi-document YAML; - for stdin")
    validate.set_defaults(run=_validate)

    rend = sub.add_parser("render", help="print the configuration a LoadBalancer file renders to")
    rend.add_argument("--format", "-f", choices=render.FORMATS, default="dataplane")
    rend.add_argument("files", nargs="+", metavar="FILE")
    rend.set_defaults(run=_render)

    crds = sub.add_parser("crd", help="print the CustomResourceDefinitions (or write them to a folder)")
    crds.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR (e.g. crds/)")
    crds.set_defaults(run=_crd)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:  # the last line of defence: a person sees one line, not a traceback
        if os.environ.get("LAYERLB_DEBUG"):
            raise
        print(f"layerlb: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
