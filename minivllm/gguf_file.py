"""The one GGUF reader of the package: metadata, the tensor directory, and raw tensor bytes.

A GGUF file (llama.cpp's format) is a single little-endian stream::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x      key (u64 length + utf-8 bytes) | value type u32 | value
                  (a scalar; a string; or an array: item type u32 | count u64 | items)
    n_tensors x name | n_dims u32 | dims u64 x n_dims (ggml order: fastest first) | ggml type u32 | offset u64
    padding up to general.alignment (default 32), then the tensor data, each tensor at its offset

``gguf.GGUFReader`` parses every metadata value into numpy views of a memory map; for SmolLM2's 49,152
tokens and 48,900 merges that is ~150,000 small arrays and 3-4 s on a 2-core CPU. :class:`GGUFFile` walks
the same layout with ``struct`` (~0.04 s), turns arrays into Python lists, and memory-maps the file so that a
tensor's bytes are read only when :meth:`GGUFFile.raw` hands them out (as a plain ``uint8`` array, which
``gguf.quants.dequantize`` handles twice as fast as the reader's ``np.memmap`` views). The tokenizer
(:meth:`~minivllm.tokenizer.Tokenizer.from_gguf`) reads ``metadata``; the model loader
(:func:`~minivllm.model.load_model`) reads ``metadata`` and the tensors; both accept an open ``GGUFFile``,
so the file is parsed once. ``tests/test_02_gguf_file.py`` checks it against ``gguf.GGUFReader``.

Left out: GGUF v1 (32-bit counts), big-endian files, dequantization (``gguf.quants`` does it), writing.
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from minivllm.utils import cdiv

_T = GGUFValueType
_SCALARS = {  # value type -> struct format (little-endian); plain int keys: looked up ~100,000 times a file
    int(t): fmt for t, fmt in [(_T.UINT8, "<B"), (_T.INT8, "<b"), (_T.UINT16, "<H"), (_T.INT16, "<h"),
                               (_T.UINT32, "<I"), (_T.INT32, "<i"), (_T.UINT64, "<Q"), (_T.INT64, "<q"),
                               (_T.FLOAT32, "<f"), (_T.FLOAT64, "<d"), (_T.BOOL, "<?")]
}
_STRING, _ARRAY = int(_T.STRING), int(_T.ARRAY)
_U64 = struct.Struct("<Q")


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands (wrong magic, version, truncated, corrupt)."""


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One entry of the tensor directory."""

    name: str
    shape: tuple[int, ...]  # numpy / PyTorch order (slowest first): ggml's dims reversed
    type: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """``metadata`` (key -> value; arrays become lists) and ``tensors`` (name -> :class:`GGUFTensor`).

    The file stays memory-mapped until :meth:`close` (or the end of a ``with`` block) for :meth:`raw`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise GGUFFormatError(f"{self.path}: not a GGUF file (it is empty)") from None
        self._pos = 0
        try:
            self._parse()
        except GGUFFormatError:
            self._map.close()
            raise
        except (struct.error, ValueError) as e:  # ValueError: short numpy reads, invalid UTF-8
            self._map.close()
            raise GGUFFormatError(f"{self.path}: truncated or corrupt GGUF header near byte {self._pos} ({e})") \
                from None

    def _parse(self) -> None:
        if self._map[:4] != b"GGUF":
            raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {bytes(self._map[:4])!r})")
        self._pos = 4
        self.version = self._read("<I")
        if self.version not in (2, 3):
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise GGUFFormatError(f"{self.path}: GGUF version {self.version}{hint} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = self._string(), self._read("<I")
            dims = [self._read("<Q") for _ in range(n_dims)]
            infos.append((name, dims, self._read("<I"), self._read("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        start = cdiv(self._pos, align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, kind, offset in infos:
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"{self.path}: tensor {name} has unknown ggml type {kind}") from None
            nbytes = int(np.prod(dims)) // block * block_bytes
            if start + offset + nbytes > len(self._map):
                raise GGUFFormatError(f"{self.path}: tensor {name} ends past the end of the file (truncated?)")
            self.tensors[name] = GGUFTensor(name, tuple(reversed(dims)), kind, start + offset, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """A tensor's bytes as a read-only (rows, bytes per row) uint8 array: no copy, no dequantization."""
        if name not in self.tensors:
            raise KeyError(f"{self.path.name} has no tensor {name!r}")
        t = self.tensors[name]
        rows = int(np.prod(t.shape[:-1]))
        return np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(rows, -1)

    def close(self) -> None:
        """Unmap the file (arrays from :meth:`raw` must be gone by then: mmap refuses otherwise)."""
        self._map.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path.name!r}, v{self.version}, {len(self.metadata)} metadata keys, "
                f"{len(self.tensors)} tensors)")

    # ------------------------------------------------------------------ the header's primitives
    def _read(self, fmt: str):
        value = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _strings(self, n: int) -> list[str]:
        """``n`` strings in a row (a vocabulary: the hot loop of the whole reader, hence the locals)."""
        buf, pos, unpack, out = self._map, self._pos, _U64.unpack_from, []
        for _ in range(n):
            size = unpack(buf, pos)[0]
            pos += 8
            out.append(str(buf[pos:pos + size], "utf-8"))
            pos += size
        if pos > len(buf):
            raise GGUFFormatError(f"{self.path}: a string near byte {self._pos} runs past the end of the file")
        self._pos = pos
        return out

    def _string(self) -> str:
        return self._strings(1)[0]

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._read(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise GGUFFormatError(f"{self.path}: unknown metadata value type {kind} at byte {self._pos}")
        item, n = self._read("<I"), self._read("<Q")
        if item in _SCALARS:  # numbers: one numpy read for the whole array
            dtype = np.dtype(_SCALARS[item])
            values = np.frombuffer(self._map, dtype=dtype, count=n, offset=self._pos).tolist()
            self._pos += n * dtype.itemsize
            return values
        if item == _STRING:
            return self._strings(n)
        return [self._value(item) for _ in range(n)]
