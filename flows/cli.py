"""The `editflow` command line: validate, run, rerun, restyle, serve.

    editflow validate MANIFEST
    editflow run MANIFEST --out URI [--model M] [--cache URI] [--shard-size N] [--runner local|dask]
    editflow rerun RUN_ID --out URI        (or: editflow rerun URI/runs/RUN_ID)
    editflow show RUN_ID --out URI         (or: editflow show URI/runs/RUN_ID)
    editflow restyle CATALOG --style "in watercolor style" [--style ...] --out URI
    editflow serve MANIFEST --out URI --cron "0 2 * * *"

Exit status: 0 when every edit succeeded (or was already finished), 1 when any failed, 2 for an invalid
manifest or bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Any


def _quiet_prefect_defaults() -> None:
    """Without a Prefect server configured, Prefect starts a temporary one: keep its exit clean
    (its task-run recorder logs flush errors at shutdown) and its logs to warnings; users may override."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    os.environ.setdefault(
        "TRANSFORMERS_VERBOSITY", "error"
    )  # import-time notes about optional packages
    # Prefect's first-run telemetry notice on a terminal: its documented client-side opt-out
    # (docs.prefect.io/v3/concepts/telemetry); the server side is PREFECT_SERVER_ANALYTICS_ENABLED above
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # diffusers' "install accelerate" note on every model load: accelerate only speeds up loading large
    # checkpoints with low_cpu_mem_usage; editflow loads once per worker. Read at import, so Dask workers
    # started from this process inherit it; HF_HUB_DISABLE_PROGRESS_BARS: no per-file download bars.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


EDITFLOW_LOGGERS = (
    "flows",
    "tasks",
    "editing",
    "storage",
    "manifests",
    "refmodel",
)  # what -v shows


def _common(p: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    p.add_argument(
        "--out",
        required=out_required,
        default=None,
        help="output root: folder, file://... or s3://bucket/prefix",
    )
    p.add_argument(
        "--s3-endpoint",
        default=None,
        help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)",
    )
    p.add_argument(
        "--runner",
        choices=("local", "dask"),
        default="local",
        help="shard fan-out (default: local, one worker per GPU)",
    )
    p.add_argument(
        "--dask-address", default=None, help="scheduler address of an existing Dask cluster"
    )
    p.add_argument(
        "--dask-workers", type=int, default=2, help="worker processes of a new local Dask cluster"
    )
    p.add_argument(
        "--dask-gpu",
        action="store_true",
        help="with --dask-address: each shard task asks for one GPU resource",
    )
    p.add_argument(
        "--threads", type=_positive_int, default=None,
        help="CPU threads per worker process (default: EDITFLOW_THREADS, else the CPUs divided by the workers on the machine)",
    )  # fmt: skip


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def _edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="",
        help="diffusers SD 1.x/2.x folder or hub id (default: the bundled reference model)",
    )
    p.add_argument("--cache", default="", help="inversion cache root (default: {out}/cache)")
    p.add_argument(
        "--shard-size", type=_positive_int, default=64, help="edits per shard task (default 64)"
    )
    p.add_argument("--format", dest="image_format", choices=("png", "jpeg", "webp"), default="png")
    p.add_argument(
        "--max-batch", type=_positive_int, default=8, help="targets per UNet batch (default 8)"
    )
    p.add_argument(
        "--cache-features",
        action="store_true",
        help="also cache PnP source features (see README: Performance)",
    )
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float16", "bfloat16", "float32"),
        help="default: float16 on CUDA, float32 on CPU",
    )
    p.add_argument("--run-id", default=None, help="run id (default: time + random suffix)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a checkpoint that only has pickle weights (they can run code)",
    )


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (what, and where to read more), exit status 2; no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="editflow",
        description="Bulk text-guided image editing (Prompt-to-Prompt, Plug-and-Play).",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="editflow's own log at INFO level"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser(
        "validate", help="check a manifest; report every problem with row, column and reason"
    )
    v.add_argument("manifest")
    v.add_argument("--s3-endpoint", default=None)
    v.add_argument(
        "--model",
        default="",
        help="also check that every prompt fits this model's text encoder (default: the bundled reference model)",
    )
    r = sub.add_parser("run", help="validate and run a manifest")
    r.add_argument("manifest")
    _common(r)
    _edit_args(r)
    rr = sub.add_parser(
        "rerun", help="finish a run: redo shards without results and failed rows only"
    )
    rr.add_argument("run_id", help="the run id (with --out), or the run's URI: OUT/runs/RUN_ID")
    _common(rr, out_required=False)
    # never taken from the stored plan (anyone who can write --out could change it); checked against it
    rr.add_argument(
        "--model",
        default="",
        help="the run's model, as given to `run` (default: the bundled reference model)",
    )
    rr.add_argument(
        "--cache",
        default="",
        help="the run's inversion cache, as given to `run` (default: {out}/cache)",
    )
    rr.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a checkpoint that only has pickle weights (they can run code)",
    )
    rs = sub.add_parser("restyle", help="a catalog (image_uri, caption) x styles as one bulk edit")
    rs.add_argument("catalog")
    rs.add_argument("--style", action="append", required=True, help="a style; repeat for several")
    rs.add_argument(
        "--template",
        default="{caption}, {style}",
        help='target prompt template (default "{caption}, {style}")',
    )
    rs.add_argument("--method", choices=("pnp", "p2p"), default="pnp")
    rs.add_argument(
        "--settings",
        default=None,
        help="the method's settings for every row, a JSON object (e.g. '{\"attn_t\": 0.8}')",
    )
    rs.add_argument("--image-column", default="image_uri")
    rs.add_argument("--caption-column", default="caption")
    _common(rs)
    _edit_args(rs)
    sh = sub.add_parser(
        "show", help="a finished or interrupted run: its summary, failures and report"
    )
    sh.add_argument(
        "run_id", metavar="RUN", help="the run id (with --out), or the run's URI: OUT/runs/RUN_ID"
    )
    sh.add_argument("--out", default=None, help="output root of the run (when RUN is a run id)")
    sh.add_argument("--s3-endpoint", default=None)
    sh.add_argument("--limit", type=int, default=50, help="failures listed (default 50; 0 = all)")
    sv = sub.add_parser(
        "serve", help="serve the bulk-edit flow on a cron schedule from this machine"
    )
    sv.add_argument("manifest")
    sv.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    sv.add_argument("--name", default="editflow-bulk-edit")
    _common(sv)
    _edit_args(sv)
    return parser


PROGRESS_LINE_SECONDS = 30.0  # without a terminal: at most one progress line per this many seconds


def _progress_mode() -> str:
    """``EDITFLOW_PROGRESS``: 1 = a progress bar even without a terminal, 0 = none; unset = a bar on a
    terminal, else a plain line on stderr now and then (logs and CI output stay readable)."""
    value = os.environ.get("EDITFLOW_PROGRESS", "").strip()
    if value == "0":
        return "off"
    if value == "1" or sys.stderr.isatty():
        return "bar"
    return "lines"


class _Progress:
    """Edits done / total and failures, fed per batch of edits from the shards (tasks.progress): a tqdm
    bar (with edits/s and the ETA), or periodic plain lines."""

    def __init__(self, mode: str):
        self.mode, self.bar, self.failed = mode, None, 0
        self.done = self.total = self.shards_done = self.shards = 0
        self.rate, self.eta = 0.0, None
        self.last_line = float("-inf")
        self.lock = threading.Lock()  # progress events come from worker threads

    def __call__(self, event: dict[str, Any]) -> None:
        if self.mode == "off":
            return
        if "planned" in event:
            self.total, self.shards = (
                event["planned"].get("pending", 0),
                event["planned"].get("shards", 0),
            )
            if self.mode == "bar":
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, unit="edit", desc="editing", file=sys.stderr)
            return
        if "progress" in event:  # per-edit counts from the shards (tasks.progress.RunWatch)
            snap = event["progress"]
            with self.lock:
                delta, self.done, self.failed, self.rate, self.eta = (
                    snap["done"] - self.done,
                    snap["done"],
                    snap["failed"],
                    snap["rate"],
                    snap["eta"],
                )
                if self.bar is not None and delta > 0:
                    self.bar.update(delta)  # tqdm shows edits/s and the ETA
                    self.bar.set_postfix(failed=self.failed)
            self._line(final=False)
            return
        self.shards_done += 1  # a finished shard (its edits arrived as progress events)
        self._line(final=self.shards_done >= self.shards)

    def _line(self, *, final: bool) -> None:
        if self.mode != "lines":
            return
        from tasks.progress import format_seconds

        now = time.monotonic()
        if now - self.last_line >= PROGRESS_LINE_SECONDS or final:
            self.last_line = now
            eta = "--" if self.eta is None else format_seconds(self.eta)
            print(f"progress: {self.done}/{self.total} edits, {self.failed} failed, {self.shards_done}/{self.shards} shards, "
                  f"{self.rate:.2f} edits/s, ETA {eta}", file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_summary(summary: dict[str, Any]) -> None:
    c = summary["counts"]
    secs = summary["seconds"]
    print(
        f"run {summary['run_id']}: {c['succeeded']} succeeded, {c['failed']} failed, {c['skipped']} skipped (of {summary['rows']})"
    )
    print(
        f"inversions: {summary['inversions_computed']} computed, {summary['inversion_cache_hits']} from cache; UNet evaluations: {summary['unet_evals']:.0f}"
    )
    print(f"time: {secs['wall']:.1f}s; results: {summary['results_uri']}")
    if summary.get("report_uri"):
        print(
            f"report: {summary['report_uri']} (and `editflow show {summary['run_id']} --out {summary['out']}`)"
        )
    for s in summary.get("failed_shards", []):
        print(f"failed {s}")
    rows = summary.get("failed_rows", [])
    for r in rows:
        reason = re.sub(r"^row \d+: ", "", r.get("error") or "")
        print(f"failed row {r['row']}, edit {r['edit_id']}: {reason}")
    if c["failed"] > len(rows):
        print(f"... and {c['failed'] - len(rows)} more failed row(s)")
    if c["failed"]:
        print(
            f"all failed rows: status 'failed' and their 'error' in {summary['results_uri']}; "
            f"`editflow rerun {summary['run_id']} --out {summary['out']}` retries them"
        )


def _bulk_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        model=args.model, cache=args.cache, shard_size=args.shard_size, s3_endpoint=args.s3_endpoint,
        run_id=args.run_id, image_format=args.image_format, max_batch=args.max_batch,
        cache_features=args.cache_features, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
        threads=args.threads,
    )  # fmt: skip


def _prompt_budget(model: str):
    """The token limit of the run's model (its tokenizer only; the weights are not loaded)."""
    from editing.prompts import prompt_budget
    from tasks.options import default_model

    return prompt_budget(model or default_model())


def _check(manifest: str, s3_endpoint: str | None, model: str) -> tuple[Any, list]:
    """Load and validate a manifest; when it is valid, also check its prompts against the model's tokenizer."""
    from manifests.validate import check_manifest, prompt_length_problems

    table, problems = check_manifest(manifest, s3_endpoint=s3_endpoint)
    if table is not None and not problems:
        problems = prompt_length_problems(table, _prompt_budget(model))
    return table, problems


def _restyle_problems(args: argparse.Namespace) -> list:
    """Build the restyle manifest here and check it (prompt lengths included) before any flow starts."""
    from manifests.build import restyle_manifest
    from manifests.validate import prompt_length_problems, validate_table

    table = restyle_manifest(
        args.catalog, args.style, template=args.template, method=args.method, image_column=args.image_column,
        caption_column=args.caption_column, settings=args.settings, s3_endpoint=args.s3_endpoint,
    )  # fmt: skip
    problems = validate_table(table) + prompt_length_problems(table, _prompt_budget(args.model))
    n = len(args.style)  # manifest row r = catalog row r // n with style r % n
    return [
        dataclasses.replace(
            p, reason=f"{p.reason} (catalog row {p.row // n}, style {args.style[p.row % n]!r})"
        )
        if p.row is not None
        else p
        for p in problems
    ]


EXIT_STORAGE = 3  # storage unreachable, denied, read-only or full (see describe_storage_error)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGTERM: 143)
_PROGRAM = {"on": False}  # main() called as the program (argv None): may start a server, exit hard


def main(argv: list[str] | None = None) -> int:
    """The CLI. Expected failures print one line (what, where, what to do) and exit with their status:
    2 bad arguments or run state, 3 storage; 130/143 interrupted. ``-v`` adds the traceback."""
    from storage.errors import describe_storage_error
    from tasks.errors import RunError

    _PROGRAM["on"] = argv is None
    verbose = any(a in ("-v", "--verbose") for a in (sys.argv[1:] if argv is None else argv))
    if _PROGRAM["on"]:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    except (KeyboardInterrupt, _Terminated) as exc:
        code = EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
        print(
            "editflow: interrupted; finished edits are kept: `editflow rerun RUN_ID --out OUT` finishes the run",
            file=sys.stderr,
        )
        if _PROGRAM["on"]:  # worker threads may be mid-shard: do not wait for them
            from flows.server import stop_temporary_server

            stop_temporary_server()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except Exception as exc:
        if isinstance(exc, RunError):
            line, code = str(exc), 2
        else:
            line, code = describe_storage_error(exc), EXIT_STORAGE
        if line is None:
            raise
        print(f"editflow: error: {line}", file=sys.stderr)
        if verbose:
            traceback.print_exc()
        return code


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run unwinds like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    raise _Terminated()


def _check_locations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad --out / --cache URIs and --run-id values are argument errors (exit 2), found before any work."""
    from storage.keys import check_id
    from storage.uri import split_uri

    for flag in ("out", "cache"):
        if getattr(args, flag, ""):
            try:
                split_uri(getattr(args, flag))
            except ValueError as exc:
                parser.error(f"--{flag}: {exc}")
    if getattr(args, "run_id", None):
        try:
            check_id(args.run_id, what="run_id")
        except ValueError as exc:
            parser.error(str(exc))
    if args.command in ("run", "rerun", "restyle", "serve"):
        from tasks.preflight import BadModel, check_model

        try:
            check_model(args.model, allow_pickle=args.allow_pickle)  # BadModel: one line, exit 2
        except BadModel:
            if args.command in ("run", "serve"):  # an invalid manifest is reported first, as before
                from manifests.validate import check_manifest

                if check_manifest(args.manifest, s3_endpoint=args.s3_endpoint)[1]:
                    return
            raise


def _preflight(args: argparse.Namespace) -> None:
    """Before any flow: --out must be writable (probe object), a rerun's run must exist; then the
    temporary Prefect server, when the CLI runs as the program and none is configured."""
    from storage.uri import check_writable, open_store

    check_writable(args.out, s3_endpoint=args.s3_endpoint)
    if args.command in ("run", "restyle") and args.run_id:
        from flows.bulk_edit import refuse_existing_run

        refuse_existing_run(open_store(args.out, s3_endpoint=args.s3_endpoint), args.run_id)
    if args.command == "rerun":
        from flows.bulk_edit import read_plan

        read_plan(open_store(args.out, s3_endpoint=args.s3_endpoint), args.run_id)
    from flows.server import quiet_prefect_failures, start_temporary_server

    if not args.verbose:
        quiet_prefect_failures()
    if _PROGRAM["on"]:
        start_temporary_server()


def _show(args: argparse.Namespace) -> int:
    """`editflow show`: the run's state, counts, failures and report (no Prefect, no model)."""
    from storage import keys
    from storage.base import NotFound
    from storage.uri import open_store
    from tasks.report import format_overview, run_overview

    store = open_store(args.out, s3_endpoint=args.s3_endpoint)
    try:
        info = run_overview(store, args.run_id)
    except NotFound:
        print(
            f"editflow: error: no run {args.run_id} under {store.uri()} (no {store.uri(keys.plan_key(args.run_id))})",
            file=sys.stderr,
        )
        return 2
    print(format_overview(info, limit=args.limit))
    return 0


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("rerun", "show"):  # RUN_ID --out URI, or the run's URI
        from tasks.report import resolve_run

        try:
            args.out, args.run_id = resolve_run(args.run_id, args.out)
        except ValueError as exc:
            parser.error(str(exc))
        if args.command == "show":
            return _show(args)
    _check_locations(parser, args)
    if args.command != "validate":
        from tasks.worker import THREADS_ENV, parse_threads

        try:
            parse_threads(os.environ.get(THREADS_ENV))
        except ValueError as exc:
            parser.error(str(exc))
    _quiet_prefect_defaults()
    # Dask's INFO lines only with -v (its worker processes inherit the variable)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if args.verbose else "warning")
    if args.command == "serve" and args.run_id:
        parser.error("serve: --run-id is not accepted: every scheduled run gets a new run id")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # editflow's own log at INFO; third-party libraries stay at warnings
        for name in EDITFLOW_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    if args.command == "validate":
        from manifests.validate import format_problems

        table, problems = _check(args.manifest, args.s3_endpoint, args.model)
        if problems:
            print(format_problems(problems, limit=1000))
            print(f"{args.manifest}: INVALID ({len(problems)} problem(s))")
            return 2
        print(f"{args.manifest}: valid ({table.num_rows} rows)")
        return 0

    from flows import bulk_edit as flows_mod
    from flows.runners import make_task_runner
    from manifests.validate import ManifestError, format_problems

    if args.command == "restyle":
        problems = _restyle_problems(args)
        if problems:
            print(format_problems(problems, limit=1000))
            print(
                f"{args.catalog}: the restyle manifest is INVALID ({len(problems)} problem(s)); nothing was run"
            )
            return 2
    if args.command in ("run", "serve"):
        _, problems = _check(args.manifest, args.s3_endpoint, args.model)
        if problems:
            print(format_problems(problems, limit=1000))
            print(f"{args.manifest}: INVALID ({len(problems)} problem(s)); nothing was run")
            return 2
    _preflight(args)
    runner, gpu = make_task_runner(
        args.runner,
        dask_address=args.dask_address,
        dask_workers=args.dask_workers,
        dask_gpu=args.dask_gpu,
        threads=args.threads,
    )
    if args.command == "serve":
        kwargs = {
            "manifest": args.manifest,
            "out": args.out,
            "gpu_resources": gpu,
            **_bulk_kwargs(args),
        }
        kwargs.pop("run_id")
        flows_mod.bulk_edit.with_options(task_runner=runner).serve(
            name=args.name, cron=args.cron, parameters=kwargs
        )
        return 0
    progress = _Progress(_progress_mode())
    flows_mod.set_progress_callback(progress)
    t0 = time.perf_counter()
    try:
        if args.command == "run":
            summary = flows_mod.bulk_edit.with_options(task_runner=runner)(
                args.manifest, args.out, gpu_resources=gpu, **_bulk_kwargs(args)
            )
        elif args.command == "rerun":
            summary = flows_mod.rerun.with_options(task_runner=runner)(
                args.run_id, args.out, s3_endpoint=args.s3_endpoint, gpu_resources=gpu, threads=args.threads,
                model=args.model, cache=args.cache, allow_pickle=args.allow_pickle,
            )  # fmt: skip
        else:
            summary = flows_mod.restyle.with_options(task_runner=runner)(
                args.catalog, args.style, args.out, template=args.template, method=args.method,
                image_column=args.image_column, caption_column=args.caption_column, settings=args.settings, gpu_resources=gpu, **_bulk_kwargs(args),
            )  # fmt: skip
    except ManifestError as exc:
        progress.close()
        print(format_problems(exc.problems, limit=1000))
        return 2
    finally:
        flows_mod.set_progress_callback(None)
    progress.close()
    _print_summary(summary)
    if args.verbose:
        print(json.dumps(summary, indent=2, default=str))
    logging.getLogger(__name__).debug("cli finished in %.1fs", time.perf_counter() - t0)
    if summary.get("summary_error"):  # the run's record could not be stored (e.g. a full disk)
        print(f"editflow: error: {summary['summary_error']}", file=sys.stderr)
        return EXIT_STORAGE
    return 0 if summary["counts"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
