"""safetensors files read and written one tensor at a time, with plain file reads and writes.

Not a memory map: every page a map touches stays resident until the file closes, so a streamed merge
would cost the whole shard; plain reads keep peak memory near the largest tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from loraship.errors import UserError

if TYPE_CHECKING:
    import torch

#: safetensors dtype -> (torch dtype name, bytes per value).
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
#: Values converted at a time when a tensor is written in another dtype (64 MiB of float32).
CONVERT_SLICE = 16 * 1024 * 1024


class SafetensorsError(UserError):
    """A file that should be safetensors is not."""


def torch_dtype(dtype: str) -> "torch.dtype":
    import torch

    return getattr(torch, DTYPES[dtype][0])


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where tensor data begins."""
    size = Path(path).stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        # A text file read as safetensors gives an absurd header length: check it before reading that much.
        if length > size - 8:
            raise SafetensorsError(
                f"{path}: not a safetensors file (its header claims {length} bytes, the file has {size})")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SafetensorsError(f"{path}: not a safetensors file (its header is not JSON: {err})") from None
    return header, 8 + length


def tensor_entries(header: dict) -> list[tuple[str, dict]]:
    """The header's tensors in file order (the metadata entry left out)."""
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])


def read_tensor(fh, entry: dict, data_start: int) -> "torch.Tensor":
    """One tensor read with a plain file read (no memory map)."""
    import torch

    begin, end = entry["data_offsets"]
    fh.seek(data_start + begin)
    raw = bytearray(end - begin)
    fh.readinto(raw)
    dtype = torch_dtype(entry["dtype"])
    if not raw:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"])


def iter_safetensors(path: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """``(name, tensor)`` in file order, one tensor in memory at a time."""
    header, data_start = read_safetensors_header(path)
    with open(path, "rb") as fh:
        for name, entry in tensor_entries(header):
            yield name, read_tensor(fh, entry, data_start)


def load_safetensors(path: Path) -> dict[str, "torch.Tensor"]:
    return dict(iter_safetensors(path))


class SafetensorsStreamWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time."""

    def __init__(self, path: Path, specs: list[tuple[str, str, list[int]]], metadata: dict | None = None):
        header: dict = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        self._expected = []
        for name, dtype, shape in specs:
            size = math.prod(shape) * DTYPES[dtype][1]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._expected.append((name, size, dtype))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)))
        self._fh.write(blob)
        self._next = 0

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        """Write ``name``'s data, converted to the header's dtype a slice at a time if it is in another."""
        expected_name, size, dtype = self._expected[self._next]
        if name != expected_name:
            raise RuntimeError(f"tensor {name} written out of order (expected {expected_name})")
        import torch

        flat = tensor.contiguous().reshape(-1)
        target = torch_dtype(dtype)
        written = 0
        # Converted a slice at a time: a 128k-vocabulary embedding would otherwise need a second whole copy.
        step = flat.numel() if flat.dtype == target else CONVERT_SLICE
        for start in range(0, flat.numel(), max(step, 1)):
            data = flat[start:start + step].to(target).view(torch.uint8).numpy()
            self._fh.write(memoryview(data))
            written += len(data)
        if written != size:
            raise RuntimeError(f"tensor {name} has {written} bytes, header says {size}")
        self._next += 1

    def abort(self) -> None:
        self._fh.close()

    def close(self) -> None:
        if self._next != len(self._expected):
            self._fh.close()
            raise RuntimeError(f"only {self._next} of {len(self._expected)} tensors written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
