"""Test helper shipped in the package: run a function on N gloo CPU ranks, in-process.

    from pipeline.train.testing import run_distributed
    results = run_distributed(my_check, arg1, world_size=2)   # [rank 0's return, rank 1's, ...]

Each rank is a fresh `spawn`ed process with the environment `deepspeed` itself
would set (MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE) and an initialised
gloo process group, so code under test runs exactly as under
`deepspeed --num_gpus N` minus the launcher's ~25 s of start-up. `fn` must be
importable (a module-level function) and its arguments and result picklable.
A failure on any rank is re-raised here with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, kwargs: dict,
            queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)})
    if backend == "gloo":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks, as the tests and the CPU benchmark want
    try:
        from pipeline.logs import install_noise_filters

        install_noise_filters(rank)  # before `import deepspeed`, whose import-time lines are on its list
        import deepspeed
        import torch

        if backend == "gloo":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # ranks share the cores
        else:
            torch.cuda.set_device(rank)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        queue.put((rank, True, fn(*args, **kwargs)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2, backend: str = "gloo",
                    timeout: float = 600, **kwargs: Any) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` ranks (gloo on CPU; nccl = one GPU per rank);
    the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, kwargs, queue), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(failures) < world_size:
        if not queue.empty():
            rank, ok, value = queue.get()
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
                break  # the other ranks may be stuck in a collective: stop them below
        elif time.monotonic() > deadline:
            failures.append(f"timed out after {timeout:.0f} s")
            break
        elif not any(p.is_alive() for p in procs) and queue.empty():
            failures.append("ranks exited without reporting (killed?)")
            break
        else:
            time.sleep(0.05)
    for p in procs:
        p.join(timeout=30 if not failures else 2)
        if p.is_alive():
            p.terminate()
            p.join()
    if failures:
        raise RuntimeError("distributed run failed on " + "\n".join(failures))
    return [results[r] for r in range(world_size)]

