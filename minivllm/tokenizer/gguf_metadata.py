"""Read a GGUF file's key/value metadata (not its tensors) in a few tens of milliseconds.

``gguf.GGUFReader`` parses the whole file into numpy views, one per string: for a 49,152-token
vocabulary that is ~150,000 small arrays and ~3 s on a 2-core CPU. A tokenizer needs only the
metadata at the head of the file, so this module walks that section with ``struct`` (the layout is
in the GGUF spec: magic, version, tensor count, key/value count, then the pairs) and stops before
the tensor infos. ``tests/test_02_tokenizer.py`` checks it against ``GGUFReader``.

Leaves out: GGUF v1 (32-bit counts) and big-endian files, which ``GGUFReader`` handles.
"""

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

_SCALARS = {  # value type -> (struct format, numpy dtype)
    GGUFValueType.UINT8: ("<B", np.uint8), GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16), GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32), GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.UINT64: ("<Q", np.uint64), GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT32: ("<f", np.float32), GGUFValueType.FLOAT64: ("<d", np.float64),
    GGUFValueType.BOOL: ("<?", np.bool_),
}


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.pos += n
        return str(self.buf[self.pos - n:self.pos], "utf-8")

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0])
        if vtype == GGUFValueType.ARRAY:
            itype, n = GGUFValueType(self.unpack("<I")), self.unpack("<Q")
            if itype in _SCALARS:  # a numeric array: one numpy read, returned as a list
                dtype = np.dtype(_SCALARS[itype][1])
                values = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
                self.pos += n * dtype.itemsize
                return values
            return [self.value(itype) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value pair of a GGUF file, as Python values (arrays as lists)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        _n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"))
        return meta


def metadata_from_reader(reader: GGUFReader, prefix: str = "") -> dict[str, Any]:
    """The same dictionary from an already-open ``GGUFReader`` (keys starting with ``prefix``)."""
    return {k: f.contents() for k, f in reader.fields.items()
            if k.startswith(prefix) and not k.startswith("GGUF.")}
