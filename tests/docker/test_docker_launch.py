"""The launch commands of every mode are what DeepSpeed's launcher accepts.

Each generated `deepspeed ...` argv goes through DeepSpeed's own runner: first its
argument parser, then its `main()` with process creation replaced by a recorder, so
the hostfile, `--no_ssh`/`--node_rank` checks and `.deepspeed_env` handling are
DeepSpeed's real code. The per-node command the runner would start is then parsed by
DeepSpeed's per-node launcher (`deepspeed.launcher.launch`) as well.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DS_CONFIG = str(REPO / "ds_configs" / "zero2.json")
OVERRIDES = ["--config", "gpt2_tiny", "train.steps=5", "run.name=a b"]


def _load_launch_cmd():
    spec = importlib.util.spec_from_file_location("launch_cmd", DOCKER / "launch_cmd.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["launch_cmd"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


launch_cmd = _load_launch_cmd()


@pytest.fixture(scope="module")
def runner():
    from deepspeed.launcher import runner

    return runner


def plan_for(args: list[str], env: dict[str, str]):
    opts, user = launch_cmd.parse_args(args)
    return launch_cmd.build_plan(opts, user, env)


def run_deepspeed_runner(runner, monkeypatch, argv: list[str]) -> list[str]:
    """Run DeepSpeed's runner main() on a `deepspeed ...` argv; return the command it starts."""
    assert argv[0] == "deepspeed"
    started: list[list[str]] = []

    class Recorded:
        returncode = 0

        def __init__(self, cmd, env=None):
            started.append(cmd)

        def wait(self):
            return 0

    fake_subprocess = SimpleNamespace(
        Popen=Recorded,
        check_call=lambda *a, **k: 0,  # the runner's ssh reachability probe
        check_output=lambda *a, **k: b"10.9.9.9\n",
        CalledProcessError=subprocess.CalledProcessError,
        DEVNULL=subprocess.DEVNULL,
    )
    monkeypatch.setattr(runner, "subprocess", fake_subprocess)
    monkeypatch.setattr(runner.signal, "signal", lambda *a: None)
    monkeypatch.setattr(runner.PDSHRunner, "backend_exists", lambda self: True)
    # Only the working directory's .deepspeed_env, not the developer's ~/.deepspeed_env.
    monkeypatch.setattr(runner, "DEEPSPEED_ENVIRONMENT_PATHS", ["."])
    runner.main(argv[1:])
    assert len(started) == 1
    return started[0]


def parse_node_launch(cmd: list[str], monkeypatch) -> SimpleNamespace:
    """Parse the per-node `python -m deepspeed.launcher.launch ...` with DeepSpeed's parser."""
    from deepspeed.launcher import launch

    i = cmd.index("deepspeed.launcher.launch")
    monkeypatch.setattr(sys, "argv", ["launch", *cmd[i + 1 :]])
    args = launch.parse_args()
    args.world = json.loads(base64.urlsafe_b64decode(args.world_info))
    return args


# --- single node -------------------------------------------------------------------


def test_single_node(runner, monkeypatch, tmp_path):
    plan = plan_for(["single", "--ds_config", DS_CONFIG, "--", *OVERRIDES], {})
    args = runner.parse_args(plan.argv[1:])
    assert args.user_script == "launchers/pretrain.py"
    assert args.user_args == ["--ds_config", DS_CONFIG, *OVERRIDES]
    assert args.hostfile == runner.DLTS_HOSTFILE and not args.no_ssh
    assert plan.files == {}

    monkeypatch.chdir(tmp_path)
    cmd = run_deepspeed_runner(runner, monkeypatch, plan.argv)
    node = parse_node_launch(cmd, monkeypatch)
    assert node.training_script == "launchers/pretrain.py"
    assert node.training_script_args == ["--ds_config", DS_CONFIG, *OVERRIDES]
    assert list(node.world) == ["localhost"]


def test_single_node_gpu_count(runner):
    plan = plan_for(
        ["single", "--ds_config", DS_CONFIG, "--num_gpus", "4"], {"MASTER_PORT": "29700"}
    )
    args = runner.parse_args(plan.argv[1:])
    assert (args.num_gpus, args.master_port) == (4, 29700)


# --- hostfile (pdsh over ssh) --------------------------------------------------------


def test_hostfile_mode_forwards_the_environment(runner, monkeypatch, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text((DOCKER / "hostfile.example").read_text())
    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "NCCL_SOCKET_IFNAME": "^docker0,lo",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "HF_HOME": "/cache/hf",
        "UNRELATED": "stays home",
        "SSH_PORT": "2222",
        "MASTER_ADDR": "10.0.0.1",
    }
    monkeypatch.chdir(tmp_path)
    plan = plan_for(
        ["hostfile", "--ds_config", DS_CONFIG, "--hostfile", str(hostfile), "--", *OVERRIDES], env
    )
    args = runner.parse_args(plan.argv[1:])
    assert args.hostfile == str(hostfile) and args.launcher == "pdsh"
    assert (args.ssh_port, args.master_addr) == (2222, "10.0.0.1")
    assert args.user_args == ["--ds_config", DS_CONFIG, *OVERRIDES]

    env_text = plan.files[Path(".deepspeed_env")]
    lines = env_text.splitlines()
    assert all("=" in line and not line.startswith("#") for line in lines), env_text
    assert "UNRELATED=stays home" not in lines and "HF_HOME=/cache/hf" in lines
    launch_cmd.write_files(plan.files)

    cmd = run_deepspeed_runner(runner, monkeypatch, plan.argv)
    assert cmd[0] == "pdsh" and cmd[cmd.index("-w") + 1] == "node-0,node-1"
    remote = " ".join(cmd)
    for exported in (
        "export MLFLOW_TRACKING_URI=http://mlflow:5000;",
        'export NCCL_SOCKET_IFNAME="^docker0,lo";',
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1;",
        "export HF_HOME=/cache/hf;",
    ):
        assert exported in remote
    assert "UNRELATED" not in remote
    assert "--master_addr=10.0.0.1" in remote and "--node_rank=%n" in remote
    # pdsh re-joins the remote command on spaces, so DeepSpeed quotes an argument with one.
    script_at = cmd.index("launchers/pretrain.py")
    assert cmd[script_at + 1 :] == ["--ds_config", DS_CONFIG, *OVERRIDES[:-1], '"run.name=a b"']


def test_hostfile_example_is_what_deepspeed_reads(runner):
    lines = (DOCKER / "hostfile.example").read_text().splitlines(keepends=True)
    assert runner._parse_hostfile(lines) == launch_cmd.read_hostfile(DOCKER / "hostfile.example")


def test_hostfile_mode_rejects_what_pdsh_cannot_carry(tmp_path):
    env = {"MLFLOW_TRACKING_URI": 'http://x/"$(id)"', "HOSTFILE": str(DOCKER / "hostfile.example")}
    with pytest.raises(launch_cmd.LaunchError, match="MLFLOW_TRACKING_URI"):
        plan_for(["hostfile", "--ds_config", DS_CONFIG], env)
    bad = tmp_path / "hostfile"
    bad.write_text("node-0 gpus=8\n")
    with pytest.raises(launch_cmd.LaunchError, match="bad line"):
        plan_for(["hostfile", "--ds_config", DS_CONFIG, "--hostfile", str(bad)], {})


# --- no ssh: every node runs its own launcher ---------------------------------------


@pytest.mark.parametrize("rank", [0, 2])
def test_nossh_mode(runner, monkeypatch, tmp_path, rank):
    env = {
        "NNODES": "3",
        "NODE_RANK": str(rank),
        "GPUS_PER_NODE": "8",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29600",
        "TMPDIR": str(tmp_path),
    }
    plan = plan_for(["nossh", "--ds_config", DS_CONFIG, "--", *OVERRIDES], env)
    args = runner.parse_args(plan.argv[1:])
    assert args.no_ssh and args.node_rank == rank
    assert (args.master_addr, args.master_port) == ("10.0.0.1", 29600)
    launch_cmd.write_files(plan.files)
    assert len(runner.fetch_hostfile(args.hostfile)) == 3

    monkeypatch.chdir(tmp_path)
    cmd = run_deepspeed_runner(runner, monkeypatch, plan.argv)
    node = parse_node_launch(cmd, monkeypatch)
    assert node.node_rank == rank and node.master_addr == "10.0.0.1" and node.master_port == 29600
    assert [len(gpus) for gpus in node.world.values()] == [8, 8, 8]
    assert node.training_script_args == ["--ds_config", DS_CONFIG, *OVERRIDES]


def test_nossh_mode_checks_its_inputs():
    base = {"NNODES": "2", "GPUS_PER_NODE": "8", "MASTER_ADDR": "10.0.0.1"}
    with pytest.raises(launch_cmd.LaunchError, match="outside"):
        plan_for(["nossh", "--ds_config", DS_CONFIG], {**base, "NODE_RANK": "2"})
    with pytest.raises(launch_cmd.LaunchError, match="MASTER_ADDR"):
        plan_for(
            ["nossh", "--ds_config", DS_CONFIG, "--node_rank", "0"],
            {k: v for k, v in base.items() if k != "MASTER_ADDR"},
        )
    with pytest.raises(launch_cmd.LaunchError, match="not found"):
        plan_for(["nossh", "--ds_config", "ds_configs/nope.json"], {**base, "NODE_RANK": "0"})


# --- Slurm: the sbatch script's srun line, then the command inside each container ----


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_slurm_job(runner, monkeypatch, tmp_path, runtime):
    env = {
        "PATH": os.environ["PATH"],
        "DRY_RUN": "1",
        "CONTAINER_RUNTIME": runtime,
        "IMAGE": "/shared/img",
        "DATA_DIR": "/shared/data",
        "CKPT_DIR": "/shared/ckpt",
        "SLURM_JOB_ID": "4242",
        "MASTER_ADDR": "gpu-node-07",
    }
    out = subprocess.run(
        ["bash", str(DOCKER / "slurm" / "pretrain.sbatch"), *OVERRIDES],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    srun = shlex.split(out)
    assert srun[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if runtime == "pyxis":
        assert "--container-image=/shared/img" in srun
        assert "--container-mounts=/shared/data:/data,/shared/ckpt:/checkpoints" in srun
    else:
        assert srun[3:6] == ["apptainer", "exec", "--nv"]
    inner = srun[srun.index("python") :]
    assert inner[1:3] == ["docker/launch_cmd.py", "slurm"]

    # What srun gives node 3 of a 4-node job; the sbatch script exported MASTER_*.
    task_env = {
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_NODEID": "3",
        "SLURM_GPUS_ON_NODE": "8",
        "MASTER_ADDR": "gpu-node-07",
        "MASTER_PORT": str(20000 + 4242 % 20000),
        "TMPDIR": str(tmp_path),
    }
    monkeypatch.chdir(REPO)  # --pwd / --container-workdir /workspace: the repo root
    plan = plan_for(inner[2:], task_env)
    args = runner.parse_args(plan.argv[1:])
    assert args.no_ssh and args.node_rank == 3 and args.master_port == 24242
    assert args.user_args == ["--ds_config", "ds_configs/zero2.json", *OVERRIDES]
    launch_cmd.write_files(plan.files)
    node = parse_node_launch(run_deepspeed_runner(runner, monkeypatch, plan.argv), monkeypatch)
    assert node.node_rank == 3 and len(node.world) == 4


def test_slurm_mode_falls_back_to_the_launch_node_address():
    env = {
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3",
    }
    plan = plan_for(["slurm", "--ds_config", DS_CONFIG], env)
    assert plan.argv[plan.argv.index("--master_addr") + 1] == "10.1.2.3"


# --- the shell wrappers print the same command in DRY_RUN mode -----------------------


def _dry_run(script: str, args: list[str], env: dict[str, str]) -> list[str]:
    full_env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "DRY_RUN": "1",
        **env,
    }
    result = subprocess.run(
        ["bash", str(DOCKER / script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return shlex.split(result.stdout)


def test_shell_wrappers_dry_run(runner, tmp_path):
    argv = _dry_run(
        "launch_hostfile.sh", ["--hostfile", str(DOCKER / "hostfile.example"), "--", *OVERRIDES], {}
    )
    args = runner.parse_args(argv[1:])
    assert args.hostfile.endswith("hostfile.example") and args.user_args[-1] == "run.name=a b"

    argv = _dry_run(
        "launch_nossh.sh",
        ["--", *OVERRIDES],
        {
            "NNODES": "2",
            "JOB_COMPLETION_INDEX": "1",
            "GPUS_PER_NODE": "2",
            "MASTER_ADDR": "10.0.0.1",
            "TMPDIR": str(tmp_path),
        },
    )
    args = runner.parse_args(argv[1:])
    assert args.no_ssh and args.node_rank == 1
    assert not list(tmp_path.iterdir()), "a dry run writes no files"


def test_wrapper_reports_bad_settings():
    result = subprocess.run(
        ["bash", str(DOCKER / "launch_nossh.sh")],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "DRY_RUN": "1"},
        timeout=30,
    )
    assert result.returncode == 2 and "needs --num_nodes/NNODES" in result.stderr


def test_entrypoint_runs_the_command():
    env = {"PATH": os.environ["PATH"], "PIPELINE_QUIET": "1"}
    result = subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh"), "echo", "ran"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout == "ran\n"
