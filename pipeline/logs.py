"""Logs a person can read: each event once, third-party noise dropped where it is raised.

    from pipeline.logs import announce_op_builds, setup_logging
    setup_logging()            # first thing in a launcher's main(): rank 0 at INFO, other ranks WARNING
    announce_op_builds(log)    # before deepspeed.init_distributed: warns of a one-off C++ build

Library code keeps logging through `logging.getLogger(__name__)` and configures
nothing; only front ends call `setup_logging`. `LOG_NOISE` and `WARNING_NOISE`
list every line we drop, with its source and why it tells a user nothing. Each
row matches one message (a whole-message regex) at its source logger or warning
module, so other records from the same library - its real warnings - still get
through. A row that stops matching after an upgrade fails safe: the line reappears.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

FORMAT = "%(asctime)s %(name)s: %(message)s"
LOUD_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # warnings and errors say so
DATE_FORMAT = "%H:%M:%S"


@dataclass(frozen=True)
class LogNoise:
    """A `logging` record to drop: `pattern` matches its whole message on logger `logger`."""

    logger: str
    """The source logger's exact name (a filter there sees only that logger's own records)."""
    pattern: str
    """Regex for the whole message (`re.fullmatch`)."""
    level: int
    """The level it is emitted at; a record above it passes even if the text matches."""
    why: str
    """Why a user gains nothing from the line."""
    other_ranks_only: bool = False
    """Drop it on ranks > 0 only: rank 0 still shows it once."""


@dataclass(frozen=True)
class WarningNoise:
    """A Python warning to ignore, by category, attributed module and message."""

    category: type[Warning]
    module: str
    """Regex for the whole name of the module `warnings` attributes it to."""
    message: str
    """Regex for the whole message (case-insensitive, as `warnings.filterwarnings` compiles it)."""
    why: str


_FSDP = "megatron.core.distributed.fsdp.src.megatron_fsdp"
_FSDP_DETECTED = r"Detected Megatron Core, using Megatron-FSDP with Megatron\."
_FSDP_WHY = "importing any of megatron-core imports its FSDP package; we use only its indexed dataset"

LOG_NOISE: tuple[LogNoise, ...] = (
    LogNoise(f"{_FSDP}.mixed_precision", r"Using Megatron-FSDP without Transformer Engine\.", logging.INFO,
             _FSDP_WHY),
    LogNoise(f"{_FSDP}.param_and_grad_buffer", _FSDP_DETECTED, logging.INFO, _FSDP_WHY),
    LogNoise(f"{_FSDP}.megatron_fsdp", _FSDP_DETECTED, logging.INFO, _FSDP_WHY),
    LogNoise("megatron.core.datasets.indexed_dataset",
             r"Load the _IndexReader from .+|\tExtract the (sequence lengths|sequence pointers|document indices"
             r"|sequence modes)|\t> time elapsed: \S+ seconds|> total number of (sequences|documents): \d+",
             logging.INFO, "6 lines for every shard opened (eval opens each shard of a split)"),
    LogNoise("DeepSpeed", r"Attempting to get learning rate from scheduler before it has started", logging.WARNING,
             "DeepSpeed's own WarmupLR-family constructors call get_lr() before step 0, so every run "
             "with a scheduler logs it (once per rank); the learning rates it logs are unaffected"),
    LogNoise("DeepSpeed",
             r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it\.",
             logging.WARNING, "logged at `import deepspeed` by every rank of a CPU run; rank 0's copy is enough",
             other_ranks_only=True),
)

WARNING_NOISE: tuple[WarningNoise, ...] = (
    WarningNoise(FutureWarning, r"torch\.distributed\.c10d_logger",
                 r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated\. "
                 r"Please use `torch\.distributed\.(all_gather|reduce_scatter)_single` instead\.",
                 "DeepSpeed's ZeRO calls these collectives, not our code: once per rank under ZeRO-1/2, "
                 "twice per step per rank under ZeRO-3"),
    WarningNoise(UserWarning,
                 r"megatron\.core\.(optimizer(\.optimizer|\.clip_grads)?|distributed\.fsdp\.src\.megatron_fsdp"
                 r"\.mixed_precision)",
                 r"Transformer Engine and Apex are not installed\. Falling back to (Torch optimizers\."
                 r"|local implementations of multi_tensor_applier(, multi_tensor_l2norm,)? and multi_tensor_scale)",
                 "raised at import by megatron-core's optimizer and FSDP code, which we do not use"),
)


# ---------------------------------------------------------------------- setup
def setup_logging(rank: int | None = None, level: int = logging.INFO) -> None:
    """Configure the root logger for a front end (in place of `logging.basicConfig`) and
    install the noise filters; idempotent. Call it before DeepSpeed or megatron-core is
    imported, or their import-time lines are already out.

    `rank` (default: env RANK, else 0) > 0 logs WARNING and above only, so each
    info line of a multi-rank run appears once; those ranks' lines carry `[rank N]`.
    """
    rank = _env_rank() if rank is None else rank
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        handler = _Handler()
        root.addHandler(handler)
    handler.setFormatter(_Formatter(rank))
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    install_noise_filters(rank)


def install_noise_filters(rank: int = 0) -> None:
    """Drop the `LOG_NOISE` records and ignore the `WARNING_NOISE` warnings in this process.

    Call before the noisy libraries are imported (their import-time lines are on the list);
    calling it again replaces, never duplicates, the filters.
    """
    by_logger: dict[str, list[LogNoise]] = {}
    for row in LOG_NOISE:
        if rank > 0 or not row.other_ranks_only:
            by_logger.setdefault(row.logger, []).append(row)
    for name in {row.logger for row in LOG_NOISE}:
        logger = logging.getLogger(name)  # the library's own logger, created early if not yet imported
        for f in [f for f in logger.filters if isinstance(f, _DropNoise)]:
            logger.removeFilter(f)
        if name in by_logger:
            logger.addFilter(_DropNoise(by_logger[name]))
    for w in WARNING_NOISE:
        # Re-adding an identical filter moves it to the front instead of duplicating it.
        warnings.filterwarnings("ignore", message=w.message + r"\Z", category=w.category, module=w.module + r"\Z")


class _Handler(logging.StreamHandler):
    """Our stderr handler on the root logger (its class marks it, for idempotence)."""


class _Formatter(logging.Formatter):
    """`12:00:01 pipeline.train.trainer: step 10/20 ...`; warnings and errors name their level."""

    def __init__(self, rank: int) -> None:
        tag = f"[rank {rank}] " if rank > 0 else ""
        super().__init__(FORMAT.replace("%(name)s", tag + "%(name)s"), datefmt=DATE_FORMAT)
        self._loud = logging.Formatter(LOUD_FORMAT.replace("%(name)s", tag + "%(name)s"), datefmt=DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return self._loud.format(record) if record.levelno >= logging.WARNING else super().format(record)


class _DropNoise(logging.Filter):
    """Drops a source logger's records whose whole message matches one of its `LogNoise` rows."""

    def __init__(self, rows: list[LogNoise]) -> None:
        super().__init__()
        self._rows = [(re.compile(row.pattern), row.level) for row in rows]

    def filter(self, record: logging.LogRecord) -> bool:
        rows = [p for p, level in self._rows if record.levelno <= level]
        if not rows:
            return True
        message = record.getMessage()
        return not any(p.fullmatch(message) for p in rows)


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


# ---------------------------------------------------------------------- JIT op builds
SHM_OP = "deepspeed_shm_comm"
"""The op DeepSpeed JIT-builds on a CPU run: the shared-memory collectives `deepspeed.comm`'s
TorchBackend loads in `init_distributed` (deepspeed/comm/torch.py, `ShareMemCommBuilder`).
GPU accelerators have no such builder; the torch-Adam optimizers of our CPU configs build nothing."""


def announce_op_builds(log: logging.Logger) -> None:
    """Log one line if DeepSpeed is about to JIT-build its C++ op (a silent minute or two, once).

    Checks for the built library without building anything or importing DeepSpeed;
    cheap, never raises. Log on rank 0 only (as `setup_logging` arranges).
    """
    try:
        if sys.platform != "linux" or not _cpu_accelerator() or _shipped_prebuilt(SHM_OP):
            return  # the builder exists on Linux CPU runs only; a prebuilt op is never JIT-built
        build_dir = torch_extension_dir(SHM_OP)
        if not (build_dir / f"{SHM_OP}.so").is_file():
            log.info("DeepSpeed builds its %s op on first use (about 1-2 min, once; cached in %s)",
                     SHM_OP, build_dir)
    except Exception:  # noqa: BLE001 - an announcement must never stop a run
        return


def torch_extension_dir(name: str) -> Path:
    """Where `torch.utils.cpp_extension.load(name=...)` builds and caches extension `name`.

    The rule of torch's `_get_build_directory`, without creating the directory:
    `$TORCH_EXTENSIONS_DIR/<name>`, else `<default root>/py<XY>_<cpu|cuXYZ|rocmXY>/<name>`.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root) / name
    import torch
    import torch.utils.cpp_extension as cpp

    if torch.version.hip is not None:
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accel = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accel = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(cpp.get_default_build_root()) / f"{py}_{accel}" / name


def _cpu_accelerator() -> bool:
    """Whether DeepSpeed will pick its CPU accelerator: DS_ACCELERATOR says so, or there is no
    usable CUDA device (DeepSpeed's XPU/NPU/HPU/MPS probes are not repeated here)."""
    forced = os.environ.get("DS_ACCELERATOR")
    if forced:
        return forced == "cpu"
    import torch

    return not torch.cuda.is_available()


def _shipped_prebuilt(name: str) -> bool:
    """Whether DeepSpeed is missing, or was installed with op `name` compiled in (DS_BUILD_OPS=1)."""
    spec = importlib.util.find_spec("deepspeed")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return True
    return any(Path(spec.submodule_search_locations[0], "ops", "comm").glob(f"{name}_op*"))
