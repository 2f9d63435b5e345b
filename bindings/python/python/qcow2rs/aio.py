"""The asyncio API: :func:`open` gives an :class:`AsyncImage`, whose methods are coroutines.

Each read or write starts inside the call that submits it: one that completes there (a
page-cache hit) returns at once, without a round trip through the event loop (one in 32 goes
through the loop, so that the task yields now and then); the others go on on qcow2rs's own
I/O threads (no thread per request), and many may be in flight at once (``asyncio.gather``).
Their completions reach the event loop through ``loop.call_soon_threadsafe``, a batch at a
time (while the loop is busy, it picks them up itself). Cancelling a task whose request is
in flight does not stop the request: it runs to its end, keeping the buffers it uses alive,
and its result is dropped.
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

    __slots__ = ("_image", "_loop", "_q")

    def __init__(self, image: Image) -> None:
        self._image = image
        self._loop: asyncio.AbstractEventLoop | None = None
        self._q: _qcow2rs._Completions | None = None

    def _queue(self) -> _qcow2rs._Completions:
        """The completion queue of the running loop (one per loop). Called by the extension
        only when a request needs a future: one that completes inside its submitting call
        returns its result directly and never asks asyncio for the loop."""
        loop = _running_loop()
        q = self._q
        if q is None or loop is not self._loop:
            q = _qcow2rs._Completions(loop)
            self._loop, self._q = loop, q
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

    @property
    def cache(self) -> str:
        return self._image.cache

    def __repr__(self) -> str:
        return "<qcow2rs.aio.AsyncImage " + repr(self._image)[len("<qcow2rs.Image ") :]

    async def pread(self, length: int, offset: int) -> bytes:
        """Read up to ``length`` bytes at ``offset`` (fewer at the end of the image)."""
        r = self._image._aio_pread(self, length, offset)
        if isinstance(r, bytes):  # completed inside the call
            return r
        result: bytes = await r
        return result

    async def preadinto(self, buf: Buffer, offset: int) -> int:
        """Read into ``buf`` (any writable C-contiguous buffer) at ``offset``, without a copy.
        ``buf`` stays in use until the request ends, even if the awaiting task is cancelled."""
        r = self._image._aio_preadinto(self, buf, offset)
        if isinstance(r, int):  # completed inside the call
            return r
        result: int = await r
        return result

    async def pwrite(self, data: Buffer, offset: int) -> int:
        """Write ``data`` (any bytes-like object) at ``offset``."""
        r = self._image._aio_pwrite(self, data, offset)
        if isinstance(r, int):  # completed inside the call
            return r
        result: int = await r
        return result

    async def write_zeroes(self, length: int, offset: int, *, unmap: bool = False) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros."""
        await self._image._aio_write_zeroes(self, length, offset, unmap)

    async def discard(self, length: int, offset: int) -> None:
        """Discard ``length`` bytes at ``offset`` (they read as zeros afterwards)."""
        await self._image._aio_discard(self, length, offset)

    async def flush(self) -> None:
        """Make every completed write durable."""
        await self._image._aio_flush(self)

    async def close(self) -> None:
        """Flush and close once every request in flight has finished (idempotent)."""
        await self._image._aio_close(self)

    async def info(self) -> dict[str, Any]:
        """What ``qcow2rs info --output=json`` prints for this image."""
        result: dict[str, Any] = await self._image._aio_info(self)
        return result

    async def map(self) -> list[dict[str, Any]]:
        """The entries of ``qcow2rs map --output=json`` for this image."""
        result: list[dict[str, Any]] = await self._image._aio_map(self)
        return result

    async def bitmaps(self) -> list[dict[str, Any]]:
        """The persistent dirty bitmaps (see :meth:`qcow2rs.Image.bitmaps`; no I/O)."""
        return self._image.bitmaps()

    async def bitmap_add(self, name: str, *, granularity: int | None = None) -> None:
        """Add an enabled persistent dirty bitmap (see :meth:`qcow2rs.Image.bitmap_add`)."""
        await self._image._aio_bitmap(self, "add", name, granularity)

    async def bitmap_remove(self, name: str) -> None:
        """Remove a bitmap (see :meth:`qcow2rs.Image.bitmap_remove`)."""
        await self._image._aio_bitmap(self, "remove", name)

    async def bitmap_clear(self, name: str) -> None:
        """Clear every bit of a bitmap (see :meth:`qcow2rs.Image.bitmap_clear`)."""
        await self._image._aio_bitmap(self, "clear", name)

    async def bitmap_enable(self, name: str) -> None:
        """Enable a bitmap (see :meth:`qcow2rs.Image.bitmap_enable`)."""
        await self._image._aio_bitmap(self, "enable", name)

    async def bitmap_disable(self, name: str) -> None:
        """Disable a bitmap (see :meth:`qcow2rs.Image.bitmap_disable`)."""
        await self._image._aio_bitmap(self, "disable", name)

    async def bitmap_merge(
        self, dst: str, src_name: str, *, source: AsyncImage | Image | None = None
    ) -> None:
        """Merge bitmap ``src_name`` (of this image, or of ``source``) into bitmap ``dst``
        (see :meth:`qcow2rs.Image.bitmap_merge`)."""
        src = source.image if isinstance(source, AsyncImage) else source
        await self._image._aio_bitmap(self, "merge", dst, src_name, src)

    async def bitmap_extents(self, name: str) -> list[tuple[int, int]]:
        """The dirty ranges of bitmap ``name`` as ``(start, length)`` tuples (see
        :meth:`qcow2rs.Image.bitmap_extents`)."""
        result: list[tuple[int, int]] = await self._image._aio_bitmap(self, "extents", name)
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
    cache: str | None = None,
) -> _Opening:
    """Open a qcow2 image for asyncio: ``img = await qcow2rs.aio.open(path)`` or
    ``async with qcow2rs.aio.open(path, "r+") as img: ...``. Options as :func:`qcow2rs.open`."""
    return _Opening((path, mode, direct, backing, untrusted, cache_size, cache))
