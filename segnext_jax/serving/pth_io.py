"""Reads and writes PyTorch `.pth` files (torch.save's zip format), and reads pickles of numpy arrays such as JSeg's
`.pkl` (Jittor's `jt.save`), without torch or Jittor and without running pickled code.

A `.pth` is a zip archive `<name>/data.pkl` + `<name>/data/<key>` (raw little-endian storage bytes) + bookkeeping
records. `data.pkl` is a pickle in which every tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)` and every storage a persistent id `('storage', torch.<Type>Storage, key, location, numel)`.
A Jittor `.pkl` is `pickle.dumps(obj, protocol=4)` of a dict whose tensors are numpy arrays (`jt.save` converts its
Vars first), followed by the pickle's SHA-1 digest (20 bytes) and the marker b'HCAJSLHD'. A numpy array pickles as
`numpy._core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')` whose state (shape, `numpy.dtype(...)`, Fortran
order, raw bytes) comes in a BUILD opcode, or, in protocol 5, as `numpy._core.numeric._frombuffer(bytes, dtype,
shape, order)`; a numpy scalar as `numpy._core.multiarray.scalar(dtype, bytes)` (`numpy.core` before numpy 2).
Reading runs the pickle through an unpickler whose `find_class` hands out only our own stand-ins for those few globals
(plus containers), so no function or class named by the file is ever imported or called: a file naming anything else
is refused. The numpy stand-ins only record their arguments; afterwards arrays of plain numbers (bool, integer,
float, complex) are built from the recorded bytes with `np.frombuffer`. Writing emits the `.pth` opcodes by hand, so
`torch.load(weights_only=True)` accepts the result.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import math
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import ml_dtypes
import numpy as np

# torch storage classes <-> numpy dtypes (bfloat16 through ml_dtypes, the dtype package jax itself uses).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

# numpy arrays, scalars and dtypes as pickles store them (`numpy.core` before numpy 2, `numpy._core` since).
_NUMPY_ARRAY = frozenset({"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"})
_NUMPY_FROMBUFFER = frozenset({"numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer"})
_NUMPY_SCALAR = frozenset({"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"})
_NUMPY_DTYPE = "numpy.dtype"
_NUMBER_DTYPE = re.compile(r"[biufc][0-9]{1,2}")  # bool, (unsigned) integers, floats, complex: no objects, no fields

# Data-only classes that training frameworks put in the parts of a checkpoint we ignore (mmengine's message hub logs)
# and numpy's reconstruction functions. They become inert `OpaqueObject` records: nothing of theirs is imported or
# run. Records of numpy arrays and scalars of plain numbers are then turned into numpy values (`_numpy_values`).
_OPAQUE_GLOBALS = frozenset(
    {
        "mmengine.logging.history_buffer.HistoryBuffer",
        _NUMPY_DTYPE,
        "numpy.ndarray",
        *_NUMPY_ARRAY,
        *_NUMPY_FROMBUFFER,
        *_NUMPY_SCALAR,
    }
)

_ZIP_MAGIC = b"PK\x03\x04"
_JITTOR_MARKER = b"HCAJSLHD"  # after the SHA-1 digest (20 bytes) of the pickle that precedes them
_SHA1_SIZE = 20
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ALIGNMENT = 64  # torch aligns storage records to 64 bytes (needed by torch.load(mmap=True))
_ARCHIVE = "archive"


class CheckpointFormatError(ValueError):
    """A bad input checkpoint: not a readable zip-format `torch.save` file (truncated, legacy format, another file
    type), or no SegNeXt state_dict in it (no tensors, a tensor of the wrong number of dimensions, another model)."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle names a global outside the allowlist; nothing from it was run."""


class OpaqueObject:
    """Inert record of an object of a known data-only class (see `_OPAQUE_GLOBALS`): its name, arguments and state."""

    global_name = ""

    def __new__(cls, *args: Any) -> Self:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"OpaqueObject({self.global_name})"


def _opaque_type(global_name: str) -> type[OpaqueObject]:
    """A fresh `OpaqueObject` subclass standing in for the class or function `global_name`."""
    return type("OpaqueObject", (OpaqueObject,), {"global_name": global_name})


def _opaque_getattr(obj: Any, name: str) -> OpaqueObject:
    """`getattr` as pickles use it for bound methods, allowed on opaque records only."""
    if not (isinstance(obj, OpaqueObject) or (isinstance(obj, type) and issubclass(obj, OpaqueObject))):
        raise UnsafeCheckpointError(f"refused getattr({obj!r}, {name!r}): only allowed on known data records")
    return _opaque_type(f"{obj.global_name}.{name}")()


def _latin1_encode(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it to store `bytes`."""
    if encoding != "latin1":
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} is not allowed in a checkpoint")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()` as protocol-2 pickles store an empty `bytes` (the raw data of an empty numpy array)."""
    if args:
        raise UnsafeCheckpointError(f"builtins.bytes{args!r} is not allowed in a checkpoint (only bytes())")
    return b""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for a `torch.<Type>Storage` class named in a storage's persistent id."""

    name: str
    dtype: np.dtype


def _rebuild_tensor(
    storage: np.ndarray,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Any,
    metadata: Any = None,
) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2`: a contiguous copy of the strided view, bounds-checked against the storage."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointFormatError("a tensor record does not refer to a storage")
    if not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)) or len(size) != len(stride):
        raise CheckpointFormatError(f"a tensor record has an invalid offset/size/stride {offset}, {size}, {stride}")
    if 0 in size:
        return np.empty(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointFormatError(f"a tensor of size {size} reaches element {last} of a storage of {storage.size}")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride), writeable=False
    )
    return view.copy()


def _rebuild_parameter(data: np.ndarray, requires_grad: bool, backward_hooks: Any, state: Any = None) -> np.ndarray:
    """`torch._utils._rebuild_parameter(_with_state)`: a parameter is just its data here."""
    return data


class _Allowed:
    """A callable the pickle may name, frozen and without `__dict__` so that a BUILD opcode cannot alter it."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]):
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"setting attribute {name!r} of {self._fn.__name__} is not allowed")

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __repr__(self) -> str:
        return f"{self._fn.__module__}.{self._fn.__qualname__}"


_SAFE_GLOBALS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
    "builtins.getattr": _opaque_getattr,
    "_codecs.encode": _latin1_encode,
    "builtins.bytes": _empty_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals only to the stand-ins above and storages through `read_storage`."""

    def __init__(self, file: io.BytesIO, read_storage: Callable[[str, np.dtype, int], np.ndarray]):
        super().__init__(file)
        self._read_storage = read_storage
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        qualname = f"{module}.{name}"
        if qualname in _SAFE_GLOBALS:
            return _Allowed(_SAFE_GLOBALS[qualname])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if qualname in _OPAQUE_GLOBALS:
            return _opaque_type(qualname)
        raise UnsafeCheckpointError(
            f"refused to load the global '{qualname}' named in the checkpoint's pickle (only tensors, "
            "containers and known data records are allowed); nothing from the file was run"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise CheckpointFormatError(f"unknown persistent id {pid!r} in the checkpoint's pickle")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(str(key), storage_type.dtype, int(numel))
        return self._storages[key]


def _sniff_error(path: str, head: bytes) -> CheckpointFormatError:
    """The error for a file that is not a zip archive, saying what it looks like instead."""
    if head.startswith(_LEGACY_MAGIC) or head[257:262] == b"ustar":
        return CheckpointFormatError(
            f"{path}: legacy (pre-zip) PyTorch checkpoint format; re-save it with PyTorch first: "
            f"torch.save(torch.load('{path}', map_location='cpu'), 'new.pth', _use_new_zipfile_serialization=True)"
        )
    if head.startswith(_ZIP_MAGIC):
        return CheckpointFormatError(
            f"{path}: zip archive without its directory: the file is truncated, download again"
        )
    return CheckpointFormatError(
        f"{path}: not a PyTorch checkpoint (starts with {head[:8]!r}); expected a zip archive written by torch.save, "
        "or a pickle of numpy arrays (a JSeg .pkl)"
    )


def _numpy_dtype(record: Any) -> np.dtype | None:
    """The dtype a `numpy.dtype(name, align, copy)` record (with its BUILD state) stands for, if it is one of plain
    numbers; else None."""
    if not (isinstance(record, OpaqueObject) and record.global_name == _NUMPY_DTYPE and record.args):
        return None
    name, state, order = record.args[0], record.state, "|"
    if not (isinstance(name, str) and _NUMBER_DTYPE.fullmatch(name)):
        return None
    if state is not None:  # (version, byte order, subarray, names, fields, ...): none of the last three for numbers
        if not (isinstance(state, tuple) and len(state) >= 5 and state[2:5] == (None, None, None)):
            return None
        order = state[1]
    if order not in ("<", ">", "|", "="):
        return None
    try:
        dtype = np.dtype(name)
    except TypeError:  # e.g. 'i16': no such type
        return None
    return dtype.newbyteorder(order) if order in "<>" else dtype


def _numpy_array(data: Any, dtype: np.dtype | None, shape: Any, order: Any) -> np.ndarray | None:
    """A native-endian C-ordered copy of the array of `shape` whose raw bytes are `data`; None for a dtype that is
    not one of plain numbers. CheckpointFormatError when shape, order and size do not fit."""
    if dtype is None or not isinstance(data, (bytes, bytearray)):
        return None
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)) or order not in ("C", "F"):
        raise CheckpointFormatError(f"a numpy array record has an invalid shape {shape!r} or order {order!r}")
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise CheckpointFormatError(
            f"a numpy array of shape {shape} and dtype {dtype} has {len(data)} bytes, expected "
            f"{math.prod(shape) * dtype.itemsize}"
        )
    array = np.frombuffer(data, dtype).reshape(shape, order=order)
    return array.astype(dtype.newbyteorder("="), order="C")


def _numpy_value(record: OpaqueObject) -> Any:
    """The numpy array or scalar that a record of numpy's pickling stands for, or the record itself when its dtype is
    not one of plain numbers (strings, objects, structured dtypes stay inert records)."""
    name, args, value = record.global_name, record.args, None
    if name in _NUMPY_ARRAY and args and getattr(args[0], "global_name", "") == "numpy.ndarray":
        state = record.state  # (version, shape, dtype, is_fortran, raw bytes)
        if isinstance(state, tuple) and len(state) == 5:
            _, shape, dtype, fortran, data = state
            value = _numpy_array(data, _numpy_dtype(dtype), shape, "F" if fortran else "C")
    elif name in _NUMPY_FROMBUFFER and len(args) == 4:
        data, dtype, shape, order = args
        value = _numpy_array(data, _numpy_dtype(dtype), shape, order)
    elif name in _NUMPY_SCALAR and len(args) == 2:
        dtype, data = args
        array = _numpy_array(data, _numpy_dtype(dtype), (), "C")
        value = None if array is None else array[()]
    return record if value is None else value


def _numpy_values(tree: Any) -> Any:
    """`tree` with the records of numpy arrays and scalars in its dicts, lists and tuples replaced by numpy values
    (dicts and lists in place; shared and self-containing containers are visited once)."""
    numpy_records = _NUMPY_ARRAY | _NUMPY_FROMBUFFER | _NUMPY_SCALAR
    done: dict[int, Any] = {}

    def convert(obj: Any) -> Any:
        if id(obj) in done:
            return done[id(obj)]
        if isinstance(obj, dict):
            done[id(obj)] = obj
            for key, value in obj.items():
                obj[key] = convert(value)
        elif isinstance(obj, list):
            done[id(obj)] = obj
            obj[:] = [convert(value) for value in obj]
        elif isinstance(obj, tuple):
            done[id(obj)] = tuple(convert(value) for value in obj)
        elif isinstance(obj, OpaqueObject) and obj.global_name in numpy_records:
            done[id(obj)] = _numpy_value(obj)
        else:
            return obj
        return done[id(obj)]

    return convert(tree)


def _unpickle(data: bytes, path: str, read_storage: Callable[[str, np.dtype, int], np.ndarray]) -> Any:
    """Runs the pickle `data` through the restricted unpickler, then turns numpy records into numpy values."""
    unpickler = _RestrictedUnpickler(io.BytesIO(data), read_storage)
    try:
        return _numpy_values(unpickler.load())
    except (UnsafeCheckpointError, CheckpointFormatError) as e:
        raise type(e)(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as e:
        raise CheckpointFormatError(f"{path}: malformed pickle in the checkpoint ({e})") from e


def read_pth(path: str | Path) -> Any:
    """The object stored by `torch.save` in `path`, with every tensor as a numpy array (bfloat16 via ml_dtypes).

    Tensors are contiguous copies (views of one storage become independent arrays). Only tensors, parameters,
    storages, numpy arrays and scalars of numbers, dicts/OrderedDicts, lists, tuples, sets, scalars and strings are
    rebuilt; a few known data-only classes (mmengine logs, numpy arrays of strings or objects) become inert
    `OpaqueObject`s; any other global raises `UnsafeCheckpointError` before anything runs. Raises
    `CheckpointFormatError` for truncated, legacy or foreign files.
    """
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if not zipfile.is_zipfile(path):
        raise _sniff_error(path, head)
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_archive(zf, path)
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, zipfile.LargeZipFile) as e:
        raise CheckpointFormatError(f"{path}: corrupt or truncated checkpoint ({e}); download or save it again") from e


def _read_archive(zf: zipfile.ZipFile, path: str) -> Any:
    """Unpickles `<archive>/data.pkl` of an open torch zip checkpoint."""
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointFormatError(f"{path}: a zip archive but not a torch.save checkpoint (no <archive>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder") != b"little":
        raise CheckpointFormatError(
            f"{path}: big-endian checkpoint; re-save it with torch.save on a little-endian machine"
        )

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        data = zf.read(f"{prefix}data/{key}")
        if len(data) != numel * dtype.itemsize:
            raise CheckpointFormatError(f"storage {key} has {len(data)} bytes, expected {numel * dtype.itemsize}")
        return np.frombuffer(data, dtype)

    return _unpickle(zf.read(pickles[0]), path, read_storage)


def _no_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    raise CheckpointFormatError("a torch tensor storage outside a torch.save zip archive")


def read_pickle(path: str | Path) -> Any:
    """The object in a pickle file of numpy arrays: a JSeg `.pkl` written by Jittor's `jt.save` (its SHA-1 digest is
    checked) or a plain `pickle.dump` (protocols 2 to 5), with the guarantees of `read_pth`: numpy arrays and
    scalars of numbers, containers, strings and plain scalars are rebuilt, nothing named by the file is imported or
    run, and any other global raises `UnsafeCheckpointError` before anything runs."""
    path = str(path)
    data = Path(path).read_bytes()
    if data.endswith(_JITTOR_MARKER):
        end = len(data) - len(_JITTOR_MARKER)
        data, digest = data[: end - _SHA1_SIZE], data[end - _SHA1_SIZE : end]
        if hashlib.sha1(data).digest() != digest:
            raise CheckpointFormatError(
                f"{path}: corrupt Jittor checkpoint (its SHA-1 checksum does not match); download or save it again"
            )
    return _unpickle(data, path, _no_storage)


def read_checkpoint(path: str | Path) -> Any:
    """A checkpoint file told apart by its content: a pickle (a JSeg `.pkl`, `read_pickle`) or else a `torch.save`
    file (`read_pth`, which names what a foreign file looks like)."""
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head[:1] == pickle.PROTO and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head != _LEGACY_MAGIC:
        return read_pickle(path)
    return read_pth(path)


@dataclasses.dataclass
class _PickleWriter:
    """Emits protocol-2 pickle opcodes for a tree, collecting each array as a storage record."""

    out: io.BytesIO = dataclasses.field(default_factory=io.BytesIO)
    storages: list[np.ndarray] = dataclasses.field(default_factory=list)

    def op(self, code: bytes, payload: bytes = b"") -> None:
        self.out.write(code + payload)

    def global_(self, module: str, name: str) -> None:
        self.op(pickle.GLOBAL, f"{module}\n{name}\n".encode())

    def str_(self, text: str) -> None:
        data = text.encode("utf-8")
        self.op(pickle.BINUNICODE, struct.pack("<I", len(data)) + data)

    def int_(self, value: int) -> None:
        if -(2**31) <= value < 2**31:
            self.op(pickle.BININT, struct.pack("<i", value))
        else:
            encoded = pickle.encode_long(value)
            self.op(pickle.LONG1, bytes([len(encoded)]) + encoded)

    def tuple_(self, values: tuple[int, ...]) -> None:
        self.op(pickle.MARK)
        for v in values:
            self.int_(v)
        self.op(pickle.TUPLE)

    def array(self, array: np.ndarray, where: str) -> None:
        """Emits `_rebuild_tensor_v2(('storage', <Type>Storage, key, 'cpu', numel), 0, shape, stride, False, {})`."""
        storage_name = next((n for n, d in _STORAGE_DTYPES.items() if d == array.dtype), None)
        if storage_name is None:
            raise ValueError(f"{where or 'top level'}: dtype {array.dtype} has no PyTorch storage type; cast it first")
        key = str(len(self.storages))
        self.storages.append(np.ascontiguousarray(array))
        strides = tuple(int(np.prod(array.shape[i + 1 :])) for i in range(array.ndim))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.op(pickle.MARK)
        self.op(pickle.MARK)
        self.str_("storage")
        self.global_("torch", storage_name)
        self.str_(key)
        self.str_("cpu")
        self.int_(array.size)
        self.op(pickle.TUPLE)
        self.op(pickle.BINPERSID)
        self.int_(0)
        self.tuple_(array.shape)
        self.tuple_(strides)
        self.op(pickle.NEWFALSE)
        self.global_("collections", "OrderedDict")
        self.op(pickle.EMPTY_TUPLE)
        self.op(pickle.REDUCE)
        self.op(pickle.TUPLE)
        self.op(pickle.REDUCE)

    def items(self, values: list | tuple, where: str) -> None:
        self.op(pickle.MARK)
        for i, v in enumerate(values):
            self.value(v, f"{where}[{i}]")

    def value(self, value: Any, where: str) -> None:
        """Emits `value` (dict, list, tuple, array, str, int, float, bool or None); `where` names it in errors."""
        if isinstance(value, np.ndarray):
            self.array(value, where)
        elif isinstance(value, dict):
            self.op(pickle.EMPTY_DICT)
            self.op(pickle.MARK)
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(f"{where or 'top level'}: key {k!r} is not a string")
                self.str_(k)
                self.value(v, f"{where}.{k}" if where else k)
            self.op(pickle.SETITEMS)
        elif isinstance(value, list):
            self.op(pickle.EMPTY_LIST)
            self.items(value, where)
            self.op(pickle.APPENDS)
        elif isinstance(value, tuple):
            self.items(value, where)
            self.op(pickle.TUPLE)
        elif isinstance(value, str):
            self.str_(value)
        elif value is None:
            self.op(pickle.NONE)
        elif isinstance(value, bool):
            self.op(pickle.NEWTRUE if value else pickle.NEWFALSE)
        elif isinstance(value, int):
            self.int_(value)
        elif isinstance(value, float):
            self.op(pickle.BINFLOAT, struct.pack(">d", value))
        else:
            raise TypeError(
                f"{where or 'top level'}: cannot store a {type(value).__name__} (only arrays and plain values)"
            )


def _write_aligned(out: io.BufferedWriter, zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    """Stores `name` uncompressed with its data starting on a 64-byte boundary (padding in the header's extra field)."""
    info = zipfile.ZipInfo(name)
    header = 30 + len(name.encode()) + 4  # local file header, file name, extra field's own header
    pad = -(out.tell() + header) % _ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad
    zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def write_pth(tree: Any, path: str | Path) -> None:
    """Writes `tree` (nested dicts/lists of numpy arrays and plain values) as a zip `.pth` that `torch.load` reads.

    Arrays become tensors of the same dtype and shape (bfloat16 via ml_dtypes); dicts stay dicts, so a flat dict of
    arrays loads as a state_dict that `load_state_dict(strict=True)` accepts. No torch needed.
    """
    writer = _PickleWriter()
    writer.op(pickle.PROTO, b"\x02")
    try:
        writer.value(tree, "")
    except (TypeError, ValueError) as e:
        raise type(e)(f"cannot write {path}: {e}") from None
    writer.op(pickle.STOP)
    records = [("data.pkl", writer.out.getvalue()), (".format_version", b"1"), (".storage_alignment", b"64")]
    records.append(("byteorder", sys.byteorder.encode()))
    records += [(f"data/{i}", a.tobytes()) for i, a in enumerate(writer.storages)]
    records.append(("version", b"3\n"))
    with open(path, "wb") as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            _write_aligned(out, zf, f"{_ARCHIVE}/{name}", data)
