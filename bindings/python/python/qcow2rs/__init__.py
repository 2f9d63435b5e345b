"""qcow2rs: fast, correct qcow2 disk images.

Open an image with :func:`open` (a context manager), read and write it with ``pread``,
``preadinto`` (no copy, into any writable buffer), ``pwrite``, ``write_zeroes``, ``discard``
and ``flush``; view it as a file with :meth:`Image.fileobj`; use it from asyncio with
:func:`qcow2rs.aio.open`. :func:`create`, :func:`info`, :func:`check`, :func:`convert` and
:func:`compare`, :func:`rebase`, :func:`commit`, :func:`amend` and :func:`measure` do what the
``qcow2rs`` (and ``qemu-img``) commands of the same names do.

Errors are ``OSError`` subclasses with ``errno``, ``strerror`` and ``filename``: a missing
file is ``FileNotFoundError``; problems with an image's format raise :class:`Error`
(:class:`CorruptImageError`, :class:`UnsupportedFeatureError`); a write to a read-only image
is an ``OSError`` with ``errno.EBADF``. Requests outside the image and calls on a closed
image raise ``ValueError``.
"""

from __future__ import annotations

from ._qcow2rs import (
    CorruptImageError,
    Error,
    Image,
    UnsupportedFeatureError,
    __version__,
    amend,
    check,
    commit,
    compare,
    convert,
    dd,
    create,
    info,
    measure,
    open,
    rebase,
)
from . import aio

__all__ = [
    "CorruptImageError",
    "Error",
    "Image",
    "UnsupportedFeatureError",
    "__version__",
    "aio",
    "amend",
    "check",
    "commit",
    "compare",
    "convert",
    "dd",
    "create",
    "info",
    "measure",
    "open",
    "rebase",
]
