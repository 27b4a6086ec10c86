"""Where cells run: in this process, in a pool of local worker processes, or as Ray tasks.

Every executor runs the same JSON-in, JSON-out function (`cells.execute`) and hands back the row it produced; only
the driver writes rows into SQLite, so workers never contend for the store. Models travel through the shared
directory, never through pickles or the Ray object store.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlparse

from .._optional import optional_import
from ..errors import SparselmError
from .cells import Cell, estimated_memory_bytes, execute, failed_row
from .config import CellKind, StudyConfig, resources_of

Outcome = tuple[Cell, dict[str, Any]]
RAY_CONNECT_TIMEOUT_S = 5.0
# HTTP/2 (RFC 9113 §3.4): the client's preface is this string and a SETTINGS frame; a server's first frame is SETTINGS.
HTTP2_SETTINGS = 0x4
HTTP2_FRAME_HEADER = 9
HTTP2_CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, HTTP2_SETTINGS, 0, 0, 0, 0, 0])


class Executor(Protocol):
    """Runs cells; `capacity` cells may be in flight at once."""

    name: str
    capacity: int

    def submit(self, cell: Cell) -> None: ...

    def wait(self) -> list[Outcome]:
        """Block until at least one submitted cell is done and return every finished one."""
        ...

    def close(self) -> None: ...


class InProcessExecutor:
    """One cell at a time in this process: the simplest and the default (`--workers 1`)."""

    name = "local"
    capacity = 1

    def __init__(self, config: StudyConfig, out: str) -> None:
        self.config_json = config.model_dump(mode="json")
        self.out = out
        self.queue: list[Cell] = []

    def submit(self, cell: Cell) -> None:
        self.queue.append(cell)

    def wait(self) -> list[Outcome]:
        cell = self.queue.pop(0)
        return [(cell, execute(cell.to_json(), self.config_json, self.out, self.name))]

    def close(self) -> None:
        self.queue.clear()


class ProcessPoolExecutor:
    """`--workers N` local worker processes, each with its share of the CPU threads; they die with the driver."""

    name = "local"

    def __init__(self, config: StudyConfig, out: str, workers: int) -> None:
        self.config_json = config.model_dump(mode="json")
        self.out = out
        self.capacity = workers
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.pool = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads,),
        )
        self.futures: dict[cf.Future, Cell] = {}

    def submit(self, cell: Cell) -> None:
        future = self.pool.submit(execute, cell.to_json(), self.config_json, self.out, self.name)
        self.futures[future] = cell

    def wait(self) -> list[Outcome]:
        done, _ = cf.wait(self.futures, return_when=cf.FIRST_COMPLETED)
        return [(self.futures.pop(f), f.result()) for f in done]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(threads: int) -> None:
    """Share the cores between workers, and make sure a SIGKILLed driver leaves no orphan writing into DIR."""
    import torch
    from transformers.utils import logging

    torch.set_num_threads(threads)
    logging.disable_progress_bar()
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class RayExecutor:
    """Each cell a Ray task declaring its CPUs, GPUs and memory; the driver gathers rows as tasks finish."""

    name = "ray"

    def __init__(self, config: StudyConfig, out: str, address: str | None, workers: int | None) -> None:
        ray = optional_import("ray", "ray", "the Ray executor")
        self.ray = ray
        if address:
            check_ray_address(address)
        env = {k: v for k in ("SPARSELM_CACHE", "HF_HUB_OFFLINE", "HF_HOME") if (v := os.environ.get(k))}
        self.owns_ray = not ray.is_initialized()
        try:
            if self.owns_ray:
                ray.init(
                    address=address,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": env} if env else None,
                    **({} if address else {"num_cpus": workers or os.cpu_count()}),
                )
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            raise SparselmError(
                f"cannot connect to the Ray cluster at '{address}' ({exc}); start one with `ray start --head` "
                "or drop --ray-address to start a local one"
            ) from None
        self.cluster = ray.cluster_resources()
        self.capacity = max(1, int(self.cluster.get("CPU", 1)))
        wants_gpu = [kind for kind in CellKind if resources_of(config.resources, kind).gpus > 0]
        if wants_gpu and not self.cluster.get("GPU"):
            raise SparselmError(
                f"resources.{wants_gpu[0].value} asks for GPUs but the Ray cluster has none; set gpus: 0 or add GPU nodes"
            )
        self.config = config
        self.config_json = config.model_dump(mode="json")
        self.out = out
        self.remote = ray.remote(execute)
        self.refs: dict[Any, Cell] = {}

    def submit(self, cell: Cell) -> None:
        options = self.task_options(cell)

        ref = self.remote.options(**options).remote(cell.to_json(), self.config_json, self.out, self.name)
        self.refs[ref] = cell

    def task_options(self, cell: Cell) -> dict[str, Any]:
        """The cell's declared resources, capped at what the whole cluster has (a larger ask could never run)."""
        res = resources_of(self.config.resources, cell.kind)
        memory = int(res.memory_gb * 2**30) if res.memory_gb else estimated_memory_bytes(cell.model)
        options: dict[str, Any] = {
            "num_cpus": min(res.cpus, self.cluster.get("CPU", res.cpus)),
            "num_gpus": res.gpus,
            "max_retries": 0,
        }
        if memory:
            options["memory"] = int(min(memory, self.cluster.get("memory", memory)))
        return options

    def wait(self) -> list[Outcome]:
        done, _ = self.ray.wait(list(self.refs), num_returns=1)
        outcomes = []
        for ref in done:
            cell = self.refs.pop(ref)
            try:
                outcomes.append((cell, self.ray.get(ref)))
            except self.ray.exceptions.RayError as exc:  # the worker died (e.g. out of memory): record, go on
                reason = f"Ray task failed: {type(exc).__name__}: {exc}"
                outcomes.append((cell, failed_row(cell, self.config, self.name, reason)))
        return outcomes

    def close(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        self.refs.clear()
        if self.owns_ray:
            self.ray.shutdown()


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Fail fast, with a clear message, when a Ray address does not answer (ray.init would wait a long time).

    Ray's GCS (HOST:PORT) and Ray client server (ray://HOST:PORT) are gRPC servers: a TCP connection with a
    deadline, then HTTP/2's connection preface, which every such server answers with a SETTINGS frame. A refused
    connection, silence (a firewall or proxy that accepts anything) or another protocol means no cluster is there;
    whether the server is really Ray is left to ray.init.
    """
    if address == "auto" or address.startswith("local"):
        return
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    client = parsed.scheme == "ray"
    try:
        host, port = parsed.hostname, parsed.port or (10001 if client else 6379)
    except ValueError:  # a port that is not a number
        host, port = None, 0
    if not host or parsed.scheme not in ("ray", "gcs"):
        raise SparselmError(f"'{address}' is not a Ray address; use HOST:PORT (GCS) or ray://HOST:PORT (Ray client)")
    reason = _grpc_silence(host, port, timeout)
    if reason:
        raise SparselmError(
            f"the Ray cluster at '{address}' does not answer ({host}:{port}: {reason}, waited at most {timeout:g} s); "
            "check the address and that `ray start --head` runs there, or drop --ray-address for a local cluster"
        )


def _grpc_silence(host: str, port: int, timeout: float) -> str | None:
    """Why no gRPC server answers at host:port within `timeout` seconds, or None when one does."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(HTTP2_CLIENT_PREFACE)
            header = b""
            while len(header) < HTTP2_FRAME_HEADER:
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = conn.recv(HTTP2_FRAME_HEADER - len(header))
                if not chunk:
                    return "closed the connection without answering"
                header += chunk
    except TimeoutError:
        return "timed out"
    except OSError as exc:
        return (exc.strerror or type(exc).__name__).lower()
    return None if header[3] == HTTP2_SETTINGS else "answers, but not as a gRPC server"


def make_executor(
    kind: str, config: StudyConfig, out: str, workers: int | None, address: str | None
) -> Executor:
    if kind == "ray":
        return RayExecutor(config, out, address, workers)
    if address:
        raise SparselmError("--ray-address only applies to --executor ray; add --executor ray or drop the address")
    if kind != "local":
        raise SparselmError(f"unknown executor '{kind}'; use local or ray")
    if workers is None or workers == 1:
        return InProcessExecutor(config, out)
    if workers < 1:
        raise SparselmError(f"--workers must be at least 1, got {workers}")
    return ProcessPoolExecutor(config, out, workers)


def schedule(
    cells: list[Cell],
    done: set[tuple],
    executor: Executor,
    record: Callable[[Cell, dict[str, Any]], None],
    skip: Callable[[Cell, str], None],
) -> None:
    """Run every cell not in `done`, each once the prune cell it depends on has succeeded.

    Rows are recorded the moment each cell finishes, so a kill loses only the cells in flight. A failed prune marks
    its dependants as failed (skipped) instead of running them on a model that does not exist.
    """
    ok = set(done)
    failed: set[tuple] = set()
    waiting = [c for c in cells if c.key not in done]
    in_flight = 0
    while waiting or in_flight:
        still: list[Cell] = []
        for cell in waiting:
            dep = cell.prune_cell
            if dep is not None and dep.key in failed:
                skip(cell, f"skipped: its pruned model could not be made (see the prune row of {dep.label})")
            elif (dep is None or dep.key in ok) and in_flight < executor.capacity:
                executor.submit(cell)
                in_flight += 1
            else:
                still.append(cell)
        waiting = still
        if not in_flight:
            if waiting:  # only reachable if a dependency is missing from the plan
                raise SparselmError(f"internal: {len(waiting)} cells wait on prune cells that are not planned")
            break
        for cell, row in executor.wait():
            in_flight -= 1
            record(cell, row)
            (ok if row["status"] == "ok" else failed).add(cell.key)
