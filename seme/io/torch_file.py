"""PyTorch checkpoints (`pytorch_model.bin`, torch.save's zip format) indexed without torch and
without running their pickle.

The pickle in `<archive>/data.pkl` is replayed by an unpickler that knows only the few names a
state dict refers to, each bound to a stand-in here that records a tensor's storage, offset, shape
and strides; any other name is refused, so nothing is imported or called. Storages are stored
uncompressed in the zip, so each tensor is a byte range of the file: the same `TensorInfo` a
safetensors header gives, read through the same memory map.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass

from seme.errors import SemeError
from seme.io.safetensors_file import DTYPE_SIZES, TORCH_NAMES, TensorInfo

_STORAGE_DTYPES = {"DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
                   "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
                   "ByteStorage": "U8", "BoolStorage": "BOOL"}
_MAX_PICKLE = 256 * 1024 * 1024


@dataclass(frozen=True)
class _StorageType:
    dtype: str | None  # None: an untyped storage (bytes), typed by the tensor that uses it


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str | None


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int  # in elements
    shape: tuple
    stride: tuple
    dtype: str


def _rebuild_tensor_v2(storage, offset, shape, stride, *_):
    if not isinstance(storage, _Storage) or storage.dtype is None:
        raise pickle.UnpicklingError("_rebuild_tensor_v2 without a typed storage")
    return _Tensor(storage, offset, tuple(shape), tuple(stride), storage.dtype)


def _rebuild_tensor_v3(storage, offset, shape, stride, requires_grad, hooks, dtype, *_):
    if not isinstance(storage, _Storage) or not isinstance(dtype, _StorageType) or dtype.dtype is None:
        raise pickle.UnpicklingError("_rebuild_tensor_v3 without a storage and a dtype")
    return _Tensor(storage, offset, tuple(shape), tuple(stride), dtype.dtype)


def _rebuild_parameter(data, *_):
    return data


def _latin1(text, encoding="latin1"):
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1"); no other codec is needed.
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode other than latin1")
    return text.encode("latin1")


_NAMES = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _latin1,
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    ("torch", "UntypedStorage"): _StorageType(None),
    **{("torch", name): _StorageType(code) for name, code in _STORAGE_DTYPES.items()},
    # torch.save names a dtype itself (`_rebuild_tensor_v3`) for dtypes without a typed storage class.
    **{("torch", name): _StorageType(code) for name, code in TORCH_NAMES.items()},
}


class _Replayer(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _NAMES[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        return _Storage(pid[2], pid[1].dtype)


class _Refused(Exception):
    pass


def _data_offset(raw, info: zipfile.ZipInfo) -> int:
    """Where an entry's bytes start: after its local header, whose extra field may differ from the
    central directory's."""
    raw.seek(info.header_offset)
    head = raw.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _contiguous(shape: tuple, stride: tuple) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def read_torch_index(path: str) -> dict[str, TensorInfo]:
    """The tensors of a torch.save zip checkpoint holding a state dict (or {"state_dict": …}), as
    byte ranges of the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as raw:
            if raw.read(4) != b"PK\x03\x04":
                raise SemeError(f"{path}: not a PyTorch zip checkpoint (a legacy or foreign format); "
                                f"re-save it with torch.save or convert it to safetensors")
            archive = zipfile.ZipFile(raw)
            pickles = [i for i in archive.infolist() if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise SemeError(f"{path}: not a PyTorch checkpoint (no single <archive>/data.pkl)")
            prefix = pickles[0].filename[:-len("data.pkl")]
            if pickles[0].file_size > _MAX_PICKLE:
                raise SemeError(f"{path}: data.pkl is {pickles[0].file_size} bytes, too large for a state dict")
            names = set(archive.namelist())
            if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() != b"little":
                raise SemeError(f"{path}: a big-endian checkpoint; convert it to safetensors first")
            try:
                state = _Replayer(io.BytesIO(archive.read(pickles[0]))).load()
            except _Refused as e:
                raise SemeError(f"{path}: its pickle refers to {e}, which a state dict does not; "
                                f"seme runs no pickled code (convert the model to safetensors)") from None
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                    KeyError, RecursionError) as e:
                raise SemeError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e})") from None
            if isinstance(state, dict) and set(state) == {"state_dict"}:
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise SemeError(f"{path}: holds a {type(state).__name__}, not a state dict")
            entries, storages = {}, {}
            for name, tensor in state.items():
                if not isinstance(name, str) or not isinstance(tensor, _Tensor):
                    raise SemeError(f"{path}: entry {name!r:.80} is not a tensor")
                entry = prefix + "data/" + tensor.storage.key
                if entry not in storages:
                    if entry not in names:
                        raise SemeError(f"{path}: tensor '{name}' refers to storage {tensor.storage.key!r}, "
                                        f"which the archive does not hold")
                    info = archive.getinfo(entry)
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise SemeError(f"{path}: tensor '{name}' is stored compressed; re-save it with torch.save")
                    storages[entry] = (info.file_size, _data_offset(raw, info))
                entries[name] = (tensor, *storages[entry])
    except OSError as e:
        raise SemeError(f"{path}: cannot read: {e.strerror or e}") from None
    except zipfile.BadZipFile as e:
        raise SemeError(f"{path}: corrupt zip archive ({e})") from None
    tensors = {}
    for name, (tensor, stored, data_start) in entries.items():
        shape, stride = tensor.shape, tensor.stride
        if not (all(isinstance(d, int) and d >= 0 for d in shape) and len(stride) == len(shape)
                and all(isinstance(s, int) for s in stride) and isinstance(tensor.offset, int) and tensor.offset >= 0):
            raise SemeError(f"{path}: tensor '{name}' has a malformed shape, stride or offset")
        count = 1
        for d in shape:
            count *= d
        if count and not _contiguous(shape, stride):
            raise SemeError(f"{path}: tensor '{name}' is saved as a non-contiguous view; "
                            f"re-save the state dict with contiguous tensors or convert it to safetensors")
        item = DTYPE_SIZES[tensor.dtype]
        start = data_start + tensor.offset * item
        end = start + count * item
        if end > data_start + stored or end > size:
            raise SemeError(f"{path}: tensor '{name}' lies beyond its storage (truncated?)")
        tensors[name] = TensorInfo(name, tensor.dtype, shape, path, start, end)
    return tensors
