"""pipeline.logs: one line per event across ranks, third-party noise dropped at its source only.

The noise texts below are verbatim from a 2-rank gloo DeepSpeed run and a megatron-core
import (deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13); each is paired with another
record from the same source that must still get through.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipeline import logs

ROOT = Path(__file__).resolve().parents[1]
FSDP = "megatron.core.distributed.fsdp.src.megatron_fsdp"


@pytest.fixture(autouse=True)
def restore_logging():
    """Undo setup_logging: root handlers and level, the noise loggers' filters, warning filters."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    filters = {row.logger: logging.getLogger(row.logger).filters[:] for row in logs.LOG_NOISE}
    with warnings.catch_warnings():  # restores the warning filters on exit
        yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, fs in filters.items():
        logging.getLogger(name).filters[:] = fs


def emitted(logger_name: str, level: int, message: str) -> bool:
    """Whether a record logged on `logger_name` reaches a handler (i.e. passes its filters)."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        logger.log(level, message)
    finally:
        logger.removeHandler(handler)
    return bool(seen)


# ---------------------------------------------------------------------- ranks and format
def test_other_ranks_log_warnings_only(capsys):
    logs.setup_logging(rank=1)
    log = logging.getLogger("pipeline.train.trainer")
    log.info("step 10/20 loss 6.2388")
    log.warning("disk nearly full")
    err = capsys.readouterr().err
    assert "step 10/20" not in err
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING \[rank 1\] pipeline\.train\.trainer: disk nearly full\n", err)


def test_rank_zero_logs_info_in_the_short_format(capsys):
    logs.setup_logging(rank=0)
    logging.getLogger("pipeline.train.trainer").info("step 10/20 loss 6.2388")
    assert re.fullmatch(r"\d\d:\d\d:\d\d pipeline\.train\.trainer: step 10/20 loss 6\.2388\n", capsys.readouterr().err)


def test_rank_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    logs.setup_logging()
    logging.getLogger("pipeline.x").info("hidden")
    assert capsys.readouterr().err == ""


def test_setup_twice_keeps_one_handler_and_one_set_of_filters(capsys):
    logs.setup_logging(rank=0)
    handlers, n_warning_filters = len(logging.getLogger().handlers), len(warnings.filters)
    logs.setup_logging(rank=0)
    assert len(logging.getLogger().handlers) == handlers
    assert len(warnings.filters) == n_warning_filters
    for row in logs.LOG_NOISE:
        assert sum(isinstance(f, logs._DropNoise) for f in logging.getLogger(row.logger).filters) == 1
    logging.getLogger("pipeline.x").info("once")
    assert capsys.readouterr().err.count("once") == 1


# ---------------------------------------------------------------------- logging noise
NOISE_RECORDS = [  # (source logger, level, verbatim message, rank)
    (f"{FSDP}.mixed_precision", logging.INFO, "Using Megatron-FSDP without Transformer Engine.", 0),
    (f"{FSDP}.param_and_grad_buffer", logging.INFO, "Detected Megatron Core, using Megatron-FSDP with Megatron.", 0),
    (f"{FSDP}.megatron_fsdp", logging.INFO, "Detected Megatron Core, using Megatron-FSDP with Megatron.", 0),
    ("megatron.core.datasets.indexed_dataset", logging.INFO,
     "Load the _IndexReader from /tmp/run/data/shards/train/00000.idx", 0),
    ("megatron.core.datasets.indexed_dataset", logging.INFO, "\tExtract the sequence lengths", 0),
    ("megatron.core.datasets.indexed_dataset", logging.INFO, "\tExtract the sequence pointers", 0),
    ("megatron.core.datasets.indexed_dataset", logging.INFO, "\tExtract the document indices", 0),
    ("megatron.core.datasets.indexed_dataset", logging.DEBUG, "\t> time elapsed: 0.000114 seconds", 0),
    ("megatron.core.datasets.indexed_dataset", logging.INFO, "> total number of sequences: 243", 0),
    ("megatron.core.datasets.indexed_dataset", logging.INFO, "> total number of documents: 243", 0),
    ("DeepSpeed", logging.WARNING, "Attempting to get learning rate from scheduler before it has started", 0),
    ("DeepSpeed", logging.WARNING,
     "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.", 1),
]
KEPT_RECORDS = [  # other records from the same sources, which must pass
    (f"{FSDP}.mixed_precision", logging.WARNING, "Using Megatron-FSDP without Transformer Engine. FP8 is off.", 0),
    (f"{FSDP}.megatron_fsdp", logging.WARNING, "Megatron-FSDP: parameter buffer is not contiguous", 0),
    ("megatron.core.datasets.indexed_dataset", logging.WARNING,
     '[2026-12-03 06:45:07.634000] Attempt 1/4 to read data item failed with exception "EIO"; '
     "going to sleep for 1 seconds and then re-try...", 0),
    ("megatron.core.datasets.indexed_dataset", logging.ERROR, "> total number of sequences: 243", 0),
    ("DeepSpeed", logging.WARNING,
     "Unable to find hostfile, will proceed with training with local resources only.", 1),
    ("DeepSpeed", logging.WARNING,
     "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.", 0),
]


@pytest.mark.parametrize("name, level, message, rank", NOISE_RECORDS, ids=lambda v: str(v)[:40])
def test_noise_record_is_dropped_at_its_source(name, level, message, rank):
    logs.setup_logging(rank=rank, level=logging.DEBUG)
    assert logging.getLogger(name).isEnabledFor(level)  # so only the filter can drop it
    assert not emitted(name, level, message)


@pytest.mark.parametrize("name, level, message, rank", KEPT_RECORDS, ids=lambda v: str(v)[:40])
def test_other_records_of_the_same_source_pass(name, level, message, rank):
    logs.setup_logging(rank=rank, level=logging.DEBUG)
    assert emitted(name, level, message)


def test_deepspeeds_scheduler_warning_is_dropped_but_its_real_warning_is_kept():
    """The real source: DeepSpeed's WarmupCosineLR constructor. With total < warmup steps it also
    logs a genuine misconfiguration warning, which must stay."""
    torch = pytest.importorskip("torch")
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    misconfigured = "total_num_steps 10 is less than warmup_num_steps 1000"
    noise = "Attempting to get learning rate from scheduler before it has started"

    def messages() -> list[str]:
        seen: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = seen.append
        logger = logging.getLogger("DeepSpeed")
        logger.addHandler(handler)
        try:
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            lr_schedules.WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=1000)
        finally:
            logger.removeHandler(handler)
        return [r.getMessage() for r in seen]

    assert messages() == [misconfigured, noise]
    logs.setup_logging(rank=0)
    assert messages() == [misconfigured]


# ---------------------------------------------------------------------- Python warnings
def _torch_warnings(*calls) -> list[str]:
    """Messages of the warnings the real torch.distributed collectives raise (no process group:
    each warns on entry, then raises ValueError)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed without a process group")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs.install_noise_filters()
        for name in calls:
            fn = getattr(dist, name)
            args = ([torch.zeros(1)],) if name.endswith("coalesced") else (torch.zeros(2), torch.zeros(1))
            try:
                fn(*args)
            except (ValueError, RuntimeError):
                pass
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_torch_collective_deprecations_raised_under_deepspeed_are_ignored():
    assert _torch_warnings("all_gather_into_tensor", "reduce_scatter_tensor") == []


def test_other_torch_distributed_deprecations_still_warn():
    messages = _torch_warnings("all_reduce_coalesced")
    assert len(messages) == 1 and messages[0].startswith("`torch.distributed.all_reduce_coalesced` will be")


MEGATRON_WARNINGS = [  # (module the warning is attributed to, verbatim message)
    (f"{FSDP}.mixed_precision", "Transformer Engine and Apex are not installed. Falling back to local "
     "implementations of multi_tensor_applier and multi_tensor_scale"),
    ("megatron.core.optimizer", "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."),
    ("megatron.core.optimizer.optimizer", "Transformer Engine and Apex are not installed. Falling back to local "
     "implementations of multi_tensor_applier and multi_tensor_scale"),
    ("megatron.core.optimizer.clip_grads", "Transformer Engine and Apex are not installed. Falling back to local "
     "implementations of multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale"),
]


def _warns(module: str, message: str, category: type[Warning] = UserWarning) -> bool:
    """Whether `warnings` shows `message` raised from `module` (as `warnings.warn` there would)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs.install_noise_filters()
        warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module)
    return bool(caught)


@pytest.mark.parametrize("module, message", MEGATRON_WARNINGS, ids=[m for m, _ in MEGATRON_WARNINGS])
def test_megatron_fallback_warnings_are_ignored(module, message):
    assert not _warns(module, message)


def test_other_megatron_warnings_still_show():
    assert _warns("megatron.core.optimizer", "Transformer Engine and Apex are not installed. Falling back to SGD.")
    assert _warns("megatron.core.optimizer", "Falling back to Torch optimizers.")
    assert _warns("megatron.core.optimizer", MEGATRON_WARNINGS[1][1], DeprecationWarning)
    # The same text raised by any other module (ours included) is not ours to hide.
    assert _warns("pipeline.data.shards", MEGATRON_WARNINGS[1][1])


def test_real_imports_print_none_of_the_noise():
    """The table against the installed libraries: importing megatron-core (rank 0) and DeepSpeed
    (rank 1) after setup_logging prints nothing, though the noisy modules did load."""
    code = (
        "import sys\n"
        "from pipeline.logs import setup_logging\n"
        "setup_logging(rank=0)\n"
        "import megatron.core.datasets.indexed_dataset\n"
        "setup_logging(rank=1)\n"
        "import deepspeed\n"
        f"print(all(m in sys.modules for m in ('{FSDP}.mixed_precision', 'megatron.core.optimizer.clip_grads',"
        " 'deepspeed.accelerator.real_accelerator')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "PYTHONWARNINGS")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "True\n"
    assert done.stderr == ""


# ---------------------------------------------------------------------- JIT op builds
@pytest.fixture
def cpu_run(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def test_announces_the_shm_op_build_when_not_cached(cpu_run, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.test"):
        logs.announce_op_builds(logging.getLogger("pipeline.test"))
    assert [r.getMessage() for r in caplog.records] == [
        f"DeepSpeed builds its deepspeed_shm_comm op on first use (about 1-2 min, once; "
        f"cached in {cpu_run / 'deepspeed_shm_comm'})"]


def test_silent_when_the_op_is_built(cpu_run, caplog):
    (cpu_run / "deepspeed_shm_comm").mkdir()
    (cpu_run / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"\x7fELF")
    with caplog.at_level(logging.INFO, logger="pipeline.test"):
        logs.announce_op_builds(logging.getLogger("pipeline.test"))
    assert caplog.records == []


def test_silent_on_a_gpu_accelerator(cpu_run, monkeypatch, caplog):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with caplog.at_level(logging.INFO, logger="pipeline.test"):
        logs.announce_op_builds(logging.getLogger("pipeline.test"))
    assert caplog.records == []


def test_never_raises(cpu_run, monkeypatch, caplog):
    def broken(name):
        raise PermissionError(name)

    monkeypatch.setattr(logs, "torch_extension_dir", broken)
    with caplog.at_level(logging.INFO, logger="pipeline.test"):
        logs.announce_op_builds(logging.getLogger("pipeline.test"))
    assert caplog.records == []


def test_extension_dir_follows_torchs_rule(monkeypatch, tmp_path):
    cpp = pytest.importorskip("torch.utils.cpp_extension")
    if not hasattr(cpp, "_get_build_directory"):
        pytest.skip("torch no longer has _get_build_directory")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(cpp, "get_default_build_root", lambda: str(tmp_path))  # torch's call creates the dir
    assert logs.torch_extension_dir("some_op") == Path(cpp._get_build_directory("some_op", verbose=False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert logs.torch_extension_dir("some_op") == Path(cpp._get_build_directory("some_op", verbose=False))
