"""A worker's own listening socket: it replaces the shared one on the same descriptor and address,
the shared one stops taking connections, and connections spread over the workers' sockets.

Workers are simulated in one process: each "worker" holds its own descriptor of the shared socket,
as each process forked by circus does."""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from services.common.own_listening_socket import inherited_listening_fd, listen_on_own_socket


@pytest.fixture
def shared() -> Iterator[socket.socket]:
    """A listening socket bound as circus binds it: SO_REUSEADDR, no SO_REUSEPORT."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    yield sock
    sock.close()


def accept_all(sock: socket.socket) -> int:
    sock.setblocking(False)
    accepted = 0
    while True:
        try:
            connection, _ = sock.accept()
        except BlockingIOError:
            return accepted
        connection.close()
        accepted += 1


def test_workers_each_take_a_share_of_connections_on_their_own_sockets(shared: socket.socket) -> None:
    address = shared.getsockname()
    worker_fds = [os.dup(shared.fileno()) for _ in range(4)]
    try:
        assert all(listen_on_own_socket(fd) for fd in worker_fds)
        workers = [socket.socket(fileno=fd) for fd in worker_fds]  # what uvicorn makes of the descriptor
        assert [w.getsockname() for w in workers] == [address] * 4
        assert len({os.fstat(w.fileno()).st_ino for w in workers}) == 4  # four sockets, not one shared

        clients = [socket.create_connection(address, timeout=5) for _ in range(400)]
        counts = Counter({index: accept_all(worker) for index, worker in enumerate(workers)})
        for client in clients:
            client.close()
        assert sum(counts.values()) == 400  # the shared socket, shut down, took none
        # A 4-tuple hash over 4 sockets: about 100 each (a shared socket gives one worker all 400).
        assert min(counts.values()) >= 50, counts
        shared.setblocking(False)
        with pytest.raises(OSError):  # no longer listening
            shared.accept()
    finally:
        for fd in worker_fds:
            os.close(fd)


def test_a_worker_asked_twice_keeps_serving(shared: socket.socket) -> None:
    fd = os.dup(shared.fileno())
    try:
        assert listen_on_own_socket(fd)
        assert listen_on_own_socket(fd)  # shuts down its own first socket, binds another
        client = socket.create_connection(shared.getsockname(), timeout=5)
        assert accept_all(socket.socket(fileno=os.dup(fd))) == 1
        client.close()
    finally:
        os.close(fd)


def test_a_unix_socket_is_kept(tmp_path) -> None:
    path = str(tmp_path / "service.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    try:
        inode = os.fstat(sock.fileno()).st_ino
        assert not listen_on_own_socket(sock.fileno())
        assert os.fstat(sock.fileno()).st_ino == inode
        socket.socket(socket.AF_UNIX).connect(path)  # still listening
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("argv", "fd"),
    [
        (["service.py", "services.gateway:Gateway", "--fd", "7", "--service-name", "Gateway"], 7),
        (["service.py", "services.gateway:Gateway", "--fd=9"], 9),
        (["service.py", "services.gateway:Gateway", "--fd", "$(circus.sockets.x)"], None),
        (["service.py", "services.gateway:Gateway"], None),
    ],
)
def test_the_shared_descriptor_is_read_from_the_worker_arguments(argv: list[str], fd: int | None) -> None:
    assert inherited_listening_fd(argv) == fd


def test_a_process_that_is_not_a_bentoml_worker_has_none() -> None:
    assert inherited_listening_fd() is None  # pytest's __main__ is not BentoML's worker script
