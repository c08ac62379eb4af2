"""The `layerlb` command: validate, render, crd, serve, dataplane, operator, speaker.

Exit codes: 0 success, 2 invalid input (with one `FILE: KIND/NAME: path: reason` line per problem),
1 an internal failure (one line, no traceback; `LAYERLB_DEBUG=1` shows it).

The composition root: the one core module that imports the data plane, the operator and the speaker.
`serve` puts the YAML front end (`documents`) in front of the data plane's file source (`YamlFiles`), so
the data plane itself reads Plans only. The front end (YAML, validation, resolution, the CRDs) is imported
by the commands that use it, so that a forwarding pod (`layerlb dataplane`) never loads it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from layerlb_dataplane.control import config

from layerlb import plan
from layerlb.render import formats

EXIT_INVALID = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_INVALID, f"{self.prog}: error: {message}\n")


def _validate(args: argparse.Namespace) -> int:
    from layerlb import documents

    bundle = documents.load(args.files)
    for item in bundle.items:
        if item.problems:
            for line in item.error_lines():
                print(line, file=sys.stderr)
        else:
            print(f"{item.file}: {item.name}: ok")
    return 0 if bundle.ok else EXIT_INVALID


def _render(args: argparse.Namespace) -> int:
    from layerlb import documents

    bundle = documents.load(args.files)
    errors = [line for item in bundle.items for line in item.error_lines()]
    resolved, unresolved = documents.plans(bundle)
    errors += unresolved
    outputs = []
    for item, p in resolved:
        reason = formats.unsupported(p, args.format)
        if reason is not None:
            errors.append(f"{item.file}: {item.name}: {reason}")
        else:
            outputs.append(formats.render(p, args.format))
    if not resolved and not errors:
        errors.append(f"{', '.join(args.files)}: no LoadBalancer to render")
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        return EXIT_INVALID
    sys.stdout.write("".join(outputs))
    return 0


def _crd(args: argparse.Namespace) -> int:
    from layerlb import crd

    if args.write is None:
        sys.stdout.write(crd.render_all())
        return 0
    folder = Path(args.write)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in crd.files().items():
        (folder / name).write_text(text, encoding="utf-8")
        print(f"wrote {folder / name}")
    return 0


def _dataplane_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--workers", type=int, default=1, metavar="N", help="worker processes (SO_REUSEPORT)"
    )
    command.add_argument("--admin", metavar="HOST:PORT", help="serve /healthz /readyz /metrics /config here")
    command.add_argument(
        "--drain-timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="how long open connections may finish",
    )
    command.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often files are checked for change",
    )


def _run_dataplane(args: argparse.Namespace, source: config.PlanSource) -> int:
    import logging

    from layerlb_dataplane.control import admin, serve

    if args.workers < 1:
        print(f"layerlb {args.command}: --workers must be 1 or more", file=sys.stderr)
        return EXIT_INVALID
    try:
        address = admin.parse_address(args.admin) if args.admin else None
    except ValueError as error:
        print(f"layerlb {args.command}: --admin: {error}", file=sys.stderr)
        return EXIT_INVALID
    logging.basicConfig(level=logging.INFO, format="layerlb: %(message)s", stream=sys.stderr)
    return serve.run(
        source,
        workers=args.workers,
        admin_address=address,
        drain_timeout=args.drain_timeout,
    )


class YamlFiles(config.FileSource):
    """LoadBalancer YAML (with TLS Secrets alongside) resolved standalone, as `layerlb serve` reads it.

    Standalone resources carry no `metadata.generation`; the source numbers each LoadBalancer's Plans
    itself (1, 2, ... whenever its content changes) so that metrics and `/config` show reloads.
    """

    def __init__(self, paths: Sequence[str], poll_seconds: float = config.POLL_SECONDS) -> None:
        super().__init__(paths, poll_seconds)
        self._generations: dict[str, tuple[int, plan.Plan]] = {}

    def parse(self, contents: list[tuple[str, bytes | None]]) -> list[plan.Plan]:
        from layerlb import documents

        # documents reads the files again: a write between the two reads changes the stat again, so the
        # next poll reloads; no change is ever lost.
        bundle = documents.load([path for path, _ in contents])
        errors = [line for item in bundle.items for line in item.error_lines()]
        resolved, unresolved = documents.plans(bundle)
        errors += unresolved
        if not errors and not resolved:
            errors.append(f"{self.description}: no LoadBalancer to serve")
        if errors:
            raise config.InvalidConfig(errors)
        return [self._number(p) for _, p in resolved]

    def _number(self, new: plan.Plan) -> plan.Plan:
        if new.generation:
            return new
        previous = self._generations.get(new.key)
        if previous is not None and previous[1] == new.model_copy(update={"generation": previous[0]}):
            return previous[1]
        numbered = new.model_copy(update={"generation": previous[0] + 1 if previous else 1})
        self._generations[new.key] = (numbered.generation, numbered)
        return numbered


def _serve(args: argparse.Namespace) -> int:
    if "-" in args.files:
        print("layerlb serve: files only (standard input cannot be watched for changes)", file=sys.stderr)
        return EXIT_INVALID
    return _run_dataplane(args, YamlFiles(args.files, args.poll_interval))


def _dataplane(args: argparse.Namespace) -> int:
    from layerlb_dataplane.control import kube_source

    if args.plan is not None:
        return _run_dataplane(args, config.PlanFile([args.plan], args.poll_interval))
    try:
        namespace, name = kube_source.parse_reference(args.plan_configmap)
    except ValueError as error:
        print(f"layerlb dataplane: --plan-configmap: {error}", file=sys.stderr)
        return EXIT_INVALID
    try:
        api = kube_source.KubeApi(kube_source.api_client())
    except OSError as error:
        print(f"layerlb dataplane: {error}", file=sys.stderr)
        return 1
    pod = os.environ.get("POD_NAME") or None
    return _run_dataplane(args, kube_source.ConfigMapSource(namespace, name, api, pod))


def parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    top = _Parser(prog="layerlb", description="LoadBalancer resources in, L4 and L7 load balancers out.")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    validate = sub.add_parser(
        "validate",
        help="check LoadBalancer, VIPPool, BGPPeer and BGPAdvertisement files; exit 2 when invalid",
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="multi-document YAML; - for stdin")
    validate.set_defaults(run=_validate)

    rend = sub.add_parser("render", help="print the configuration a LoadBalancer file renders to")
    rend.add_argument("--format", "-f", choices=formats.FORMATS, default="dataplane")
    rend.add_argument("files", nargs="+", metavar="FILE")
    rend.set_defaults(run=_render)

    crds = sub.add_parser("crd", help="print the CustomResourceDefinitions (or write them to a folder)")
    crds.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR (e.g. crds/)")
    crds.set_defaults(run=_crd)

    serve = sub.add_parser(
        "serve", help="run the data plane standalone from LoadBalancer files (reloads on change and SIGHUP)"
    )
    serve.add_argument("files", nargs="+", metavar="FILE", help="LoadBalancer YAML with static endpoints")
    _dataplane_options(serve)
    serve.set_defaults(run=_serve)

    plane = sub.add_parser(
        "dataplane",
        help="run the data plane from a Plan JSON file or the operator's ConfigMap (the forwarding pod)",
    )
    where = plane.add_mutually_exclusive_group(required=True)
    where.add_argument("--plan", metavar="PATH", help="as `layerlb render --format dataplane` writes")
    where.add_argument(
        "--plan-configmap",
        metavar="NAMESPACE/NAME",
        help="watch this ConfigMap through the Kubernetes API (in-cluster ServiceAccount, else the kubeconfig) "
        "and report what is served for the pod POD_NAME",
    )
    _dataplane_options(plane)
    plane.set_defaults(run=_dataplane)

    from layerlb_operator import main as operator_main  # stdlib-only at import; kopf loads when it runs

    operator = sub.add_parser(
        "operator", help="run the operator: LoadBalancers in, forwarding pods and status out"
    )
    operator_main.add_arguments(operator)
    operator.set_defaults(run=operator_main.main)

    from layerlb_speaker import main as speaker_main  # stdlib-only at import, like the operator's

    speaker = sub.add_parser(
        "speaker", help="run the L2 speaker of a node: answer ARP/NDP for the VIPs this node announces"
    )
    speaker_main.add_arguments(speaker)
    speaker.set_defaults(run=speaker_main.main)
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
