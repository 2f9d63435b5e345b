"""The asyncio API: :func:`open` gives an :class:`AsyncImage`, whose methods are coroutines.

Each request starts inside the call that submits it (a page-cache read completes right there)
and otherwise goes on on qcow2rs's own I/O threads (no thread per request); many may be in
flight at once (``asyncio.gather``). Completions reach the event loop through
``loop.call_soon_threadsafe`` (while the loop is busy, it picks them up itself; a request that
completed inside its submitting call is picked up with ``loop.call_soon``, so the awaiting
task still yields once). Cancelling
a task whose request is in flight does not stop the request: it runs to its end, keeping
the buffers it uses alive, and its result is dropped.
"""

from __future__ import annotations

import asyncio
import os
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generator

from . import _qcow2rs
from ._qcow2rs import Image

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

__all__ = ["AsyncImage", "open"]


_running_loop = asyncio.get_running_loop


class AsyncImage:
    """An open qcow2 image whose I/O methods are coroutines (see :class:`qcow2rs.Image`)."""

    __slots__ = ("_image", "_loop", "_queue")

    def __init__(self, image: Image) -> None:
        self._image = image
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: _qcow2rs._Completions | None = None

    def _bind(self, loop: asyncio.AbstractEventLoop) -> _qcow2rs._Completions:
        """The completion queue for requests submitted from `loop` (one per loop)."""
        q = _qcow2rs._Completions(loop)
        self._loop, self._queue = loop, q
        return q

    @property
    def image(self) -> Image:
        """The synchronous :class:`qcow2rs.Image` behind this object (same handle)."""
        return self._image

    @property
    def size(self) -> int:
        return self._image.size

    @property
    def cluster_size(self) -> int:
        return self._image.cluster_size

    @property
    def backing_file(self) -> str | None:
        return self._image.backing_file

    @property
    def read_only(self) -> bool:
        return self._image.read_only

    @property
    def closed(self) -> bool:
        return self._image.closed

    @property
    def filename(self) -> str:
        return self._image.filename

    @property
    def mode(self) -> str:
        return self._image.mode

    def __repr__(self) -> str:
        return "<qcow2rs.aio.AsyncImage " + repr(self._image)[len("<qcow2rs.Image ") :]

    async def pread(self, length: int, offset: int) -> bytes:
        """Read up to ``length`` bytes at ``offset`` (fewer at the end of the image)."""
        loop = _running_loop()
        q = self._queue
        if q is None or loop is not self._loop:
            q = self._bind(loop)
        fut = loop.create_future()
        self._image._aio_pread(q, fut, length, offset)
        result: bytes = await fut
        return result

    async def preadinto(self, buf: Buffer, offset: int) -> int:
        """Read into ``buf`` (any writable C-contiguous buffer) at ``offset``, without a copy.
        ``buf`` stays in use until the request ends, even if the awaiting task is cancelled."""
        loop = _running_loop()
        q = self._queue
        if q is None or loop is not self._loop:
            q = self._bind(loop)
        fut = loop.create_future()
        self._image._aio_preadinto(q, fut, buf, offset)
        result: int = await fut
        return result

    async def pwrite(self, data: Buffer, offset: int) -> int:
        """Write ``data`` (any bytes-like object) at ``offset``."""
        loop = _running_loop()
        q = self._queue
        if q is None or loop is not self._loop:
            q = self._bind(loop)
        fut = loop.create_future()
        self._image._aio_pwrite(q, fut, data, offset)
        result: int = await fut
        return result

    async def write_zeroes(self, length: int, offset: int, *, unmap: bool = False) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros."""
        loop = _running_loop()
        q = self._queue
        if q is None or loop is not self._loop:
            q = self._bind(loop)
        fut = loop.create_future()
        self._image._aio_write_zeroes(q, fut, length, offset, unmap)
        await fut

    async def discard(self, length: int, offset: int) -> None:
        """Discard ``length`` bytes at ``offset`` (they read as zeros afterwards)."""
        loop = _running_loop()
        q = self._queue
        if q is None or loop is not self._loop:
            q = self._bind(loop)
        fut = loop.create_future()
        self._image._aio_discard(q, fut, length, offset)
        await fut

    async def flush(self) -> None:
        """Make every completed write durable."""
        loop = _running_loop()
        q = self._queue
        if q is None or loop is not self._loop:
            q = self._bind(loop)
        fut = loop.create_future()
        self._image._aio_flush(q, fut)
        await fut

    async def close(self) -> None:
        """Flush and close once every request in flight has finished (idempotent)."""
        loop = _running_loop()
        q = self._queue
        if q is None or loop is not self._loop:
            q = self._bind(loop)
        fut = loop.create_future()
        self._image._aio_close(q, fut)
        await fut

    async def info(self) -> dict[str, Any]:
        """What ``qcow2rs info --output=json`` prints for this image."""
        loop = _running_loop()
        q = self._queue
        if q is None or loop is not self._loop:
            q = self._bind(loop)
        fut = loop.create_future()
        self._image._aio_info(q, fut)
        result: dict[str, Any] = await fut
        return result

    async def map(self) -> list[dict[str, Any]]:
        """The entries of ``qcow2rs map --output=json`` for this image."""
        loop = _running_loop()
        q = self._queue
        if q is None or loop is not self._loop:
            q = self._bind(loop)
        fut = loop.create_future()
        self._image._aio_map(q, fut)
        result: list[dict[str, Any]] = await fut
        return result

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Opening:
    """What :func:`open` returns: await it for an :class:`AsyncImage`, or use it with
    ``async with`` (the image is closed at the end of the block)."""

    __slots__ = ("_args", "_image")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self._args = args
        self._image: AsyncImage | None = None

    async def _open(self) -> AsyncImage:
        loop = _running_loop()
        fut = loop.create_future()
        _qcow2rs._aio_open(_qcow2rs._Completions(loop), fut, *self._args)
        image: Image = await fut
        return AsyncImage(image)

    def __await__(self) -> Generator[Any, None, AsyncImage]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncImage:
        self._image = await self._open()
        return self._image

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._image is not None:
            await self._image.close()


def open(
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    direct: bool = False,
    backing: bool = True,
    untrusted: bool = False,
    cache_size: int | None = None,
) -> _Opening:
    """Open a qcow2 image for asyncio: ``img = await qcow2rs.aio.open(path)`` or
    ``async with qcow2rs.aio.open(path, "r+") as img: ...``. Options as :func:`qcow2rs.open`."""
    return _Opening((path, mode, direct, backing, untrusted, cache_size))
