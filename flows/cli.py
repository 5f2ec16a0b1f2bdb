"""The `editflow` command line: validate, run, rerun, restyle, serve.

    editflow validate MANIFEST
    editflow run MANIFEST --out URI [--model M] [--cache URI] [--shard-size N] [--runner local|dask]
    editflow rerun RUN_ID --out URI        (or: editflow rerun URI/runs/RUN_ID)
    editflow show RUN_ID --out URI         (or: editflow show URI/runs/RUN_ID)
    editflow runs --out URI                (the runs under URI, newest first; RUN_ID may be `latest`)
    editflow restyle CATALOG --style "in watercolor style" [--style ...] --out URI
    editflow serve MANIFEST --out URI --cron "0 2 * * *"
    editflow warm                          (a warm worker: later commands run in its forked children)

Exit status: 0 when every edit succeeded (or was already finished), 1 when any failed (`show`: when the
run has failed edits), 2 for an invalid manifest, bad arguments or a damaged run, 3 for storage
(unwritable, unreachable, full), 130 / 143 when interrupted. Every error is one line on stderr (``-v``, before
or after the command, adds the traceback).

Start-up: every check that needs no Prefect (arguments, the manifest's files, --out, the model, the
device) runs before the flow; a run with nothing to do ends there. A temporary Prefect server is launched
in the background only when a run will happen and no server is known (PREFECT_API_URL, or the one a
running `editflow serve` recorded: see :mod:`flows.server`).
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


def _qa_spec(text: str) -> str:
    """--qa: a gate spec editing.judge.parse_gate reads ('text>=0.1', rules joined by ',', or 'off')."""
    from editing.gate import parse_gate

    try:
        return parse_gate(text).spec
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _qa_args(p: argparse.ArgumentParser) -> None:
    """--qa: the edit-QA review gate (README: Edit QA)."""
    from editing.gate import DEFAULT_GATE

    p.add_argument(
        "--qa", type=_qa_spec, default=None, metavar="GATE",
        help=f"edit-QA review gate: flag edits whose judge score fails it, e.g. 'text>=0.1'; 'off' = no "
        f"judging (default {DEFAULT_GATE!r})",
    )  # fmt: skip
    p.add_argument(
        "--qa-model", dest="qa_model", default=None, metavar="CLIP",
        help="also score each edit's CLIP directional similarity with this CLIP model (a hub id or a "
        "folder; transformers' CLIPModel): the qa_clip column, gate rules like 'clip>=0.1'",
    )  # fmt: skip
    p.add_argument(
        "--qa-derived", dest="qa_derived", type=int, default=0, metavar="N",
        help="also judge a word-swap edit against N (0-2) prompts with the swapped word replaced by its "
        "nearest words in the text encoder's vocabulary; the gate's 'derived' rule applies to them "
        "(default 0; README: Edit QA)",
    )  # fmt: skip


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
    from tasks.options import (
        COMPILE_MODES,
        DEFAULT_MAX_BATCH,
        DEFAULT_SHARD_SIZE,
        DTYPES,
        IMAGE_FORMATS,
        OUTPUT_SIZES,
    )

    _location_args(p)
    _runner_args(p)
    _trusted_args(p)
    p.add_argument(
        "--shard-size", type=_positive_int, default=None,
        help=f"edits per shard task (default: {DEFAULT_SHARD_SIZE}, or rows / 10,000 when more)",
    )  # fmt: skip
    p.add_argument(
        "--format", dest="image_format", choices=IMAGE_FORMATS, default=IMAGE_FORMATS[0],
        help=f"file format of the edited images (default {IMAGE_FORMATS[0]})",
    )  # fmt: skip
    p.add_argument(
        "--output-size", choices=OUTPUT_SIZES, default="source",
        help="source (default): each edit at its source image's pixel size; model: as the model made it "
        "(about its native area, the source's aspect ratio within one latent cell)",
    )  # fmt: skip
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
    v.add_argument(
        "--no-check-sources", dest="check_sources", action="store_false",
        help="skip checking that every image_uri is a readable file or object (a stat or HEAD each)",
    )  # fmt: skip


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="validate and run a manifest")
    r.add_argument("manifest")
    _edit_args(r)
    _qa_args(r)


def _add_rerun(sub) -> None:
    rr = sub.add_parser(
        "rerun", help="finish a run: redo shards without results and failed rows only"
    )
    rr.add_argument(
        "run_id", help="the run id or `latest` (with --out), or the run's URI: OUT/runs/RUN_ID"
    )
    _location_args(rr, out_required=False)
    _runner_args(rr)
    _trusted_args(rr, rerun=True)
    _pickle_arg(rr)
    rr.add_argument(
        "--needs-review", action="store_true",
        help="instead: re-edit the edits the run's QA gate flagged, with --settings, as a new run "
        "(new edit ids: the original's plus a settings hash; the originals kept)",
    )  # fmt: skip
    rr.add_argument(
        "--settings", type=_settings_json, default=None,
        help="with --needs-review: settings over each flagged edit's own, a JSON object (e.g. '{\"attn_t\": 0.8}')",
    )  # fmt: skip


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
    rs.add_argument(
        "--method", choices=METHODS, default=spec["method"],
        help=f"editing method of every row (default {spec['method']})",
    )  # fmt: skip
    rs.add_argument(
        "--settings",
        default=spec["settings"],
        type=_settings_json,
        help="the method's settings for every row, a JSON object (e.g. '{\"attn_t\": 0.8}')",
    )
    rs.add_argument(
        "--image-column", default=spec["image_column"],
        help=f"the catalog's column of image URIs (default {spec['image_column']})",
    )  # fmt: skip
    rs.add_argument(
        "--caption-column", default=spec["caption_column"],
        help=f"the catalog's column of captions, the source prompts (default {spec['caption_column']})",
    )  # fmt: skip
    _edit_args(rs)
    _qa_args(rs)


def _add_show(sub) -> None:
    sh = sub.add_parser(
        "show", help="a finished or interrupted run: its summary, failures and report"
    )
    sh.add_argument(
        "run_id", metavar="RUN",
        help="the run id or `latest` (with --out), or the run's URI: OUT/runs/RUN_ID",
    )  # fmt: skip
    sh.add_argument("--out", default=None, help="output root of the run (when RUN is a run id)")
    sh.add_argument("--s3-endpoint", default=None)
    sh.add_argument(
        "--limit", type=_count, default=50, help="failures listed (default 50; 0 = all)"
    )


def _add_runs(sub) -> None:
    rl = sub.add_parser("runs", help="the runs under an output root, newest first")
    _location_args(rl)
    rl.add_argument("--limit", type=_count, default=20, help="runs listed (default 20; 0 = all)")


def _add_serve(sub) -> None:
    sv = sub.add_parser(
        "serve", help="serve the bulk-edit flow on a cron schedule from this machine"
    )
    sv.add_argument("manifest")
    sv.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    sv.add_argument(
        "--name", default="editflow-bulk-edit",
        help="the Prefect deployment's name (default editflow-bulk-edit)",
    )  # fmt: skip
    _edit_args(sv)
    _qa_args(sv)
    for action in sv._actions:  # every scheduled run takes a new run id: refused, so not shown
        if action.dest == "run_id":
            action.help = argparse.SUPPRESS


def _add_warm(sub) -> None:
    w = sub.add_parser(
        "warm",
        help="keep the heavy modules loaded: run, rerun, restyle, validate run in its forked children",
    )
    w.add_argument(
        "--no-server", dest="keep_server", action="store_false",
        help="keep no Prefect server for the commands (default: PREFECT_API_URL, else a temporary one)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="editflow",
        description="Bulk text-guided image editing (Prompt-to-Prompt, Plug-and-Play).",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="editflow's own log at INFO level"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_validate,
        _add_run,
        _add_rerun,
        _add_restyle,
        _add_show,
        _add_runs,
        _add_serve,
        _add_warm,
    ):
        add(sub)
    for (
        command
    ) in sub.choices.values():  # -v after the command too; SUPPRESS keeps one given before
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
            help="editflow's own log at INFO level",
        )  # fmt: skip
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("editflow")
    except PackageNotFoundError:  # a checkout that is not installed
        return "unknown"


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
        self.stages_seen: set[str] = set()
        self.last_line = float("-inf")
        self.lock = threading.Lock()  # progress events come from worker threads

    def __call__(self, event: dict[str, Any]) -> None:
        if self.mode == "off":
            return
        if "stage" in event:  # a shard's stage (tasks.progress.ShardProgress.stage), or the flow's
            self._stage(event["stage"])
            return
        if "planned" in event:
            planned = event["planned"]
            self.total, self.shards = planned.get("pending", 0), planned.get("shards", 0)
            _stage(_planned_line(planned))
            if self.mode == "bar" and self.total:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, unit="edit", desc="editing", file=sys.stderr)
                _BAR[0] = self.bar
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

    def _stage(self, stage: dict[str, Any]) -> None:
        """The first time each stage is reached: its line (later shards repeat the stages silently)."""
        name = stage.get("name", "")
        with self.lock:
            if name in self.stages_seen:
                return
            self.stages_seen.add(name)
        _stage(_STAGE_LINES.get(name, name).format(**stage))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = _BAR[0] = None


# a shard's stages (tasks.shard publishes them through tasks.progress) and the flow's, as lines
_STAGE_LINES = {
    "model": "loading the model {model}",
    "invert": "inverting {sources} source(s) (or reading them from the cache)",
    "edit": "editing {edits} edit(s)",
    "write": "writing {edits} edit(s)",
    "report": "writing the report",
}


def _planned_line(planned: dict[str, Any]) -> str:
    """``planned 9 edits (0 skipped), 3 sources, 1 shard`` (a rerun: the shards and edits it redoes)."""
    shards = planned.get("shards", 0)
    text = f"planned {planned.get('pending', 0)} edit(s)"
    if "skipped" in planned:
        text += f" ({planned['skipped']} skipped: finished earlier)"
    if "sources" in planned:
        text += f", {planned['sources']} source(s)"
    return text + f", {shards} shard(s)"


_T0 = [time.monotonic()]  # when the command started: stage lines show the seconds since


def _stage(text: str) -> None:
    """One stage line on stderr (a terminal or a log), with the seconds since the command started;
    none with EDITFLOW_PROGRESS=0."""
    if _progress_mode() == "off":
        return
    line = f"editflow {time.monotonic() - _T0[0]:5.1f}s  {text}"
    bar = _BAR[0]
    if bar is not None:
        bar.write(line, file=sys.stderr)  # above the progress bar, not through it
    else:
        print(line, file=sys.stderr, flush=True)


_BAR: list[Any] = [None]  # the progress bar while it is shown


def _command(
    args: argparse.Namespace | None, verb: str, run_id: str | None, out: str | None = None
) -> str:
    """The full command a hint gives: ``editflow VERB [RUN_ID] --out OUT [--s3-endpoint URL]``."""
    out = out or (args.out if args is not None else ".")
    parts = ["editflow", verb] + ([run_id] if run_id else []) + ["--out", _quote(out)]
    endpoint = getattr(args, "s3_endpoint", None)
    if endpoint:
        parts += ["--s3-endpoint", _quote(endpoint)]
    return " ".join(parts)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _print_summary(summary: dict[str, Any], args: argparse.Namespace | None = None) -> None:
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
        show = _command(args, "show", summary["run_id"], summary["out"])
        print(f"report: {summary['report_uri']} (and `{show}`)")
    if summary.get("needs_review"):  # edit QA: the show command lists them, worst first
        again = _command(args, "rerun", summary["run_id"], summary["out"])
        print(f"needs review: {summary['needs_review']} succeeded edit(s) (QA gate {summary['qa']['gate']}); "
              f"`{again} --needs-review --settings JSON` re-edits them")  # fmt: skip
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
            f"`{_command(args, 'rerun', summary['run_id'], summary['out'])}` retries them"
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
    # a warm worker (`editflow warm`) answering runs the command in its forked child (flows.warm)
    if _PROGRAM["on"]:
        from flows.warm import hand_over

        handed = hand_over(sys.argv[1:])
        if handed is not None:
            return handed
    _T0[0] = time.monotonic()
    _ARGS.clear()
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
        print(f"editflow: interrupted; {_interrupted_hint()}", file=sys.stderr)
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


def _interrupted_hint() -> str:
    """What to do after an interrupt, with the run's real id and the full command when they are known."""
    args = _ARGS[0] if _ARGS else None
    run_id = getattr(args, "run_id", None)
    if args is None or args.command not in _FLOW_COMMANDS or not run_id or not args.out:
        return "finished edits are kept: `editflow rerun RUN_ID --out OUT` finishes the run"
    return f"finished edits are kept: `{_command(args, 'rerun', run_id)}` finishes run {run_id}"


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
    if args.command in ("run", "restyle", "serve") and getattr(args, "run_id", None) == LATEST:
        parser.error(f"--run-id {LATEST}: that word names the newest run; choose another id")
    if getattr(args, "run_id", None):
        try:
            check_id(args.run_id, what="run_id")
        except ValueError as exc:
            parser.error(str(exc))


def _check_model(args: argparse.Namespace) -> list:
    """``BadModel`` (one line, exit 2) for a model that cannot be used, found before any work. For `run`,
    `serve` and `validate` an invalid manifest is reported first: then its problems are returned instead."""
    from tasks.preflight import BadModel, check_model, check_qa_model

    try:
        forms = ("revision", "download", "loras", "model_config")
        commit = check_model(
            args.model, allow_pickle=getattr(args, "allow_pickle", False),
            **{k: getattr(args, k) for k in forms if hasattr(args, k)},
        )  # fmt: skip
        if commit and hasattr(args, "revision"):
            args.revision = commit  # the run (plan, workers, sidecars) pins the resolved commit
        check_qa_model(getattr(args, "qa_model", None), download=getattr(args, "download", False))
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
    exit 3), a given run id free, a rerun's run must exist."""
    from storage.uri import open_store
    from tasks.preflight import probe_location
    from tasks.runs import read_plan, refuse_existing_run

    probe_location(args.out, flag="--out", s3_endpoint=args.s3_endpoint)
    if args.cache:
        probe_location(args.cache, flag="--cache", s3_endpoint=args.s3_endpoint)
    if args.command in ("run", "restyle") and args.run_id:
        store = open_store(args.out, s3_endpoint=args.s3_endpoint)
        refuse_existing_run(store, args.run_id, s3_endpoint=args.s3_endpoint)
    if args.command == "rerun":
        read_plan(open_store(args.out, s3_endpoint=args.s3_endpoint), args.run_id)


def _what(args: argparse.Namespace) -> str:
    if args.command == "rerun":
        return f"run {args.run_id}"
    return args.catalog if args.command == "restyle" else args.manifest


def _before_the_server(args: argparse.Namespace) -> int | None:
    """`run`, `rerun`, `restyle`: the checks that need neither Prefect nor the model, in the order of
    their cost: the manifest's files (footers only; restyle: the catalog, read), --out and --cache
    writable, the run id; then whether a run has anything to do. Returns the exit status to end with (2: an invalid manifest;
    0: every edit is already finished, and nothing was written), or None to go on."""
    from manifests import ManifestError

    args.created_folders = [_absent_folder(uri) for uri in (args.out, args.cache) if uri]
    try:
        if args.command == "run":
            from manifests.stream import open_manifest

            # gone, unreadable, files that disagree: one line, exit 2
            open_manifest(args.manifest, s3_endpoint=args.s3_endpoint)
        if args.command == "restyle":
            from manifests.build import read_catalog

            # gone, not .csv / .parquet, unreadable
            read_catalog(args.catalog, s3_endpoint=args.s3_endpoint)
        _preflight(args)
        if args.command == "run":
            from tasks.preflight import finished_rows

            rows = finished_rows(args.manifest, args.out, s3_endpoint=args.s3_endpoint)
            if rows is not None:
                _remove_empty_folders(args.created_folders)
                runs = _command(args, "runs", None)
                # no prompt-length check: it needs the model's tokenizer (seconds of imports) and
                # checks edits to make; validate checks every row
                validate = f"editflow validate {_quote(args.manifest)}" + (
                    f" --model {_quote(args.model)}" if args.model else "")  # fmt: skip
                print(f"nothing to do: all {rows} edits of {args.manifest} are finished under "
                      f"{args.out}; no run was started (`{runs}` lists the earlier runs; prompt "
                      f"lengths are checked only for edits to make: `{validate}` checks every row)")  # fmt: skip
                return 0
        if args.command == "rerun" and not args.needs_review:
            summary = _complete_run(args)
            if summary is not None:
                c = summary["counts"]
                show = _command(args, "show", args.run_id)
                print(f"nothing to do: run {args.run_id} is complete ({c.get('succeeded', 0)} succeeded, "
                      f"{c.get('skipped', 0)} skipped, 0 failed, every output in place); no attempt was "
                      f"started (`{show}` shows it)")  # fmt: skip
                return 0
    except ManifestError as exc:
        _remove_empty_folders(args.created_folders)
        return _report_invalid(args, exc.problems)
    except BaseException:
        _remove_empty_folders(args.created_folders)
        raise
    if args.command in ("run", "restyle") and not args.run_id:
        from storage.keys import new_run_id

        args.run_id = new_run_id()  # known from here on: the interrupt line and the hints name it
    return None


def _complete_run(args: argparse.Namespace) -> dict[str, Any] | None:
    """The last summary of the rerun's run when nothing is left to redo, else None: it records no failed
    edit and :func:`tasks.runs.shards_to_rerun` (what the rerun flow asks) finds no shard to redo,
    every output still in place. Only a run whose summary says complete is checked shard by shard here
    (the flow would check again)."""
    from storage.uri import open_store
    from tasks.runs import edits_to_redo, read_plan, read_summary

    out = open_store(args.out, s3_endpoint=args.s3_endpoint)  # (no RunOptions: it imports torch)
    summary = read_summary(out, args.run_id)
    counts = summary.get("counts") if isinstance(summary, dict) else None
    if not isinstance(counts, dict) or counts.get("failed", 1) != 0 or summary.get("failed_shards"):
        return None
    return None if edits_to_redo(out, args.run_id, read_plan(out, args.run_id)) else summary


def _launch_server() -> None:
    """As the program, with no PREFECT_API_URL: use the server a running `editflow serve` recorded, else
    launch a temporary one in the background (it starts while the model and the flow are loaded)."""
    if not _PROGRAM["on"]:
        return
    from flows.server import launch_temporary_server, use_running_server

    if use_running_server() is None:
        launch_temporary_server()


def _server_ready(args: argparse.Namespace) -> None:
    """Just before the flow: wait for the launched temporary server (if any); quiet Prefect's failure
    records (the CLI reports failures itself)."""
    from flows.server import quiet_prefect_failures, server_launched, wait_for_server

    if not args.verbose:
        quiet_prefect_failures()
    if _PROGRAM["on"] and server_launched():
        _stage(
            "waiting for the temporary Prefect server (PREFECT_API_URL or a running `editflow serve` skips it)"
        )
        wait_for_server()


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

    absent = getattr(args, "created_folders", [])
    progress = _Progress(_progress_mode())
    t0 = time.perf_counter()
    _stage("checked the manifest's files, --out, the model and the device")
    try:
        runner, gpu = _task_runner(args)
        _server_ready(args)
        flows_mod.set_progress_callback(progress)
        _stage(f"planning {_what(args)}" if args.command != "rerun" else f"reading {_what(args)}")
        from flows.server import flow_run_settings

        with flow_run_settings():
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
    _print_summary(summary, args)
    if args.verbose:
        print(json.dumps(summary, indent=2, default=str))
    logging.getLogger(__name__).debug("cli finished in %.1fs", time.perf_counter() - t0)
    if summary.get("summary_error"):  # the run's record could not be stored (e.g. a full disk)
        print(f"editflow: error: {summary['summary_error']}", file=sys.stderr)
        return EXIT_STORAGE
    # edits failed because storage did (full, read-only...): fixing the rows would not help
    storage = summary.get("storage_failures")
    if storage:
        print(f"editflow: error: {_storage_failures_line(summary, args)}", file=sys.stderr)
        return EXIT_STORAGE
    return 0 if summary["counts"]["failed"] == 0 else 1


def _storage_failures_line(summary: dict[str, Any], args: argparse.Namespace | None = None) -> str:
    """One line for a run whose edits or shards failed because storage did (credentials redacted)."""
    from storage.endpoints import redact

    f = summary["storage_failures"]
    error = re.sub(r"^(row \d+|shard \d+): ", "", f["error"])
    return redact(
        f"storage failed during run {summary['run_id']}: {f['edits']} edit(s) and {f['shards']} "
        f"shard(s) could not be written ({error}); fix the storage, then "
        f"`{_command(args, 'rerun', summary['run_id'], summary['out'])}`"
    )


def _validate(args: argparse.Namespace) -> int:
    """`editflow validate`: every problem of the manifest (prompt lengths included), or its row count."""
    from manifests.validate import merge_problems, source_problems

    prepared = _prepare(args)
    tokens = _prompt_budget(args.model).max_tokens
    model = args.model or "the bundled reference model"
    budget = f"prompt lengths checked against {model} ({tokens} tokens; --model M for another)"
    sources = []
    if args.check_sources and prepared.rows:
        sources = source_problems(args.manifest, s3_endpoint=args.s3_endpoint)
    report, total = merge_problems(prepared, sources, limit=1000)
    if total:
        print(f"{report}\n{args.manifest}: INVALID ({total} problem(s)); {budget}")
        return 2
    checked = ", sources checked" if args.check_sources else ""
    print(f"{args.manifest}: valid ({prepared.rows} rows{checked}); {budget}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """`editflow run`: the bulk-edit flow (its plan task validates the manifest)."""
    from flows.bulk_edit import bulk_edit

    options = _run_options(args)
    return _execute(
        args,
        lambda runner, gpu: bulk_edit.with_options(task_runner=runner, flow_run_name=args.run_id)(
            args.manifest, options, run_id=args.run_id, gpu_resources=gpu
        ),
    )


def _rerun(args: argparse.Namespace) -> int:
    """`editflow rerun`: finish a run (its plan supplies the options the command line does not)."""
    from flows.bulk_edit import rerun

    options = _run_options(args)
    if args.needs_review:
        return _rerun_needs_review(args, options)
    return _execute(
        args,
        lambda runner, gpu: rerun.with_options(
            task_runner=runner, flow_run_name=f"{args.run_id}-rerun"
        )(args.run_id, options, gpu_resources=gpu),
    )


def _rerun_needs_review(args: argparse.Namespace, options) -> int:
    """`editflow rerun RUN --needs-review --settings JSON`: the flagged edits re-edited as a new run."""
    from flows.bulk_edit import rerun_needs_review
    from storage.base import NotFound
    from storage.uri import open_store
    from tasks.report import run_overview

    try:
        flagged = run_overview(open_store(args.out, s3_endpoint=args.s3_endpoint), args.run_id)
    except NotFound:  # no such run: the preflight says so
        flagged = {"needs_review": True}
    if not flagged["needs_review"]:
        print(f"run {args.run_id}: no edit needs review; nothing to rerun")
        return 0
    settings = json.loads(args.settings)
    args.manifest = f"the needs-review manifest of run {args.run_id} with settings {args.settings}"
    return _execute(
        args,
        lambda runner, gpu: rerun_needs_review.with_options(task_runner=runner)(
            args.run_id, settings, options, gpu_resources=gpu
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
        lambda runner, gpu: restyle.with_options(
            task_runner=runner, flow_run_name=f"{args.run_id}-restyle"
        )(args.catalog, spec, options, run_id=args.run_id, gpu_resources=gpu),
    )


def _serve(args: argparse.Namespace) -> int:
    """`editflow serve`: check the manifest once (no run), then serve the flow on its schedule."""
    from flows.bulk_edit import bulk_edit

    problems = _prepare(args).problems
    if problems:
        return _report_invalid(args, problems)
    _preflight(args)
    _launch_server()
    runner, gpu = _task_runner(args)
    _server_ready(args)
    from flows.server import register_server

    register_server()  # runs on this machine use this server while it serves
    parameters = {
        "manifest": args.manifest,
        "options": _run_options(args).to_dict(),  # stored as JSON; the flow coerces it back
        "gpu_resources": gpu,
    }
    bulk_edit.with_options(task_runner=runner).serve(
        name=args.name, cron=args.cron, parameters=parameters
    )
    return 0


def _warm(args: argparse.Namespace) -> int:
    """`editflow warm`: a warm worker in the foreground (flows.warm)."""
    from flows.warm import serve, socket_path

    _configure_logging(args)
    return serve(socket_path(), keep_server=args.keep_server)


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
    print(format_overview(info, limit=args.limit, s3_endpoint=args.s3_endpoint))
    return 1 if info["counts"].get("failed") else 0  # like `run`: 1 while the run has failed edits


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "validate": _validate,
    "run": _run,
    "rerun": _rerun,
    "restyle": _restyle,
    "serve": _serve,
}


LATEST = "latest"  # accepted wherever a run id is: the newest run under --out


def _resolve_latest(args: argparse.Namespace) -> None:
    """``latest`` -> the id of the newest run under args.out (``NoRuns``, exit 2, when there is none)."""
    from storage.uri import open_store
    from tasks.listing import latest_run

    args.run_id = latest_run(open_store(args.out, s3_endpoint=args.s3_endpoint))


def _runs(args: argparse.Namespace) -> int:
    """`editflow runs`: the runs under --out, newest first (no Prefect, no model)."""
    from storage.uri import open_store
    from tasks.listing import format_runs, list_runs

    store = open_store(args.out, s3_endpoint=args.s3_endpoint)
    entries = list_runs(store, limit=args.limit)
    if not entries:
        print(f"no runs under {store.uri()}")
        return 0
    print(format_runs(entries))
    return 0


def _resolve_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """RUN_ID --out URI, or the run's URI: sets args.out and args.run_id."""
    from tasks.report import resolve_run

    try:
        args.out, args.run_id = resolve_run(args.run_id, args.out)
    except ValueError as exc:
        parser.error(str(exc))


_FLOW_COMMANDS = ("run", "rerun", "restyle")
_ARGS: list[
    argparse.Namespace
] = []  # the command's arguments, once parsed  # the commands that run a flow now


def _main(argv: list[str] | None = None) -> int:
    from flows.runners import check_scheduler

    parser = build_parser()
    args = parser.parse_args(argv)
    _ARGS.append(args)  # the interrupt line names the run
    if args.command in ("rerun", "show"):
        _resolve_run(parser, args)
    if args.command == "rerun" and (args.settings is None) == args.needs_review:
        parser.error("rerun: --needs-review and --settings JSON go together")
    _check_locations(parser, args)
    if args.command in ("rerun", "show") and args.run_id == LATEST:
        _resolve_latest(args)
    if args.command == "show":
        return _show(args)
    if args.command == "runs":
        return _runs(args)
    if args.command == "warm":
        return _warm(args)
    if getattr(args, "dask_address", None):  # before the slow imports: one line, exit 3
        check_scheduler(args.dask_address)
    _configure_logging(args)  # before a server is launched: it inherits the environment
    if args.command in _FLOW_COMMANDS:
        done = _before_the_server(args)  # the manifest's files, --out, the run; nothing to do?
        if done is not None:
            return done
        _launch_server()
    try:
        invalid = _check_model(args)
        _check_environment(parser, args)
    except BaseException:
        _remove_empty_folders(getattr(args, "created_folders", []))
        raise
    if invalid:
        _remove_empty_folders(getattr(args, "created_folders", []))
        return _report_invalid(args, invalid)
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
