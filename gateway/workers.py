"""`tailor serve --workers N`: N server processes, each listening on a socket of its own on the same
address (SO_REUSEPORT), so the kernel spreads new connections across them.

uvicorn's own `--workers` shares one listening socket between its processes, and the first to wake
accepts every connection pending: a burst of keep-alive connections (a load balancer's pool, the
benchmark's 64) can all land on one worker while the others idle (loadtests/bench_workers.py saw
two workers give 1.46x one, the second run on one core). With a socket per worker the kernel picks
the worker of each connection by its address hash.

The supervisor starts the workers, starts another when one exits, and on SIGINT or SIGTERM asks
each to stop (uvicorn's graceful shutdown: requests in flight finish) and waits for them.
"""

from __future__ import annotations

import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import signal
import socket
import time
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("tailor.workers")

# A worker that exits sooner than this after its start is started again only after a pause, so a
# worker that cannot start (a broken snapshot directory, say) does not spin the supervisor.
EARLY_EXIT_S = 5.0
RESTART_PAUSE_S = 2.0
STOP_WAIT_S = 30.0  # then a worker still running is killed


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not listening yet: every worker binds
    one, and the kernel balances connections across those that listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _work(options: dict[str, Any], host: str, port: int) -> None:
    """One worker: uvicorn on a socket of its own."""
    server = uvicorn.Server(uvicorn.Config(**options, host=host, port=port))
    server.run(sockets=[bound_socket(host, port)])


def supervise(options: dict[str, Any], *, host: str, port: int, workers: int) -> None:
    """Run `workers` uvicorn servers made from `options` (uvicorn.Config's arguments) on (host,
    port) until SIGINT or SIGTERM."""
    if options.get("log_config"):
        logging.config.dictConfig(options["log_config"])  # as each worker's uvicorn.Config does
    # The supervisor's own socket is bound but never listens, so it takes no connections: it fails
    # here, once, when the address is taken, and it keeps the port (port 0 picks one) for workers
    # started later.
    anchor = bound_socket(host, port)
    port = anchor.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def start() -> tuple[Any, float]:
        process = spawn.Process(target=_work, args=(options, host, port), name="tailor-worker")
        process.start()
        return process, time.monotonic()

    handlers = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    running = [start() for _ in range(workers)]
    log.info("started %d workers on %s:%d, a listening socket each", workers, host, port)
    try:
        while not stopping:
            multiprocessing.connection.wait([process.sentinel for process, _ in running], timeout=0.5)
            for at, (process, started) in enumerate(running):
                if process.is_alive() or stopping:
                    continue
                log.warning("worker %d (pid %s) exited with %s; starting another", at, process.pid, process.exitcode)
                if time.monotonic() - started < EARLY_EXIT_S:
                    time.sleep(RESTART_PAUSE_S)
                running[at] = start()
    finally:
        for process, _ in running:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        deadline = time.monotonic() + STOP_WAIT_S
        for process, _ in running:
            process.join(max(deadline - time.monotonic(), 0))
            if process.is_alive():
                log.warning("worker pid %s did not stop in %.0f s; killing it", process.pid, STOP_WAIT_S)
                process.kill()
                process.join()
        anchor.close()
        for number, handler in handlers.items():
            signal.signal(number, handler)
