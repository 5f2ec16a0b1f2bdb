"""The deployment recipes in infra/ agree with the CLI and the flows: the commands they run parse with
editflow's own parser or use Dask's CLI as the README describes, one GPU per worker, one scheduler address."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
ADDRESS = "tcp://dask-scheduler:8786"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_worker(command: list[str]) -> None:
    """`dask worker ADDRESS --nthreads 1 --resources GPU=1 ...` (one shard at a time per GPU)."""
    assert command[:3] == ["dask", "worker", ADDRESS], command
    assert command[command.index("--nthreads") + 1] == "1"
    assert command[command.index("--resources") + 1] == "GPU=1"
    if "--preload" in command:  # a module the workers can import (editflow is installed there)
        module = command[command.index("--preload") + 1]
        assert (REPO / (module.replace(".", "/") + ".py")).exists(), module


def _check_editflow_run(command: list[str]) -> None:
    from flows.cli import build_parser

    assert command[0] == "editflow"
    args = build_parser().parse_args(command[1:])  # SystemExit on a flag the CLI does not have
    assert (args.command, args.runner, args.dask_address, args.dask_gpu) == (
        "run",
        "dask",
        ADDRESS,
        True,
    )


def test_compose_cluster_has_a_scheduler_one_worker_per_gpu_and_the_flow():
    services = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    scheduler = services["dask-scheduler"]
    assert scheduler["command"][:2] == ["dask", "scheduler"]
    assert (
        scheduler["command"][scheduler["command"].index("--port") + 1] == ADDRESS.rsplit(":", 1)[1]
    )
    workers = {k: v for k, v in services.items() if k.startswith("dask-worker-")}
    assert len(workers) >= 2
    gpus = set()
    for name, worker in workers.items():
        _check_worker(worker["command"])
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [worker["environment"]["CUDA_VISIBLE_DEVICES"]], name
        gpus.add(worker["environment"]["CUDA_VISIBLE_DEVICES"])
        assert worker["image"] == scheduler["image"]  # one dask/distributed version everywhere
        assert (
            worker["environment"]["AWS_ENDPOINT_URL_S3"]
            and worker["environment"]["PREFECT_API_URL"]
        )
    assert len(gpus) == len(workers)  # each worker its own GPU
    flow = services["editflow-run"]
    _check_editflow_run(flow["command"])
    assert flow["image"] == scheduler["image"]


def test_kubernetes_scheduler_service_and_gpu_workers_agree():
    scheduler_docs = _docs(INFRA / "k8s" / "dask-scheduler.yaml")
    deployment = next(d for d in scheduler_docs if d["kind"] == "Deployment")
    service = next(d for d in scheduler_docs if d["kind"] == "Service")
    host, port = ADDRESS[len("tcp://") :].split(":")
    assert service["metadata"]["name"] == host
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["dask", "scheduler"]
    image = container["image"]

    (workers,) = _docs(INFRA / "k8s" / "dask-gpu-workers.yaml")
    assert workers["kind"] == "Deployment"
    (worker,) = workers["spec"]["template"]["spec"]["containers"]
    _check_worker(worker["command"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["image"] == image
    env = {e["name"] for e in worker["env"]}
    assert {"PREFECT_API_URL", "AWS_ENDPOINT_URL_S3"} <= env
    assert worker["envFrom"][0]["secretRef"]["name"] == "editflow-s3"


def test_prefect_deployment_targets_the_cluster_by_address():
    import flows.bulk_edit as flows_mod

    config = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    (dep,) = [d for d in config["deployments"] if d["entrypoint"].endswith(":bulk_edit_on_dask")]
    path, name = dep["entrypoint"].split(":")
    assert (REPO / path).exists()
    flow = getattr(flows_mod, name)
    assert set(dep["parameters"]) <= set(inspect.signature(flow.fn).parameters)
    params = flow.validate_parameters(dep["parameters"])
    assert params["dask_address"] == ADDRESS and params["gpu_resources"] is True
