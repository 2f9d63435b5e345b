"""A file-like view of an image's guest disk (what :meth:`qcow2rs.Image.fileobj` returns)."""

from __future__ import annotations

import errno
import io
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._qcow2rs import Image

__all__ = ["ImageIO", "open_view"]

# Default buffer: large enough for streaming copies (shutil.copyfileobj) to run near the
# engine's speed; a whole cluster at least.
DEFAULT_BUFFER_SIZE = 1 << 20


class ImageIO(io.RawIOBase):
    """Unbuffered file over the guest disk of an open :class:`qcow2rs.Image`: ``seek``,
    ``tell``, ``readinto`` and (for writable images) ``write``. The disk has a fixed size:
    reads stop at its end and writes past it fail with ``ENOSPC``. Closing the view does not
    close the image."""

    def __init__(self, image: Image, writable: bool = False) -> None:
        super().__init__()
        if writable and image.read_only:
            raise ValueError("the image is opened read-only: a writable view needs mode 'r+'")
        self._image = image
        self._writable = writable
        self._pos = 0

    @property
    def image(self) -> Image:
        return self._image

    @property
    def name(self) -> str:
        return self._image.filename

    @property
    def mode(self) -> str:
        return "r+b" if self._writable else "rb"

    def _check(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def readable(self) -> bool:
        self._check()
        return True

    def writable(self) -> bool:
        self._check()
        return self._writable

    def seekable(self) -> bool:
        self._check()
        return True

    def tell(self) -> int:
        self._check()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._image.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise OSError(errno.EINVAL, "negative seek position", self.name)
        self._pos = pos
        return pos

    def readinto(self, b: Buffer) -> int:
        self._check()
        if self._pos >= self._image.size:
            return 0
        n = self._image.preadinto(b, self._pos)
        self._pos += n
        return n

    def write(self, b: Buffer) -> int:
        self._check()
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        with memoryview(b) as mv, mv.cast("B") as data:
            room = self._image.size - self._pos
            if len(data) == 0:
                return 0
            if room <= 0:
                raise OSError(errno.ENOSPC, "write past the end of the disk", self.name)
            n = min(len(data), room)
            self._image.pwrite(data[:n] if n < len(data) else data, self._pos)
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("the disk has a fixed size")

    def flush(self) -> None:
        # Data goes to the image at each write; durability is Image.flush().
        super().flush()


def open_view(image: Image, mode: str = "rb", buffering: int = -1) -> io.BufferedReader | io.BufferedRandom:
    """``image.fileobj(mode, buffering)``: "rb" gives an ``io.BufferedReader``, "r+b" an
    ``io.BufferedRandom``, each over an :class:`ImageIO` with a buffer of ``buffering``
    bytes (-1: 1 MiB or a cluster, whichever is larger)."""
    if mode in ("rb", "r"):
        writable = False
    elif mode in ("r+b", "rb+", "r+"):
        writable = True
    else:
        raise ValueError(f"invalid mode '{mode}' (expected 'rb' or 'r+b')")
    if buffering == 0 or buffering < -1:
        raise ValueError("buffering must be -1 (the default size) or a size in bytes")
    raw = ImageIO(image, writable)
    size = buffering if buffering > 0 else max(DEFAULT_BUFFER_SIZE, image.cluster_size)
    if writable:
        return io.BufferedRandom(raw, size)
    return io.BufferedReader(raw, size)
