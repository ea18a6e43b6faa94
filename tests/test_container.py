"""docker/: the images built and run for real, with rootful podman (tests/containers.py).

The CPU image is built from docker/Dockerfile.cpu on a base made from Debian packages (no
registry is reachable, so BASE_IMAGE is substituted). In it: the import check; 20 steps of
2-rank torchrun on the quickstart config with data, logs and checkpoints on volumes, checked
from the host; `podman stop` (SIGTERM) of a training container -> checkpoint, exit status 75
seen by `podman wait`, and a second container resuming from that checkpoint. The CUDA
Dockerfile is built on the CPU image standing in for pytorch/pytorch (no GPU image can be
pulled and there is no GPU): its steps, its CMD and the import check. docker/compose.yaml is
read by podman-compose, which prints the `podman run` it would start (--dry-run; nothing runs).

Marker `container`: these run only when selected (`-m container`), as they take minutes; they
skip with the reason where podman cannot be installed or run (not root, no apt-get, ...).
"""
from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.containers import (
    NAME_PREFIX,
    Podman,
    debian_python_base,
    pip_build_mounts,
    pip_index_url,
    podman_engine,
)
from tests.processes import wait_until
from tests.test_docker_files import WORKDIR, assert_training_command, entry_command
from trainer.checkpoint.manager import verify
from trainer.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.container

EXPERIMENT = "docker"
# The quickstart config, made small and fast: 8 years of the built-in data, a narrow model.
SMALL_RUN = ["--config", "configs/quickstart_cpu.yaml", "--experiment_name", EXPERIMENT,
             "--resume", "auto", "--log_interval", "5",
             "--set", "data.builtin.start_date=1996-01-01", "data.builtin.end_date=2003-12-31",
             "model.d_model=32", "model.seq_len=48", "model.pred_len=12",
             "train.progress_bar=false", "train.early_stopping_patience=1000"]
TORCHRUN_2 = ["python", "docker/entrypoint.py", "--standalone", "--nproc_per_node=2",
              "launch/train.py"]


@pytest.fixture(scope="module", autouse=True)
def only_when_selected(request):
    if "container" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("container tests take minutes: select them with `-m container`")


@pytest.fixture(scope="module")
def podman(only_when_selected):
    with podman_engine() as engine:
        yield engine


@pytest.fixture(scope="module")
def build_mounts(tmp_path_factory) -> list[str]:
    return pip_build_mounts(tmp_path_factory.mktemp("pip"))


@pytest.fixture(scope="module")
def cpu_image(podman, build_mounts) -> str:
    tag = podman.new_name("cpu", image=True)
    podman.build(REPO / "docker" / "Dockerfile.cpu", REPO, tag, mounts=build_mounts, build_args={
        "BASE_IMAGE": debian_python_base(podman), "TORCH_CPU_INDEX": pip_index_url()})
    return tag


def volumes(folder: Path) -> list[str]:
    """data/, logs/ and checkpoints/ of the image's working directory, on the host."""
    args = []
    for name in ("data", "logs", "checkpoints"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        args += ["--volume", f"{folder / name}:{WORKDIR}/{name}"]
    return args


def metrics(folder: Path) -> list[dict]:
    path = folder / "logs" / EXPERIMENT / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def checkpoints(folder: Path) -> list[Path]:
    return sorted((folder / "checkpoints" / EXPERIMENT).glob("checkpoint_step_*"))


def import_check(podman: Podman, image: str) -> str:
    out = podman.run("run", "--rm", image, "python", "-c",
                     "import torch, model, trainer, diagnostics; print(torch.__version__)")
    return out.stdout.strip()


# ------------------------------------------------------------------ CPU image
def test_cpu_image_imports_the_project_with_cpu_torch(podman, cpu_image):
    assert import_check(podman, cpu_image).endswith("+cpu")


def test_cpu_image_trains_two_ranks_onto_mounted_volumes(podman, cpu_image, tmp_path):
    podman.run("run", "--rm", "--shm-size=1g", *volumes(tmp_path), cpu_image, *TORCHRUN_2,
               *SMALL_RUN, "--max_steps", "20", "--checkpoint_interval", "10", timeout=600)
    train_steps = [line["step"] for line in metrics(tmp_path) if line["kind"] == "train"]
    assert train_steps == [5, 10, 15, 20]
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint_step_000010",
                                                       "checkpoint_step_000020"]
    assert all(verify(p) is None for p in checkpoints(tmp_path))
    assert (tmp_path / "checkpoints" / EXPERIMENT / "final_model.pth").is_file()
    config = (tmp_path / "logs" / EXPERIMENT / "config.yaml").read_text()
    assert "d_model: 32" in config and "max_steps: 20" in config


def wait_for_train_step(folder: Path, step: int, podman: Podman, container: str,
                        timeout: float = 300) -> None:
    def running() -> bool:
        status = podman.run("inspect", "--format", "{{.State.Status}}", container).stdout
        return status.strip() == "running"
    wait_until(lambda: any(line["kind"] == "train" and line["step"] >= step
                           for line in metrics(folder)),
               f"train step {step}", timeout=timeout, alive=running,
               output=lambda: podman.run("logs", container, check=False).stderr, interval=0.5)


def test_podman_stop_checkpoints_exits_75_and_the_run_resumes(podman, cpu_image, tmp_path):
    """`podman stop` sends SIGTERM to the container's main process (docker/entrypoint.py, PID 1:
    no --init) which passes it to the workers: they checkpoint at their next step and exit 75."""
    container = podman.new_name("stop", image=False)
    podman.run("run", "--detach", "--name", container, "--shm-size=1g", *volumes(tmp_path),
               cpu_image, *TORCHRUN_2, *SMALL_RUN, "--max_steps", "5000", "--epochs", "1000",
               "--checkpoint_interval", "1000")
    wait_for_train_step(tmp_path, 10, podman, container)
    podman.run("stop", "--time", "120", container, timeout=180)
    status = podman.run("wait", container).stdout.strip()
    logs = podman.run("logs", container).stdout
    assert status == str(EXIT_PREEMPTED), logs[-3000:]
    (saved,) = checkpoints(tmp_path)
    assert verify(saved) is None and int(saved.name.rsplit("_", 1)[1]) >= 10
    step = int(saved.name.rsplit("_", 1)[1])
    assert "every worker saved a checkpoint and stopped" in logs

    out = podman.run("run", "--rm", "--shm-size=1g", *volumes(tmp_path), cpu_image, *TORCHRUN_2,
                     *SMALL_RUN, "--max_steps", str(step + 5), "--epochs", "1000", timeout=600)
    log = (tmp_path / "logs" / EXPERIMENT / "training_full.log").read_text()
    assert f"at step {step}" in log and "resumed from" in log, out.stdout[-3000:]
    assert f"finished at step {step + 5}" in log


# ----------------------------------------------------------------- CUDA image
def test_cuda_dockerfile_builds_on_a_stand_in_for_its_base(podman, cpu_image, build_mounts):
    """pytorch/pytorch cannot be pulled: the CPU image (Python with torch installed, like it)
    stands in as BASE_IMAGE, so the CUDA Dockerfile's own steps, CMD and install are real."""
    tag = podman.new_name("cuda-on-cpu-base", image=True)
    podman.build(REPO / "docker" / "Dockerfile.cuda", REPO, tag, mounts=build_mounts,
                 build_args={"BASE_IMAGE": cpu_image})
    assert import_check(podman, tag).endswith("+cpu")
    config = json.loads(podman.run("inspect", "--format", "{{json .Config}}", tag).stdout)
    assert config["Cmd"] == entry_command(REPO / "docker" / "Dockerfile.cuda")
    assert config["WorkingDir"] == WORKDIR



def test_podman_compose_reads_the_compose_file(podman):
    """podman-compose 1.0.3 (Debian 12) has no `config` command: its --dry-run prints the
    `podman run` line instead (it still creates the project's network, removed here). The
    variables are unset: their defaults are used (`${VAR:-}`, an empty default, is left as text
    by this podman-compose, so compose.yaml has none)."""
    project = NAME_PREFIX.replace("-", "_")
    unset = ("NPROC_PER_NODE", "CONFIG", "EXPERIMENT_NAME", "DIAGNOSTICS")
    env = {key: value for key, value in podman.env.items() if key not in unset}
    try:
        out = subprocess.run(["podman-compose", "-p", project, "--dry-run", "-f",
                              "docker/compose.yaml", "up", "--no-build", "-d"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120, check=True)
    finally:
        podman.run("network", "rm", "--force", f"{project}_default", check=False)
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("podman run ")]
    argv = shlex.split(line)
    command = argv[argv.index("celestial-pgat:cuda") + 1:]
    assert_training_command(command)
    assert "--nproc_per_node=gpu" in command and command[-2:] == ["--resume", "auto"]
    assert "--init" in argv and argv[argv.index("--shm-size") + 1] == "16gb"
    mounts = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-v"]
    assert mounts == [f"{REPO / name}:{WORKDIR}/{name}" for name in ("data", "logs", "checkpoints")]
