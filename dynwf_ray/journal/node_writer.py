"""One writer per machine for a SQLite journal: the host processes' writes, committed together.

SQLite lets one transaction write at a time. With a group commit per host process
(`GroupCommit`), the processes of one machine take turns on the file, each turn
carrying only its own process's writes: more processes, as many commits, each
waited for longer (docs/benchmarks.md, "SQLite shared by host processes").

Here one process (`NodeWriter`, served from the loader) commits for every host
process on the machine: each host process sends the writes its activations queued
(`NodeWriterClient`, the same awaitable writes as `GroupCommit`) as one message
over a Unix socket, and the writer runs every message that has arrived in one
transaction (`group_commit.commit_batch`, as a group commit does), so one commit
carries the writes of every process. A write still returns only once the commit
that holds it is durable.

- Where: a socket named after the journal file in this user's private directory
  (`wakeup.private_directory`), so every trusted process of the machine finds it
  from the journal URL alone. One process serves a file at a time: the one that
  holds `<socket>.lock`.
- Who may send: this user's processes (the directory is theirs alone, and the
  writer checks each peer's uid). A message holds only the writes' names and
  arguments; the writer unpickles no class but the journal's records
  (`_Unpickler`). Sandboxes cannot reach it: the strict jail allows no Unix socket.
- No writer (none started, or it ended): a client writes its own turns on the file,
  as without one, and tries the writer again after `RETRY_S`.
- The writer gone with writes unanswered: whether they committed is unknown, so they
  fail with `JournalUnavailableError` ("writer lost"), never sent again (a claim
  is not idempotent); their activations are abandoned and run again from their last
  step, as after any journal fault, and instances a lost claim may have leased wait
  for that lease to lapse.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import hashlib
import io
import logging
import os
import pickle
import selectors
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import JournalUnavailableError
from ..wakeup import private_directory
from .group_commit import ActivationWriteQueue, commit_batch, settle
from .schema import LeaseLostError

if TYPE_CHECKING:
    from . import Journal

log = logging.getLogger("dynwf_ray.journal")

#: Seconds a client that found no writer writes its own turns before it looks again.
RETRY_S = 5.0

_HEADER = struct.Struct("!I")  # each message: its length, then a pickle
_MAX_MESSAGE = 256 << 20
_MAX_PATH = 107


def address(database_url: str, create: bool = False) -> str | None:
    """The socket of the writer for this SQLite journal file on this machine; None for
    another journal (PostgreSQL orders its writers itself, an in-memory database has
    one process) or where this user has no private directory."""
    from . import sqlite_url_path

    path = sqlite_url_path(database_url)
    if not path or path == ":memory:":
        return None
    directory = private_directory(create)
    if directory is None:
        return None
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:24]
    sock = os.path.join(directory, f"writer-{digest}.sock")
    return sock if len(os.fsencode(sock)) <= _MAX_PATH else None


class NodeWriter:
    """Serves one journal's activation writes to this machine's host processes.

    `start()` serves on a thread of its own and says whether this process is the
    machine's writer for the file: False when another process already is, or there is
    no socket to serve on. The thread reads every message that has arrived, runs all
    their writes in one transaction (`group_commit.commit_batch`; messages that arrive
    while it waits for its turn on the file join it), answers each message, and reads
    again: while it commits, the next messages queue in their sockets."""

    def __init__(self, journal: "Journal"):
        self._journal = journal
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None  # a byte here ends the serving thread
        self._wake_w: socket.socket | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.path: str | None = None
        self._stats = {"clients": 0, "messages": 0, "writes": 0, "refused": 0,
                       "group_commits": 0, "group_writes": 0, "group_max": 0}

    def start(self) -> bool:
        path = address(self._journal.url, create=True)
        if path is None:
            return False
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is this file's writer
            os.close(fd)
            return False
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(path)  # left by a writer that was killed
            except FileNotFoundError:
                pass
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(64)
        except OSError as exc:
            listener.close()
            os.close(fd)
            log.warning("no journal writer for this machine at %s (%s): host processes "
                        "take turns on the file", path, exc)
            return False
        listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._listener, self._lock_fd, self.path = listener, fd, path
        self._thread = threading.Thread(target=self._serve, name="dynwf-node-writer", daemon=True)
        self._thread.start()
        log.info("journal writer for this machine serving at %s", path)
        return True

    def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._wake_w.send(b"x")
        self._thread.join(10)
        self._wake_w.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._lock_fd)

    def stats(self) -> dict[str, int]:
        """Clients connected so far, messages and writes served, connections refused, and
        the commits that carried those writes (`group_commits`, `group_writes`, `group_max`)."""
        return dict(self._stats)

    # -- the serving thread ---------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._closed:
                batch: list = []
                try:
                    batch = self._read(None)
                    if batch:
                        self._commit(batch)
                except Exception:  # noqa: BLE001 - a bug; the writer goes on serving
                    log.exception("journal writer: a batch failed; its clients' connections "
                                  "are closed (their writes' outcome is unknown to them)")
                    for connection in {item[2].connection for item in batch}:
                        self._drop(connection, None)
        finally:
            for key in list(self._selector.get_map().values()):
                key.fileobj.close()
            self._selector.close()

    def _read(self, timeout: float | None) -> list:
        """Wait up to `timeout` (None: until something comes) and read what came: the
        writes of every whole message, as (fn, args, its `_Message`), in order."""
        batch: list = []
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                self._closed = True
            else:
                key.data.receive(self, batch)
        return batch

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        _, uid, _ = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid():
            self._stats["refused"] += 1
            sock.close()
            return
        sock.settimeout(SEND_TIMEOUT_S)  # reads only when the selector says data came
        self._selector.register(sock, selectors.EVENT_READ, _Connection(sock))
        self._stats["clients"] += 1

    def _commit(self, batch: list) -> None:
        results, together = commit_batch(self._journal, batch, lambda: self._read(0))
        if together:
            self._stats["group_commits"] += 1
            self._stats["group_writes"] += len(batch)
            self._stats["group_max"] = max(self._stats["group_max"], len(batch))
        answered: list[_Message] = []
        for (_, _, message), (ok, value) in zip(batch, results):
            message.results.append((ok, value) if ok else (False, _sendable(value)))
            if len(message.results) == message.size:
                answered.append(message)
        for message in answered:
            message.connection.answer(self, message.results)

    def _drop(self, connection: "_Connection", why: str | None) -> None:
        if why is not None:
            log.warning("journal writer: closing a connection that sent %s", why)
            self._stats["refused"] += 1
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.sock.close()
        connection.closed = True


#: Longest the writer waits for a client to take an answer before it drops the client.
SEND_TIMEOUT_S = 10.0


class _Message:
    """One client message being answered: its writes' results, in order."""

    __slots__ = ("connection", "size", "results")

    def __init__(self, connection: "_Connection", size: int):
        self.connection, self.size, self.results = connection, size, []


class _Connection:
    """The writer's side of one client: bytes in, whole messages out; answers back."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.closed = False
        self._buffer = bytearray()

    def receive(self, writer: NodeWriter, batch: list) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:  # the client went away; what it sent and we run is answered to nobody
            writer._drop(self, None)
            return
        self._buffer += data
        journal = writer._journal
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > _MAX_MESSAGE:
                return writer._drop(self, f"a message of {size} bytes")
            if len(self._buffer) < _HEADER.size + size:
                return
            body = bytes(self._buffer[_HEADER.size:_HEADER.size + size])
            del self._buffer[:_HEADER.size + size]
            try:
                writes = _Unpickler(io.BytesIO(body)).load()
                if not isinstance(writes, list) or not writes or not all(
                        isinstance(w, tuple) and len(w) == 2 and w[0] in ActivationWriteQueue.NAMES
                        and isinstance(w[1], tuple) for w in writes):
                    raise ValueError("not a list of (write, arguments)")
            except Exception as exc:  # noqa: BLE001 - the client is not one of ours
                return writer._drop(self, f"a message that is not writes ({exc})")
            message = _Message(self, len(writes))
            batch.extend((getattr(journal, f"_{name}"), args, message) for name, args in writes)
            writer._stats["messages"] += 1
            writer._stats["writes"] += len(writes)

    def answer(self, writer: NodeWriter, results: list) -> None:
        if self.closed:
            return
        data = _dumps(results)
        try:
            self.sock.sendall(_HEADER.pack(len(data)) + data)
        except OSError:  # gone, or not reading its answers
            writer._drop(self, None)


class NodeWriterClient(ActivationWriteQueue):
    """A host process's side: its activations' writes, sent to the machine's writer.

    Writes queued in one turn of the event loop go as one message; answers come back
    in order. Without a writer the writes go to this process's own group commit
    (`Journal.grouped` as without a writer), and the writer is looked for again after
    `RETRY_S`. Bound to one event loop at a time (a host process has one): that of its
    first write, or of the next once it is closed; writes from any other loop go to the
    process's own group commit."""

    def __init__(self, journal: "Journal", path: str):
        self._journal = journal
        self.path = path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._connecting = False
        self._flushing = False
        self._alone_until = float("-inf")
        self._queued: list[tuple[str, tuple, asyncio.Future]] = []
        self._sent: collections.deque[list[asyncio.Future]] = collections.deque()
        self._stats = {"node_writer_messages": 0, "node_writer_writes": 0,
                       "node_writer_alone": 0, "node_writer_lost": 0}

    def stats(self) -> dict[str, int]:
        """Messages and writes sent; times no writer was found (the writes were this
        process's own); writes lost with a writer that ended before answering."""
        return dict(self._stats)

    def _submit(self, name: str, args: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if loop is not self._loop and (self._loop is None or self._loop.is_closed()):
            self._loop, self._transport, self._connecting = loop, None, False
            self._queued, self._sent = [], collections.deque()
        if loop is not self._loop or (self._transport is None and not self._connecting
                                      and time.monotonic() < self._alone_until):
            return self._journal._own_group_commit()._submit(name, args)
        future = loop.create_future()
        self._queued.append((name, args, future))
        if self._transport is None:
            if not self._connecting:
                self._connecting = True
                loop.create_task(self._connect())
        elif not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush)
        return future

    async def _connect(self) -> None:
        try:
            self._transport, _ = await self._loop.create_unix_connection(
                lambda: _Answers(self), self.path)
        except OSError as exc:
            self._alone_until = time.monotonic() + RETRY_S
            self._stats["node_writer_alone"] += 1
            if self._stats["node_writer_alone"] == 1:
                log.info("no journal writer for this machine at %s (%s): this process "
                         "takes its own turns on the file", self.path, exc)
            queued, self._queued = self._queued, []
            own = self._journal._own_group_commit()
            for name, args, future in queued:
                _chain(own._submit(name, args), future)
        else:
            self._flush()
        finally:
            self._connecting = False

    def _flush(self) -> None:
        self._flushing = False
        if self._transport is None or not self._queued:
            return
        queued, self._queued = self._queued, []
        data = _dumps([(name, args) for name, args, _ in queued])
        self._sent.append([future for _, _, future in queued])
        self._transport.write(_HEADER.pack(len(data)) + data)
        self._stats["node_writer_messages"] += 1
        self._stats["node_writer_writes"] += len(queued)

    def _answered(self, results: list[tuple[bool, Any]]) -> None:
        # One health update per answer, as a process's own commit makes one per commit.
        unavailable = [v for _, v in results if isinstance(v, JournalUnavailableError)]
        if unavailable:
            self._journal.health.failed(unavailable[-1])
        elif any(ok for ok, _ in results):
            self._journal.health.succeeded()
        settle(list(zip(self._sent.popleft(), results)))

    def _lost(self, reason: str) -> None:
        """The connection ended: what was sent has an unknown outcome; what was queued
        but not sent goes by the next connection (or this process's own commits)."""
        self._transport = None
        lost = [future for futures in self._sent for future in futures]
        self._sent.clear()
        if lost:
            self._stats["node_writer_lost"] += len(lost)
            error = JournalUnavailableError(
                "writer lost", f"the journal writer at {self.path} ended before answering "
                f"{len(lost)} writes ({reason}); whether they committed is unknown")
            log.warning("%s", error)
            self._journal.health.failed(error)
            for future in lost:
                if not future.done():
                    future.set_exception(error)
        if self._queued and not self._connecting:
            self._connecting = True
            self._loop.create_task(self._connect())


class _Answers(asyncio.Protocol):
    """The client's side of its connection: answers in, in the order of its messages."""

    def __init__(self, client: NodeWriterClient):
        self._client = client
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if len(self._buffer) < _HEADER.size + size:
                return
            message = bytes(self._buffer[_HEADER.size:_HEADER.size + size])
            del self._buffer[:_HEADER.size + size]
            self._client._answered(pickle.loads(message))  # from this user's writer

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._lost(str(exc) if exc else "it closed the connection")


#: The classes a message may hold besides Python's plain values (the writes' arguments).
_ALLOWED = {("dynwf_ray.journal.schema", "StepRecord"), ("dynwf_ray.types", "LogLine")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a journal record")
        return super().find_class(module, name)


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _sendable(error: BaseException) -> BaseException:
    """An error as the client can rebuild it: the journal's own errors as they are, any
    other as a RuntimeError naming it (a driver's exception may not pickle)."""
    if isinstance(error, (JournalUnavailableError, LeaseLostError)):
        return error
    return RuntimeError(f"the journal writer failed this write: {type(error).__name__}: {error}")


def _chain(source: asyncio.Future, target: asyncio.Future) -> None:
    def copy(done: asyncio.Future) -> None:
        if target.done():
            return
        if done.exception() is not None:
            target.set_exception(done.exception())
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)
