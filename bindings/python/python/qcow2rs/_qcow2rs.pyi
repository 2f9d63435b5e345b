# Type stubs of the extension module qcow2rs._qcow2rs (hand-written; checked against the
# module by mypy's stubtest in bindings/python/tests/test_typing.py).

import asyncio
import io
import os
from types import TracebackType
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, final, overload

from typing_extensions import Buffer, Self

__all__ = [
    "Image",
    "Error",
    "CorruptImageError",
    "UnsupportedFeatureError",
    "open",
    "create",
    "info",
    "check",
    "convert",
    "dd",
    "compare",
    "rebase",
    "commit",
    "amend",
    "measure",
    "cli_main",
    "_aio_open",
    "_Completions",
    "__version__",
]

__version__: str

_Path = str | os.PathLike[str]

class Error(OSError):
    """A problem with an image's format (an OSError with errno, strerror and filename)."""

class CorruptImageError(Error):
    """The image's metadata is inconsistent or malformed (errno EUCLEAN)."""

class UnsupportedFeatureError(Error):
    """The image uses a feature qcow2rs does not support (errno ENOTSUP)."""

class _Owner(Protocol):
    """What the `_aio_*` methods call for the running loop's completion queue."""

    def _queue(self) -> _Completions: ...

@final
class _Completions:
    """The completion queue of one event loop (used by qcow2rs.aio)."""

    def __new__(cls, lp: asyncio.AbstractEventLoop) -> Self: ...
    def _drain(self) -> None: ...

@final
class Image:
    """An open qcow2 image (see qcow2rs.open). Safe to use from many threads at once."""

    @property
    def size(self) -> int: ...
    @property
    def cluster_size(self) -> int: ...
    @property
    def backing_file(self) -> str | None: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def filename(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def cache(self) -> str: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        *_exc: type[BaseException] | BaseException | TracebackType | None,
    ) -> None: ...
    def pread(self, length: int, offset: int) -> bytes: ...
    def preadinto(self, buf: Buffer, offset: int) -> int: ...
    def pwrite(self, data: Buffer, offset: int) -> int: ...
    def write_zeroes(self, length: int, offset: int, *, unmap: bool = False) -> None: ...
    def discard(self, length: int, offset: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def info(self) -> dict[str, Any]: ...
    def map(self) -> list[dict[str, Any]]: ...
    def snapshots(self) -> list[dict[str, Any]]: ...
    def snapshot_create(self, name: str) -> str: ...
    def snapshot_apply(self, name_or_id: str) -> None: ...
    def snapshot_delete(self, name_or_id: str) -> None: ...
    def bitmaps(self) -> list[dict[str, Any]]: ...
    def bitmap_add(self, name: str, *, granularity: int | None = None) -> None: ...
    def bitmap_remove(self, name: str) -> None: ...
    def bitmap_clear(self, name: str) -> None: ...
    def bitmap_enable(self, name: str) -> None: ...
    def bitmap_disable(self, name: str) -> None: ...
    def bitmap_merge(self, dst: str, src_name: str, *, source: Image | None = None) -> None: ...
    def bitmap_extents(self, name: str) -> list[tuple[int, int]]: ...
    @overload
    def fileobj(self, mode: Literal["rb", "r"] = "rb", buffering: int = -1) -> io.BufferedReader: ...
    @overload
    def fileobj(self, mode: Literal["r+b", "rb+", "r+"], buffering: int = -1) -> io.BufferedRandom: ...
    # Submissions of the asyncio API (qcow2rs.aio). `owner` is the AsyncImage: its `_queue()`
    # gives the running loop's completion queue when a future is needed. Reads and writes
    # that complete inside the call return their result; otherwise a future is returned.
    def _aio_pread(self, owner: _Owner, length: int, offset: int) -> bytes | asyncio.Future[bytes]: ...
    def _aio_preadinto(self, owner: _Owner, buf: Buffer, offset: int) -> int | asyncio.Future[int]: ...
    def _aio_pwrite(self, owner: _Owner, data: Buffer, offset: int) -> int | asyncio.Future[int]: ...
    def _aio_write_zeroes(
        self, owner: _Owner, length: int, offset: int, unmap: bool
    ) -> asyncio.Future[None]: ...
    def _aio_discard(self, owner: _Owner, length: int, offset: int) -> asyncio.Future[None]: ...
    def _aio_flush(self, owner: _Owner) -> asyncio.Future[None]: ...
    def _aio_close(self, owner: _Owner) -> asyncio.Future[None]: ...
    def _aio_info(self, owner: _Owner) -> asyncio.Future[dict[str, Any]]: ...
    def _aio_bitmap(
        self,
        owner: _Owner,
        op: str,
        name: str,
        arg: int | str | None = None,
        source: Image | None = None,
    ) -> asyncio.Future[Any]: ...
    def _aio_map(self, owner: _Owner) -> asyncio.Future[list[dict[str, Any]]]: ...

def open(
    path: _Path,
    mode: str = "r",
    *,
    direct: bool = False,
    backing: bool = True,
    untrusted: bool = False,
    cache_size: int | None = None,
    cache: str | None = None,
) -> Image: ...
def create(
    path: _Path,
    size: int | None,
    *,
    cluster_size: int = 65536,
    compat: str = "1.1",
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
    extended_l2: bool = False,
    compression_type: str = "zlib",
    backing_file: str | None = None,
    backing_format: str | None = None,
    data_file: str | None = None,
    data_file_raw: bool = False,
    preallocation: str = "off",
) -> None: ...
def info(path: _Path, *, format: str | None = None) -> dict[str, Any]: ...
def check(path: _Path, repair: Literal["leaks", "all"] | None = None) -> dict[str, Any]: ...
def rebase(
    path: _Path,
    backing: str,
    *,
    backing_format: str | None = None,
    unsafe: bool = False,
    progress: Callable[[float], object] | None = None,
) -> None: ...
def commit(
    path: _Path,
    *,
    base: str | None = None,
    drop: bool = False,
    progress: Callable[[float], object] | None = None,
) -> None: ...
_OptionValue = str | int | bool

def amend(path: _Path, options: Mapping[str, _OptionValue] | None = None, /, **kwargs: _OptionValue) -> None: ...
def measure(
    path: _Path | None = None,
    options: Mapping[str, _OptionValue] | None = None,
    /,
    *,
    size: int | None = None,
    out_format: str = "qcow2",
    format: str | None = None,
    **kwargs: _OptionValue,
) -> dict[str, int]: ...
def convert(
    src: _Path,
    dst: _Path,
    *,
    out_format: str = "qcow2",
    compress: bool = False,
    compression_type: str | None = None,
    cluster_size: int | None = None,
    backing_file: str | None = None,
    backing_format: str | None = None,
    src_format: str | None = None,
    progress: Callable[[float], object] | None = None,
    sparse_size: int | None = None,
    existing: bool = False,
    target_is_zero: bool = False,
) -> None: ...
def dd(
    src: _Path,
    dst: _Path,
    *,
    bs: int = 512,
    count: int | None = None,
    skip: int = 0,
    out_format: str = "raw",
    src_format: str | None = None,
) -> None: ...
def compare(
    a: _Path,
    b: _Path,
    *,
    strict: bool = False,
    a_format: str | None = None,
    b_format: str | None = None,
) -> bool: ...
def cli_main(argv: list[str]) -> int: ...
def _aio_open(
    q: _Completions,
    fut: asyncio.Future[Any],
    path: _Path,
    mode: str,
    direct: bool,
    backing: bool,
    untrusted: bool,
    cache_size: int | None,
    cache: str | None,
) -> None: ...
