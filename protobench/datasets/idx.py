"""The idx format of the MNIST family: header checks and encoding, without numpy."""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass

logger = logging.getLogger(__name__)

IMAGES_MAGIC = 0x00000803  # unsigned bytes, three dimensions (count, rows, columns)
LABELS_MAGIC = 0x00000801  # unsigned bytes, one dimension (count)
MAX_HEADER_SIZE = 16


class IdxFormatError(ValueError):
    """Bytes that are not the idx file they should be; the message is a one-line reason."""


@dataclass(frozen=True)
class IdxHeader:
    """The magic number and dimensions at the start of an idx file."""

    magic: int
    dims: tuple[int, ...]

    @property
    def size(self) -> int:
        return 4 + 4 * len(self.dims)

    @property
    def count(self) -> int:
        return self.dims[0]

    @property
    def file_size(self) -> int:
        """Bytes the whole file must have: header plus one byte per entry."""
        return self.size + math.prod(self.dims)


def magic_for(filename: str) -> int:
    """The magic number a raw file of the MNIST family must start with, from its name."""
    if "-idx3-" in filename:
        return IMAGES_MAGIC
    if "-idx1-" in filename:
        return LABELS_MAGIC
    raise IdxFormatError(f"{filename} is not an idx1 or idx3 file name")


def parse_header(head: bytes, magic: int) -> IdxHeader:
    """Read the header from the first bytes of a file that must start with `magic`."""
    if len(head) < 4:
        raise IdxFormatError(f"truncated: {len(head)} bytes, too short for an idx header")
    (found,) = struct.unpack(">I", head[:4])
    if found != magic:
        raise IdxFormatError(f"wrong magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    size = 4 + 4 * ndim
    if len(head) < size:
        raise IdxFormatError(f"truncated: {len(head)} bytes, too short for an idx header")
    return IdxHeader(found, tuple(struct.unpack(f">{ndim}I", head[4:size])))


def check_layout(
    header: IdxHeader, total_size: int, image_shape: tuple[int, ...] | None = None
) -> None:
    """Check the file length against the header, and the image size if given."""
    if image_shape is not None and header.magic == IMAGES_MAGIC:
        if header.dims[1:] != tuple(image_shape):
            shape = "x".join(map(str, header.dims[1:]))
            want = "x".join(map(str, image_shape))
            raise IdxFormatError(f"images are {shape}, expected {want}")
    expected = header.file_size
    if total_size < expected:
        raise IdxFormatError(f"truncated: {total_size} of {expected} bytes")
    if total_size > expected:
        raise IdxFormatError(f"{total_size - expected} bytes past the end of the data")


def check_bytes(
    filename: str, data: bytes, image_shape: tuple[int, ...] | None = None
) -> IdxHeader:
    """Check a whole file held in memory; return its header."""
    header = parse_header(data[:MAX_HEADER_SIZE], magic_for(filename))
    check_layout(header, len(data), image_shape)
    return header


def encode(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An idx file: big-endian magic and dimensions, then the unsigned-byte payload."""
    if len(dims) != magic & 0xFF:
        raise IdxFormatError(f"magic 0x{magic:08x} needs {magic & 0xFF} dimensions, got {dims}")
    if math.prod(dims) != len(payload):
        raise IdxFormatError(f"dimensions {dims} do not match {len(payload)} payload bytes")
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload
