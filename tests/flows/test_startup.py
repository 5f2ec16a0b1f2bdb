"""The first seconds of a command: checks before Prefect, a running server reused, the parser's polish."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flows import server
from flows.cli import build_parser, main

# `main` in a fresh interpreter; prints its exit status and whether Prefect or torch were imported
_PROBE = (
    "import sys; from flows.cli import main; code = main(sys.argv[1:]); "
    "print('RESULT', code, 'prefect' in sys.modules, 'torch' in sys.modules)"
)


def probe_cli(argv: list[str], cwd=None) -> tuple[int, bool, bool, str]:
    """(exit status, Prefect imported, torch imported, output) of `editflow ARGV` in a new process."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120, cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, done.stdout + done.stderr
    _, code, prefect, torch = result[-1].split()
    return int(code), prefect == "True", torch == "True", done.stdout + done.stderr


def test_a_missing_manifest_is_refused_before_prefect_or_torch_are_imported(tmp_path):
    code, prefect, torch, text = probe_cli(["run", "nosuch.parquet", "--out", str(tmp_path / "o")])
    assert code == 2 and "no manifest file or folder at" in text
    assert not prefect and not torch, text
    assert not (tmp_path / "o").exists()
    argv = ["restyle", str(tmp_path / "nosuch.csv"), "--style", "x", "--out", str(tmp_path / "o")]
    code, prefect, torch, text = probe_cli(argv)
    assert code == 2 and "nosuch.csv' does not exist" in text
    assert not prefect and not torch, text


def test_verbose_after_the_command_and_version(capsys):
    parser = build_parser()
    assert parser.parse_args(["show", "r", "--out", "o", "-v"]).verbose is True
    assert parser.parse_args(["-v", "show", "r", "--out", "o"]).verbose is True
    assert parser.parse_args(["show", "r", "--out", "o"]).verbose is False
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("editflow ")


def test_help_shows_the_defaults_and_serve_hides_what_it_refuses():
    sub = build_parser()._subparsers._group_actions[0].choices
    run_help, restyle_help, serve_help = (sub[c].format_help() for c in ("run", "restyle", "serve"))
    assert "--format {png,jpeg,webp}" in run_help and "(default png)" in run_help
    for text in ("(default pnp)", "(default image_uri)", "(default caption)"):
        assert text.replace(" ", "") in "".join(restyle_help.split()), (
            text
        )  # argparse wraps at '-' too
    assert "(defaulteditflow-bulk-edit)" in "".join(serve_help.split())
    assert "--run-id" not in serve_help and "--run-id" in run_help


def test_a_server_that_editflow_serve_recorded_is_used_while_it_answers(
    prefect_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    url = prefect_server.rstrip("/")
    record = tmp_path / server.REGISTRY_NAME
    assert server.running_server() is None  # no record
    record.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    assert server.running_server() == url
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record.write_text(json.dumps({"url": url, "pid": dead.pid}))
    assert server.running_server() is None  # its process is gone: a stale record
    record.write_text(json.dumps({"url": "http://127.0.0.1:9/api", "pid": os.getpid()}))
    assert server.running_server() is None  # nothing answers there
    record.write_text("{not json")
    assert server.running_server() is None
    monkeypatch.delenv("PREFECT_API_URL")
    record.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    try:
        assert server.use_running_server() == url
        assert os.environ["PREFECT_API_URL"] == url
    finally:
        monkeypatch.setenv("PREFECT_API_URL", prefect_server)


def test_a_long_contact_sheet_caption_keeps_its_end_where_restyle_puts_the_style():
    from PIL import Image, ImageDraw, ImageFont

    from tasks.report import _wrap

    draw, font = ImageDraw.Draw(Image.new("RGB", (8, 8))), ImageFont.load_default(size=11)
    caption = "succeeded · pnp: a yellow triangle on a black background, in watercolor style"
    lines = _wrap(draw, caption, font, 128, 3).splitlines()
    assert len(lines) == 3 and lines[0].startswith("succeeded · pnp:")
    assert lines[1].startswith("…") and " ".join(lines).endswith("in watercolor style")
    assert _wrap(draw, "succeeded · pnp: a cat", font, 128, 3) == "succeeded · pnp: a cat"


def test_flow_runs_on_the_cli_s_own_temporary_server_send_no_heartbeats(monkeypatch):
    """Prefect's heartbeat thread sleeps in 1 s steps that each flow's end waits for: off on the CLI's own
    temporary server (it dies with the CLI), Prefect's default on any other."""
    from prefect.settings import get_current_settings

    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None
    own = "http://127.0.0.1:9/api"
    monkeypatch.setitem(server._SERVER, "proc", subprocess.Popen([sys.executable, "-c", "pass"]))
    monkeypatch.setitem(server._URL, "url", own)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:8/api")  # another server: unchanged
    with server.flow_run_settings():
        assert get_current_settings().flows.heartbeat_frequency == default
    monkeypatch.setenv("PREFECT_API_URL", own)
    with server.flow_run_settings():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == default
    server._SERVER["proc"].wait()
