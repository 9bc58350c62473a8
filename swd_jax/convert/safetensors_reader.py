"""Read safetensors checkpoints tensor by tensor, without torch, bf16 included.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range, then the raw bytes. We memory-map the file and view each tensor in place, so a
model is never held twice in memory (the OS pages bytes in as a tensor is converted).
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """One memory-mapped .safetensors file: `keys()`, `shape(name)`, `get(name) -> np.ndarray` (a view)."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: garbled safetensors header ({type(e).__name__}: {e})") from None
            if not isinstance(header, dict):
                raise ValueError(f"{path}: garbled safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._offset = 8 + n
        self._check_ranges(size)
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

    def _check_ranges(self, size: int) -> None:
        """Every tensor's byte range inside the file and as long as its shape and dtype say (one line naming the
        file and the first tensor that is not: a truncated download, a garbled header)."""
        for name, e in self._entries.items():
            try:
                start, end = (int(x) for x in e["data_offsets"])
                shape = [int(d) for d in e["shape"]]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: garbled safetensors header entry for tensor {name!r}: {e!r}") from None
            if self._offset + end > size:
                raise ValueError(f"{self.path} is truncated: tensor {name!r} ends at byte {self._offset + end} but "
                                 f"the file has {size} bytes (an incomplete download or copy?)")
            dtype = _DTYPES.get(e.get("dtype"))
            if dtype is not None and end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise ValueError(f"{self.path}: tensor {name!r} has {end - start} bytes for shape {tuple(shape)} "
                                 f"{e['dtype']} ({int(np.prod(shape)) * np.dtype(dtype).itemsize} expected): a "
                                 "corrupt file")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self._entries[name]
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        start, end = e["data_offsets"]
        raw = self._mmap[self._offset + start:self._offset + end]
        return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


class SafetensorsFolder:
    """All tensors of a diffusers/transformers model folder: one file or a sharded `*.index.json`."""

    def __init__(self, folder: str, prefix: str = "diffusion_pytorch_model"):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"not a model folder: {folder}")
        single = os.path.join(folder, f"{prefix}.safetensors")
        index = os.path.join(folder, f"{prefix}.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {fn: SafetensorsFile(os.path.join(folder, fn)) for fn in sorted(set(weight_map.values()))}
            self._where = {k: files[fn] for k, fn in weight_map.items()}
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self._where = {k: f for k in f.keys()}
        else:
            found = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
            raise FileNotFoundError(
                f"{folder}: no {prefix}.safetensors nor its .index.json (safetensors files there: {found}); "
                "only safetensors checkpoints are supported")

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._where:
            yield k, self.get(k)
