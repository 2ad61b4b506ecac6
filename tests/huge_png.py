"""A PNG that claims any size: a real signature, IHDR and IEND, with one row of image data (it cannot be decoded
in full). Size limits read from the header must reject it; any attempt to decode it fails differently."""

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int) -> bytes:
    """An 8-bit greyscale (mode 'L') PNG header of width x height pixels; a few hundred bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    one_row = zlib.compress(b"\0" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", one_row) + _chunk(b"IEND", b"")
