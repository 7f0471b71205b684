"""Read PyTorch zip checkpoints (`torch.save` since torch 1.6) without torch and without running their code.

A `.pt` file is a zip of `<archive>/data.pkl`, a pickle of the saved object, and `<archive>/data/<key>`, the
raw little-endian bytes of each storage. Tensors in the pickle are calls to `torch._utils._rebuild_tensor_v2`
whose storage comes from `persistent_load(('storage', <storage type>, key, location, numel))`.

`pickle.load` would import and call any global the file names, so a checkpoint could run any code. Here
`find_class` resolves names only through an allow-list mapping torch's rebuild functions and storage types
onto local stand-ins that build numpy arrays, then `mx.array`s; every other global is refused.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
import zlib
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from csmd.model.errors import CheckpointError

__all__ = ["load_torch_checkpoint", "load_torch_state_dict"]


class _Invalid(Exception):
    """A problem found while parsing; the public functions re-raise it as CheckpointError naming the file."""


class _DType(NamedTuple):
    """A torch element type: how numpy reads its bytes, and the mlx dtype the tensor becomes.

    A tuple because these are shared by all loads, and pickle's BUILD opcode can rewrite the `__dict__` of any
    object it is handed (even a frozen dataclass): a hostile file could otherwise change how later files load.
    """

    name: str
    numpy: str  # explicitly little-endian, so the bytes are read right on any host
    mlx: mx.Dtype


# Storage classes torch (still, in 2.13) writes for `_rebuild_tensor_v2`; the storage type carries the dtype.
_STORAGE_TYPES = {
    "FloatStorage": _DType("float32", "<f4", mx.float32),
    "HalfStorage": _DType("float16", "<f2", mx.float16),
    # numpy has no bfloat16: read the bits as uint16 and reinterpret them in mlx (see `_to_mlx`).
    "BFloat16Storage": _DType("bfloat16", "<u2", mx.bfloat16),
    "DoubleStorage": _DType("float64", "<f8", mx.float64),
    "LongStorage": _DType("int64", "<i8", mx.int64),
    "IntStorage": _DType("int32", "<i4", mx.int32),
    "ShortStorage": _DType("int16", "<i2", mx.int16),
    "CharStorage": _DType("int8", "i1", mx.int8),
    "ByteStorage": _DType("uint8", "u1", mx.uint8),
    "BoolStorage": _DType("bool", "?", mx.bool_),
}
# Dtypes newer than typed storages are saved with `_rebuild_tensor_v3`: a byte storage plus a `torch.<dtype>`.
_V3_DTYPES = {
    "uint16": _DType("uint16", "<u2", mx.uint16),
    "uint32": _DType("uint32", "<u4", mx.uint32),
    "uint64": _DType("uint64", "<u8", mx.uint64),
}
_UNTYPED = _DType("uint8", "u1", mx.uint8)
# Globals that name a torch dtype or storage we cannot read, so the refusal can say "unsupported dtype".
_DTYPE_LIKE = re.compile(r"\w+Storage|(?:b?float|u?int|complex|bits|q?u?int)\d\w*")


class _Storage(NamedTuple):
    key: str
    dtype: _DType  # the element type in v2; v3 storages are untyped bytes and the tensor brings its dtype
    data: bytes


class _OrderedDict(collections.OrderedDict[Any, Any]):
    """Stands in for `collections.OrderedDict`. torch attaches `_metadata` (module versions) to state dicts
    with BUILD; it means nothing without torch, so drop it rather than let it land in the instance dict."""

    def __setstate__(self, state: object) -> None:
        pass


def _build(storage: object, dtype: _DType | None, offset: object, size: object, stride: object) -> mx.array:
    """torch's `Tensor.set_(storage, offset, size, stride)`, bounds-checked, as a contiguous mlx array."""
    if not isinstance(storage, _Storage):
        raise _Invalid(f"a tensor is built from {type(storage).__name__}, not a storage")
    dtype = dtype or storage.dtype  # v2: the typed storage carries the dtype
    if not (
        isinstance(offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))
    ):
        raise _Invalid(f"bad tensor geometry: offset={offset!r} size={size!r} stride={stride!r}")
    if 0 in size:
        return _to_mlx(np.empty(size, dtype.numpy), dtype)
    # Elements from `offset` to the last one the view touches. Checking them against the record is what makes
    # `as_strided` safe: given a hostile size or stride it would read past the buffer.
    span = 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    itemsize = np.dtype(dtype.numpy).itemsize
    needed = (offset + span) * itemsize
    if needed > len(storage.data):
        raise _Invalid(
            f"storage record 'data/{storage.key}' has {len(storage.data)} bytes, but a {dtype.name} tensor "
            f"of shape {size} at offset {offset} needs {needed}"
        )
    base = np.frombuffer(storage.data, dtype.numpy, count=span, offset=offset * itemsize)
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return _to_mlx(view.copy(), dtype)  # C order; np.ascontiguousarray would make a scalar 1-d


def _to_mlx(array: np.ndarray, dtype: _DType) -> mx.array:
    if dtype.mlx == mx.bfloat16:
        return mx.array(array).view(mx.bfloat16)
    # Pass the dtype: left alone, mx.array turns float64 into float32.
    return mx.array(array, dtype=dtype.mlx)


# The signatures mirror torch._utils; requires_grad, hooks, metadata and parameter state mean nothing here.
def _rebuild_tensor_v2(storage: object, offset: object, size: object, stride: object, *_ignored: object) -> mx.array:
    return _build(storage, None, offset, size, stride)


def _rebuild_tensor_v3(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    grad: object,
    hooks: object,
    dtype: object,
    *_ignored: object,
) -> mx.array:
    if not isinstance(dtype, _DType):
        raise _Invalid(f"_rebuild_tensor_v3 got dtype {dtype!r}")
    return _build(storage, dtype, offset, size, stride)


def _rebuild_parameter(data: object, *_ignored: object) -> mx.array:
    if not isinstance(data, mx.array):
        raise _Invalid(f"a parameter wraps {type(data).__name__}, not a tensor")
    return data


_ALLOWED: dict[str, object] = {
    "collections.OrderedDict": _OrderedDict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.storage.UntypedStorage": _UNTYPED,
    **{f"torch.{name}": dtype for name, dtype in (_STORAGE_TYPES | _V3_DTYPES).items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, zf: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(zf.read(prefix + "data.pkl")))
        self._zf = zf
        self._prefix = prefix
        # Views share a storage: read each record once. The bytes live until load() returns, so the peak is
        # about the file size on top of the arrays built from it.
        self._storages: dict[str, bytes] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        target = _ALLOWED.get(qualified)
        if callable(target):
            # A fresh wrapper per lookup, for the same reason `_DType` is a tuple: whatever BUILD then does to
            # the returned object dies with this file instead of altering the functions later files use.
            return lambda *args: target(*args)
        if target is not None:
            return target
        if module == "torch" and _DTYPE_LIKE.fullmatch(name):
            supported = ", ".join(d.name for d in (*_STORAGE_TYPES.values(), *_V3_DTYPES.values()))
            raise _Invalid(f"unsupported dtype '{qualified}' (supported: {supported})")
        raise _Invalid(f"refusing to load '{qualified}': only tensors and plain containers are allowed")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Invalid(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, _numel = pid
        if not isinstance(dtype, _DType) or not isinstance(key, str):
            raise _Invalid(f"unexpected storage reference {pid!r}")
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            try:
                self._storages[key] = self._zf.read(name)
            except KeyError:
                raise _Invalid(f"missing storage record '{name}'") from None
        return _Storage(key, dtype, self._storages[key])


def _load(zf: zipfile.ZipFile) -> object:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pickles:
        raise _Invalid("no '<archive>/data.pkl' record: this zip was not written by torch.save")
    prefix = pickles[0].removesuffix("data.pkl")
    if prefix + "byteorder" in zf.namelist():  # absent in old files, which were always little-endian
        order = zf.read(prefix + "byteorder")
        if order != b"little":
            raise _Invalid(f"byteorder is {order!r}; only little-endian checkpoints are supported")
    return _Unpickler(zf, prefix).load()


# What a malformed (not malicious: that is find_class's job) data.pkl makes the unpickler raise.
_MALFORMED_PICKLE = (
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    RecursionError,
)


def load_torch_checkpoint(path: str | os.PathLike[str]) -> object:
    """Unpickle the file with a restricted unpickler; every tensor becomes an mlx.core.array.

    Tensors come back contiguous with their dtype (float64 stays float64, which mlx supports on the CPU only),
    OrderedDicts as an OrderedDict subclass. Globals other than tensors and OrderedDict are refused.
    """
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            magic = f.read(4)
        if not magic:
            raise _Invalid("the file is empty")
        if magic != b"PK\x03\x04":
            raise _Invalid(
                "not a zip archive. Legacy (non-zip) torch files, from torch < 1.6 or "
                "torch.save(..., _use_new_zipfile_serialization=False), are not supported; re-save it with "
                "torch >= 1.6: torch.save(torch.load(old, weights_only=True), new)"
            )
        with zipfile.ZipFile(where) as zf:
            return _load(zf)
    except _Invalid as e:
        raise CheckpointError(f"{where}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read the file: {e}") from e
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise CheckpointError(f"{where}: truncated or corrupt zip archive ({e})") from e
    except _MALFORMED_PICKLE as e:
        raise CheckpointError(f"{where}: corrupt data.pkl ({type(e).__name__}: {e})") from e


def load_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, mx.array]:
    """Like load_torch_checkpoint, but requires a flat mapping str -> tensor.

    If the top-level object is a dict with a single key among ("state_dict", "model", "module") whose value is
    such a mapping, unwrap it. Anything else is a CheckpointError saying what was found.
    """
    obj = load_torch_checkpoint(path)
    if isinstance(obj, dict) and len(obj) == 1:
        ((key, inner),) = obj.items()
        if key in ("state_dict", "model", "module") and isinstance(inner, dict):
            obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{os.fspath(path)}: expected a state dict (str -> tensor), found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, mx.array):
            raise CheckpointError(
                f"{os.fspath(path)}: expected a flat state dict (str -> tensor), but key {key!r} holds "
                f"{type(value).__name__}; keys: {sorted(map(str, obj))[:8]}"
            )
    return dict(obj)
