"""The `editflow` command line: validate, run, rerun, restyle, serve.

    editflow validate MANIFEST
    editflow run MANIFEST --out URI [--model M] [--cache URI] [--shard-size N] [--runner local|dask]
    editflow rerun RUN_ID --out URI        (or: editflow rerun URI/runs/RUN_ID)
    editflow show RUN_ID --out URI         (or: editflow show URI/runs/RUN_ID)
    editflow restyle CATALOG --style "in watercolor style" [--style ...] --out URI
    editflow serve MANIFEST --out URI --cron "0 2 * * *"

Exit status: 0 when every edit succeeded (or was already finished), 1 when any failed, 2 for an invalid
manifest, bad arguments or a damaged run, 3 for storage (unwritable, unreachable, full), 130 / 143 when
interrupted. Every error is one line on stderr (``-v`` adds the traceback).
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
from collections.abc import Callable
from pathlib import Path
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


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text!r}")
    return n


def _settings_json(text: str) -> str:
    """restyle's --settings: kept as given, once it parses as a JSON object (deep nesting refused)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise argparse.ArgumentTypeError("JSON nested too deeply") from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return text


# The options' flags: each dest is the name of a RunOptions field (the CLI builds one from them).
def _location_args(p: argparse.ArgumentParser, *, out_required: bool = True) -> None:
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


def _runner_args(p: argparse.ArgumentParser) -> None:
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
        "--dask-workers",
        type=_positive_int,
        default=2,
        help="worker processes of a new local Dask cluster",
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


def _trusted_args(p: argparse.ArgumentParser, *, rerun: bool = False) -> None:
    """--model, --cache (and --allow-pickle): for a rerun never taken from the stored plan (anyone who can
    write --out could change it), but checked against it."""
    run = "the run's model, as given to `run`" if rerun else "diffusers SD 1.x/2.x folder or hub id"
    cache = "the run's inversion cache, as given to `run`" if rerun else "inversion cache root"
    p.add_argument("--model", default="", help=f"{run} (default: the bundled reference model)")
    p.add_argument("--cache", default="", help=f"{cache} (default: {{out}}/cache)")


def _pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a checkpoint that only has pickle weights (they can run code)",
    )


def _model_form_args(p: argparse.ArgumentParser) -> None:
    """How the model is had (README: Bring your model): a hub revision, fetching, a single file's
    config folder, LoRA adapters."""
    p.add_argument(
        "--revision", default=None,
        help="a hub id's commit, branch or tag (default: main); the run records the resolved commit",
    )  # fmt: skip
    p.add_argument(
        "--download", action="store_true",
        help="fetch a hub id (or hub LoRA) missing from the Hugging Face cache, once (safetensors only)",
    )  # fmt: skip
    p.add_argument(
        "--model-config", default="",
        help="a single-file --model's diffusers config folder (default: the bundled model's)",
    )  # fmt: skip
    p.add_argument(
        "--lora", dest="loras", metavar="FILE_OR_ID[@SCALE]", action="append", default=[],
        help="a LoRA adapter fused into the model at SCALE (default 1); repeat for several",
    )  # fmt: skip


def _edit_args(p: argparse.ArgumentParser) -> None:
    from tasks.options import DEFAULT_MAX_BATCH, DEFAULT_SHARD_SIZE, DTYPES, IMAGE_FORMATS

    _location_args(p)
    _runner_args(p)
    _trusted_args(p)
    p.add_argument(
        "--shard-size", type=_positive_int, default=DEFAULT_SHARD_SIZE,
        help=f"edits per shard task (default {DEFAULT_SHARD_SIZE})",
    )  # fmt: skip
    p.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default=IMAGE_FORMATS[0])
    p.add_argument(
        "--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH,
        help=f"targets per UNet batch (default {DEFAULT_MAX_BATCH})",
    )  # fmt: skip
    from storage.uri import DEFAULT_MAX_SOURCE_BYTES

    p.add_argument(
        "--max-source-bytes", type=_positive_int, default=DEFAULT_MAX_SOURCE_BYTES,
        help=f"bytes a source image may hold; a larger one is a row error (default {DEFAULT_MAX_SOURCE_BYTES})",
    )  # fmt: skip
    p.add_argument(
        "--cache-features",
        action="store_true",
        help="also cache PnP source features (see README: Performance)",
    )
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--dtype", default=None, choices=DTYPES, help="default: float16 on CUDA, float32 on CPU"
    )
    from tasks.options import COMPILE_MODES

    p.add_argument(
        "--compile", choices=COMPILE_MODES, default="off",
        help="torch.compile the UNet (reduce-overhead: CUDA graphs, CUDA only); see README: GPU levers",
    )  # fmt: skip
    p.add_argument("--run-id", default=None, help="run id (default: time + random suffix)")
    _pickle_arg(p)
    _model_form_args(p)


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (what, and where to read more), exit status 2; no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")


def _add_validate(sub) -> None:
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


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="validate and run a manifest")
    r.add_argument("manifest")
    _edit_args(r)


def _add_rerun(sub) -> None:
    rr = sub.add_parser(
        "rerun", help="finish a run: redo shards without results and failed rows only"
    )
    rr.add_argument("run_id", help="the run id (with --out), or the run's URI: OUT/runs/RUN_ID")
    _location_args(rr, out_required=False)
    _runner_args(rr)
    _trusted_args(rr, rerun=True)
    _pickle_arg(rr)


def _add_restyle(sub) -> None:
    from manifests import METHODS
    from tasks.options import RestyleSpec

    spec = {f.name: f.default for f in dataclasses.fields(RestyleSpec)}
    rs = sub.add_parser("restyle", help="a catalog (image_uri, caption) x styles as one bulk edit")
    rs.add_argument("catalog")
    rs.add_argument(
        "--style", dest="styles", metavar="STYLE", action="append", required=True,
        help="a style; repeat for several",
    )  # fmt: skip
    template = spec["template"]
    rs.add_argument(
        "--template", default=template, help=f'target prompt template (default "{template}")'
    )
    rs.add_argument("--method", choices=METHODS, default=spec["method"])
    rs.add_argument(
        "--settings",
        default=spec["settings"],
        type=_settings_json,
        help="the method's settings for every row, a JSON object (e.g. '{\"attn_t\": 0.8}')",
    )
    rs.add_argument("--image-column", default=spec["image_column"])
    rs.add_argument("--caption-column", default=spec["caption_column"])
    _edit_args(rs)


def _add_show(sub) -> None:
    sh = sub.add_parser(
        "show", help="a finished or interrupted run: its summary, failures and report"
    )
    sh.add_argument(
        "run_id", metavar="RUN", help="the run id (with --out), or the run's URI: OUT/runs/RUN_ID"
    )
    sh.add_argument("--out", default=None, help="output root of the run (when RUN is a run id)")
    sh.add_argument("--s3-endpoint", default=None)
    sh.add_argument(
        "--limit", type=_count, default=50, help="failures listed (default 50; 0 = all)"
    )


def _add_serve(sub) -> None:
    sv = sub.add_parser(
        "serve", help="serve the bulk-edit flow on a cron schedule from this machine"
    )
    sv.add_argument("manifest")
    sv.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    sv.add_argument("--name", default="editflow-bulk-edit")
    _edit_args(sv)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="editflow",
        description="Bulk text-guided image editing (Prompt-to-Prompt, Plug-and-Play).",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="editflow's own log at INFO level"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_validate, _add_run, _add_rerun, _add_restyle, _add_show, _add_serve):
        add(sub)
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


def _prompt_budget(model: str, model_config: str = ""):
    """The token limit of the run's model (its tokenizer only; the weights are not loaded)."""
    from editing.prompts import prompt_budget
    from tasks.options import RunOptions

    return prompt_budget(RunOptions(out=".", model=model, model_config=model_config).tokenizer_ref)


def _prepare(args: argparse.Namespace, *, prompts: bool = True):
    """Check the manifest in one streaming pass (:func:`manifests.stream.scan_manifest`, as planning
    does); with `prompts`, its prompts are checked against the model's tokenizer as well."""
    from manifests.stream import scan_manifest

    budget = _prompt_budget(args.model, getattr(args, "model_config", "")) if prompts else None
    return scan_manifest(args.manifest, s3_endpoint=args.s3_endpoint, budget=budget)


def _report_invalid(args: argparse.Namespace, problems: list) -> int:
    """Print a manifest's problems and that nothing was run; exit status 2."""
    from manifests import format_problems

    print(format_problems(problems, limit=1000))
    if args.command == "restyle":
        what = f"{args.catalog}: the restyle manifest is INVALID"
    else:
        what = f"{args.manifest}: INVALID"
    ran = "" if args.command == "validate" else "; nothing was run"
    print(f"{what} ({len(problems)} problem(s)){ran}")
    return 2


EXIT_STORAGE = 3  # storage unreachable, denied, read-only or full (see describe_storage_error)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGTERM: 143)
_PROGRAM = {"on": False}  # main() called as the program (argv None): may start a server, exit hard


def main(argv: list[str] | None = None) -> int:
    """The CLI, and its one error boundary: every failure prints one line (what, where, what to do) on
    stderr and exits with its status: 2 bad arguments, input or run state, 3 storage; 130/143
    interrupted; 1 an unexpected error (``-v`` adds the traceback). As the program, it ends the process
    itself (:func:`_end_process`)."""
    _PROGRAM["on"] = argv is None
    verbose = any(a in ("-v", "--verbose") for a in (sys.argv[1:] if argv is None else argv))
    if _PROGRAM["on"]:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = _main(argv)
    except SystemExit as exc:  # argparse: -h, or an argument error (its one line is printed)
        if not _PROGRAM["on"]:
            raise
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
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
        line, code = error_line(exc)
        print(f"editflow: error: {line}", file=sys.stderr)
        if verbose:
            traceback.print_exc()
    if _PROGRAM["on"]:
        _end_process(code)
    return code


MAX_ERROR_LINE = 1000  # characters of an error line (a message may quote a long input)


def error_line(exc: BaseException) -> tuple[str, int]:
    """The one line (credentials redacted) and the exit status for `exc`: ``StorageUnusable`` and storage
    failures 3; run state (``RunError``), bad input (``ValueError``, too deep nesting) and arguments
    boto3 refuses 2; anything else 1, as an unexpected error."""
    from flows.runners import ClusterUnreachable
    from storage.endpoints import redact
    from storage.errors import describe_storage_error, is_bad_parameter
    from tasks.errors import RunError, StorageUnusable

    described = None if isinstance(exc, RunError) else describe_storage_error(exc)
    if isinstance(exc, (StorageUnusable, ClusterUnreachable)):
        line, code = str(exc), EXIT_STORAGE
    elif described is not None:
        line, code = described, EXIT_STORAGE
    elif isinstance(exc, RecursionError):
        line, code = "the input is nested too deeply (JSON or settings); flatten it", 2
    elif isinstance(exc, ValueError) or is_bad_parameter(exc):
        line, code = str(exc), 2  # RunError and ManifestError too; boto3's check of a parameter
    else:
        line = f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)"
        code = 1
    line = " ".join(redact(line).split()) or type(exc).__name__
    if len(line) > MAX_ERROR_LINE:
        line = line[: MAX_ERROR_LINE - 3] + "..."
    return line, code


def _end_process(code: int) -> None:
    """End the program without the C++ static destructors: Arrow's thread pool, torn down while a worker
    thread is still joinable, made 1 exit in 10 abort with "terminate called without an active
    exception" (SIGABRT, status 134). Python's own exit steps run first: wait for non-daemon threads, then
    the atexit handlers (Prefect's, the temporary server's), then flush."""
    # what the interpreter itself does first: wake idle thread pools (their exit hooks) and join the
    # non-daemon threads; joining them here instead would wait forever on a pool never shut down
    threading._shutdown()  # type: ignore[attr-defined]
    import atexit

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`editflow show ... | head`)
            pass
    os._exit(code)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run unwinds like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    raise _Terminated()


def _check_locations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad --out / --cache URIs (an empty one, an S3 bucket name boto3 cannot send, a file where a folder
    goes), a bad --s3-endpoint (credentials in it included) and bad --run-id values are argument errors
    (exit 2), found before any work."""
    from storage.endpoints import check_bucket, check_endpoint
    from storage.keys import check_id
    from storage.uri import split_uri

    for flag in ("out", "cache"):
        value = getattr(args, flag, None)
        if value is None or (flag == "cache" and value == ""):  # no --cache: {out}/cache
            continue
        try:
            scheme, bucket, path = split_uri(value)
            if scheme == "s3":
                check_bucket(bucket, what=f"--{flag}")
            elif os.path.lexists(path) and not os.path.isdir(path):
                raise ValueError(f"{path} exists and is not a folder")
        except ValueError as exc:
            parser.error(str(exc) if str(exc).startswith(f"--{flag}") else f"--{flag}: {exc}")
    if getattr(args, "s3_endpoint", None) is not None:
        try:
            check_endpoint(args.s3_endpoint)
        except ValueError as exc:
            parser.error(str(exc))
    if getattr(args, "run_id", None):
        try:
            check_id(args.run_id, what="run_id")
        except ValueError as exc:
            parser.error(str(exc))


def _check_model(args: argparse.Namespace) -> list:
    """``BadModel`` (one line, exit 2) for a model that cannot be used, found before any work. For `run`,
    `serve` and `validate` an invalid manifest is reported first: then its problems are returned instead."""
    from tasks.preflight import BadModel, check_model

    try:
        forms = ("revision", "download", "loras", "model_config")
        commit = check_model(
            args.model, allow_pickle=getattr(args, "allow_pickle", False),
            **{k: getattr(args, k) for k in forms if hasattr(args, k)},
        )  # fmt: skip
        if commit and hasattr(args, "revision"):
            args.revision = commit  # the run (plan, workers, sidecars) pins the resolved commit
    except BadModel:
        if args.command in ("run", "serve", "validate"):
            problems = _prepare(args, prompts=False).problems  # no tokenizer: the model is bad
            if problems:
                return problems
        raise
    return []


def _check_environment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """EDITFLOW_THREADS must parse; --device must be one this machine has; serve takes no --run-id."""
    if getattr(args, "device", None) is not None:
        from tasks.preflight import BadDevice, check_device

        try:
            check_device(args.device)
        except BadDevice as exc:
            parser.error(str(exc))
    if args.command != "validate":
        from tasks.worker import THREADS_ENV, parse_threads

        try:
            parse_threads(os.environ.get(THREADS_ENV))
        except ValueError as exc:
            parser.error(str(exc))
    if args.command == "serve" and args.run_id:
        parser.error("serve: --run-id is not accepted: every scheduled run gets a new run id")


def _configure_logging(args: argparse.Namespace) -> None:
    """Quiet third-party output (Prefect, Dask, Hugging Face); editflow's own log at INFO with -v."""
    _quiet_prefect_defaults()
    # Dask's INFO lines only with -v (its worker processes inherit the variable)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if args.verbose else "warning")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # editflow's own log at INFO; third-party libraries stay at warnings
        for name in EDITFLOW_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)


def _absent_folder(uri: str) -> Path | None:
    """The outermost folder of a local output root that does not exist yet (None: S3, or it exists)."""
    from storage.uri import split_uri

    scheme, _, path = split_uri(uri)
    folder = Path(path)
    if scheme == "s3" or folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


def _remove_empty_folders(folders: list[Path | None]) -> None:
    """Remove each folder and the folders below it that hold no file (what the write probes made)."""
    for folder in folders:
        if folder is None:
            continue
        for dirpath, _dirs, _files in os.walk(folder, topdown=False):
            try:
                os.rmdir(dirpath)  # only an empty folder
            except OSError:
                pass


def _preflight(args: argparse.Namespace) -> None:
    """Before any flow: --out and a given --cache must be writable (probe objects; ``StorageUnusable``,
    exit 3), a rerun's run must exist; then the temporary Prefect server, when the CLI runs as the
    program and none is configured."""
    from storage.uri import open_store
    from tasks.preflight import probe_location
    from tasks.runs import read_plan, refuse_existing_run

    probe_location(args.out, flag="--out", s3_endpoint=args.s3_endpoint)
    if args.cache:
        probe_location(args.cache, flag="--cache", s3_endpoint=args.s3_endpoint)
    if args.command in ("run", "restyle") and args.run_id:
        refuse_existing_run(open_store(args.out, s3_endpoint=args.s3_endpoint), args.run_id)
    if args.command == "rerun":
        read_plan(open_store(args.out, s3_endpoint=args.s3_endpoint), args.run_id)
    from flows.server import quiet_prefect_failures, start_temporary_server

    if not args.verbose:
        quiet_prefect_failures()
    if _PROGRAM["on"]:
        start_temporary_server()


def _run_options(args: argparse.Namespace):
    """The run's options from the command line: every flag named after a RunOptions field."""
    from tasks.options import RunOptions

    given = vars(args)
    return RunOptions(
        **{f.name: given[f.name] for f in dataclasses.fields(RunOptions) if f.name in given}
    )


def _task_runner(args: argparse.Namespace):
    from flows.runners import make_task_runner

    return make_task_runner(
        args.runner,
        dask_address=args.dask_address,
        dask_workers=args.dask_workers,
        dask_gpu=args.dask_gpu,
        threads=args.threads,
    )


def _execute(args: argparse.Namespace, start: Callable[[Any, bool], dict[str, Any]]) -> int:
    """Run a flow (`start(task_runner, gpu_resources)` calls it) with the progress display; print its
    summary. Exit status 0 when every edit succeeded, 1 when any failed, 2 for an invalid manifest
    (nothing was run, nothing is left: the folders the write probes made are removed, as for any error
    before the run has a plan), 3 when storage failed (the summary or any output could not be stored)."""
    from flows import bulk_edit as flows_mod
    from manifests import ManifestError

    absent = [_absent_folder(uri) for uri in (args.out, args.cache) if uri]
    progress = _Progress(_progress_mode())
    t0 = time.perf_counter()
    try:
        _preflight(args)
        runner, gpu = _task_runner(args)
        flows_mod.set_progress_callback(progress)
        summary = start(runner, gpu)
    except ManifestError as exc:
        _remove_empty_folders(absent)
        return _report_invalid(args, exc.problems)
    except Exception:
        _remove_empty_folders(absent)  # only folders that hold no file: a started run keeps its own
        raise
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
    # edits failed because storage did (full, read-only...): fixing the rows would not help
    storage = summary.get("storage_failures")
    if storage:
        print(f"editflow: error: {_storage_failures_line(summary)}", file=sys.stderr)
        return EXIT_STORAGE
    return 0 if summary["counts"]["failed"] == 0 else 1


def _storage_failures_line(summary: dict[str, Any]) -> str:
    """One line for a run whose edits or shards failed because storage did (credentials redacted)."""
    from storage.endpoints import redact

    f = summary["storage_failures"]
    error = re.sub(r"^(row \d+|shard \d+): ", "", f["error"])
    return redact(
        f"storage failed during run {summary['run_id']}: {f['edits']} edit(s) and {f['shards']} "
        f"shard(s) could not be written ({error}); fix the storage, then "
        f"`editflow rerun {summary['run_id']} --out {summary['out']}`"
    )


def _validate(args: argparse.Namespace) -> int:
    """`editflow validate`: every problem of the manifest (prompt lengths included), or its row count."""
    prepared = _prepare(args)
    if prepared.problems:
        print(prepared.report(limit=1000))
        print(f"{args.manifest}: INVALID ({prepared.total} problem(s))")
        return 2
    print(f"{args.manifest}: valid ({prepared.rows} rows)")
    return 0


def _run(args: argparse.Namespace) -> int:
    """`editflow run`: the bulk-edit flow (its plan task validates the manifest)."""
    from flows.bulk_edit import bulk_edit

    options = _run_options(args)
    return _execute(
        args,
        lambda runner, gpu: bulk_edit.with_options(task_runner=runner)(
            args.manifest, options, run_id=args.run_id, gpu_resources=gpu
        ),
    )


def _rerun(args: argparse.Namespace) -> int:
    """`editflow rerun`: finish a run (its plan supplies the options the command line does not)."""
    from flows.bulk_edit import rerun

    options = _run_options(args)
    return _execute(
        args,
        lambda runner, gpu: rerun.with_options(task_runner=runner)(
            args.run_id, options, gpu_resources=gpu
        ),
    )


def _restyle(args: argparse.Namespace) -> int:
    """`editflow restyle`: the catalog x styles manifest, edited in one run."""
    from flows.bulk_edit import restyle
    from tasks.options import RestyleSpec

    spec = RestyleSpec(
        styles=args.styles, template=args.template, method=args.method,
        image_column=args.image_column, caption_column=args.caption_column, settings=args.settings,
    )  # fmt: skip
    options = _run_options(args)
    return _execute(
        args,
        lambda runner, gpu: restyle.with_options(task_runner=runner)(
            args.catalog, spec, options, run_id=args.run_id, gpu_resources=gpu
        ),
    )


def _serve(args: argparse.Namespace) -> int:
    """`editflow serve`: check the manifest once (no run), then serve the flow on its schedule."""
    from flows.bulk_edit import bulk_edit

    problems = _prepare(args).problems
    if problems:
        return _report_invalid(args, problems)
    _preflight(args)
    runner, gpu = _task_runner(args)
    parameters = {
        "manifest": args.manifest,
        "options": _run_options(args).to_dict(),  # stored as JSON; the flow coerces it back
        "gpu_resources": gpu,
    }
    bulk_edit.with_options(task_runner=runner).serve(
        name=args.name, cron=args.cron, parameters=parameters
    )
    return 0


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


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "validate": _validate,
    "run": _run,
    "rerun": _rerun,
    "restyle": _restyle,
    "serve": _serve,
}


def _resolve_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """RUN_ID --out URI, or the run's URI: sets args.out and args.run_id."""
    from tasks.report import resolve_run

    try:
        args.out, args.run_id = resolve_run(args.run_id, args.out)
    except ValueError as exc:
        parser.error(str(exc))


def _main(argv: list[str] | None = None) -> int:
    from flows.runners import check_scheduler

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("rerun", "show"):
        _resolve_run(parser, args)
    _check_locations(parser, args)
    if args.command == "show":
        return _show(args)
    if getattr(args, "dask_address", None):  # before the slow imports: one line, exit 3
        check_scheduler(args.dask_address)
    invalid = _check_model(args)
    _check_environment(parser, args)
    _configure_logging(args)
    if invalid:
        return _report_invalid(args, invalid)
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
