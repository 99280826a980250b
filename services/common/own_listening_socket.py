"""Each ``bentoml serve`` worker listens on a socket of its own, so connections spread evenly.

BentoML's workers of a service share one listening socket, bound by the supervisor (circus)
(bentoml/BentoML#5426). Whichever worker's event loop wakes first accepts every connection then
pending (uvloop accepts until the queue is empty), and a keep-alive client stays with the worker
that accepted it. Measured on a 2-core machine, 256 clients over 8 entry workers held 91, 78,
40, 26, 9, 5, 4 and 3 connections: the busiest workers' clients queue behind a saturated event
loop while others idle (bench/RESULTS.md).

With ``SO_REUSEPORT`` each worker has its own listening socket on the same address, and the
kernel hashes each new connection to one of them (Linux; other systems keep the shared socket).
The shared socket was bound without ``SO_REUSEPORT``, so no other socket may bind its port while
it listens. A worker therefore shuts it down first: that stops it listening for every process
holding it, while it keeps its address (bound with ``SO_REUSEADDR``, which lets listening
sockets bind beside a bound socket that does not listen). The worker then binds its own socket
and puts it on the file descriptor that BentoML's worker script hands to uvicorn (``dup2``).

When: at the end of the service's ``__init__``. BentoML runs it in the worker once uvicorn has
started and before uvicorn accepts on the descriptor, so a worker still loading its model (at
start, or respawned after a crash) is given no connection until it is ready: the kernel hashes
new connections only over sockets that listen. What a shared socket does and this does not:
connections waiting in a worker's own queue when that worker dies are reset rather than taken by
another worker (circus starts a new one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys

log = logging.getLogger(__name__)

# The module that `bentoml serve` runs for each HTTP worker, with `--fd N`: the shared socket.
BENTOML_WORKER_MODULE = "_bentoml_impl.worker.service"


def inherited_listening_fd(argv: list[str] | None = None) -> int | None:
    """The shared socket's descriptor, where this process is a ``bentoml serve`` HTTP worker."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if argv is None:
        if main_spec is None or main_spec.name != BENTOML_WORKER_MODULE:
            return None
        argv = sys.argv
    for index, argument in enumerate(argv):
        if argument == "--fd" and index + 1 < len(argv):
            value = argv[index + 1]
        elif argument.startswith("--fd="):
            value = argument.removeprefix("--fd=")
        else:
            continue
        return int(value) if value.isdigit() else None
    return None


def listen_on_own_socket(fd: int) -> bool:
    """Replace the shared TCP listening socket on ``fd`` with one of this process's own, bound
    with ``SO_REUSEPORT`` to the same address. False, with the shared socket kept, where that is
    not possible: not Linux, not TCP, or the address cannot be bound."""
    if not sys.platform.startswith("linux"):
        return False
    shared = socket.socket(fileno=os.dup(fd))  # a handle of our own: closing it leaves `fd` open
    try:
        if shared.family not in (socket.AF_INET, socket.AF_INET6) or shared.type != socket.SOCK_STREAM:
            return False  # a Unix socket: one per service, its workers reach it by path
        address = shared.getsockname()
        own = socket.socket(shared.family, socket.SOCK_STREAM)
        try:
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if shared.family == socket.AF_INET6:
                v6only = shared.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                own.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            with contextlib.suppress(OSError):  # another worker has shut it down already
                shared.shutdown(socket.SHUT_RDWR)
            try:
                own.bind(address)
                own.listen(socket.SOMAXCONN)  # uvicorn sets its own backlog when it serves
            except OSError as error:
                shared.listen(socket.SOMAXCONN)  # listen as before rather than not at all
                log.warning("keeping the shared listening socket on %s: %s", address, error)
                return False
            os.dup2(own.fileno(), fd)
        finally:
            own.close()
    finally:
        shared.close()
    log.debug("listening on a socket of this worker's own on %s", address)
    return True


def listen_on_own_socket_when_ready() -> bool:
    """Call at the end of a service's ``__init__`` (once per worker: BentoML makes one service
    instance in each): where this process is a ``bentoml serve`` HTTP worker, it listens on a
    socket of its own from now on, unless ``MULTIMODAL_OWN_LISTENING_SOCKETS`` is off."""
    from configuration.settings import get_settings

    if not get_settings().own_listening_sockets:
        return False
    fd = inherited_listening_fd()
    return fd is not None and listen_on_own_socket(fd)
