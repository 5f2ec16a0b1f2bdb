"""The GPU check's CPU form: every engine path it checks on a GPU, run here on a tiny model."""

from __future__ import annotations

import pytest

from benchmarks import gpu, gpu_check


def test_the_check_passes_on_cpu_with_a_tiny_model(capsys):
    code = gpu.main(["--check", "--device", "cpu", "--tiny"])
    out = capsys.readouterr().out
    assert code == 0, out
    dtypes = ["float32"] + (
        ["bfloat16"] if gpu_check.cpu_supports(__import__("torch").bfloat16) else []
    )
    table = [line for line in out.splitlines() if line.startswith("| ") and "PASS" in line]
    names = (
        "batched inversion",
        "PnP (K=2)",
        "PnP replaying",
        "P2P replace",
        "identity edit",
        "shard task path",
        "two shard workers",
    )
    for dtype in dtypes:
        for name in (
            names[:-1] if dtype != "float32" else names
        ):  # processes: first dtype only on CPU
            assert any(name in line and f"| {dtype}" in line for line in table), (name, dtype, out)
    assert "FAIL" not in out
    # the compiled pass, once (first dtype): no graph break, equal to eager
    assert any("compiled UNet vs eager" in line and "| float32" in line for line in table), out


def test_a_failing_check_fails_the_run(capsys):
    def broken() -> str:
        raise gpu_check.CheckFailed("replay vs live rel 3e-01 (tol 1e-01)")

    rows = gpu_check.run_checks(
        [("fine", "float16", lambda: "ok"), ("broken", "float16", broken)], log=lambda m: None
    )
    assert [r.ok for r in rows] == [True, False]
    assert gpu_check.report(rows, "t") == 1
    assert "| broken | float16 | FAIL" in capsys.readouterr().out
    assert gpu_check.report(rows[:1], "t") == 0


def test_check_refuses_the_full_model_on_cpu():
    assert gpu.main(["--check", "--device", "cpu"]) == 1


def test_check_refuses_unknown_dtypes():
    with pytest.raises(ValueError, match="float8"):
        gpu.main(["--check", "--device", "cpu", "--tiny", "--dtypes", "float8"])
