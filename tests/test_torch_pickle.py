"""The torch-free checkpoint reader against torch itself: files come from `torch.save`, tensors are compared
with torch's values, and hostile or broken files must fail with a CheckpointError that names the file."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from csmd.model.errors import CheckpointError
from csmd.model.torch_pickle import load_torch_checkpoint, load_torch_state_dict


def save_and_load(tmp_path: Path, obj: object) -> object:
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    return load_torch_checkpoint(path)


def assert_same(actual: object, expected: torch.Tensor) -> None:
    """Same shape and dtype family, bit-identical values (floats compared after an exact upcast)."""
    assert isinstance(actual, mx.array)
    assert tuple(actual.shape) == tuple(expected.shape)
    if expected.dtype.is_floating_point:
        want = expected.double() if expected.dtype == torch.float64 else expected.float()
        got = np.array(actual.astype(mx.float64 if expected.dtype == torch.float64 else mx.float32, stream=mx.cpu))
        np.testing.assert_array_equal(got, want.numpy())
    else:
        np.testing.assert_array_equal(np.array(actual), expected.numpy())


def rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Copy a torch zip, passing every record through `edit` (return None to drop the record)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = edit(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)


def write_pickle_zip(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", b"little")


MLX_DTYPES = {
    torch.float32: mx.float32,
    torch.float16: mx.float16,
    torch.bfloat16: mx.bfloat16,
    torch.float64: mx.float64,
    torch.int64: mx.int64,
    torch.int32: mx.int32,
    torch.int16: mx.int16,
    torch.int8: mx.int8,
    torch.uint8: mx.uint8,
    torch.bool: mx.bool_,
    torch.uint16: mx.uint16,  # torch >= 2.3 saves this one with _rebuild_tensor_v3
}


@pytest.mark.parametrize("dtype", list(MLX_DTYPES), ids=str)
def test_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        tensor = (torch.randn(3, 5, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
    elif dtype == torch.bool:
        tensor = torch.rand(3, 5, generator=gen) > 0.5
    else:
        info = torch.iinfo(dtype)
        tensor = torch.randint(max(info.min, -(2**31)), min(info.max, 2**31), (3, 5), generator=gen).to(dtype)
        tensor[0, 0], tensor[0, 1] = info.min, info.max  # the extremes survive, e.g. int64 beyond float range
    loaded = save_and_load(tmp_path, {"t": tensor})
    assert isinstance(loaded, dict)
    assert loaded["t"].dtype == MLX_DTYPES[dtype]
    assert_same(loaded["t"], tensor)


def test_bfloat16_bits_are_exact(tmp_path: Path) -> None:
    bits = torch.arange(0, 2**16, 7, dtype=torch.int32).to(torch.int16)
    tensor = bits.view(torch.bfloat16)
    tensor = tensor[~torch.isnan(tensor)]  # NaN payloads need not survive an upcast comparison
    loaded = save_and_load(tmp_path, tensor)
    assert isinstance(loaded, mx.array)
    np.testing.assert_array_equal(np.array(loaded.view(mx.int16)), tensor.view(torch.int16).numpy())


def test_scalar_and_empty(tmp_path: Path) -> None:
    loaded = save_and_load(tmp_path, {"scalar": torch.tensor(2.5), "empty": torch.empty(0, 3), "none": torch.ones(0)})
    assert isinstance(loaded, dict)
    assert loaded["scalar"].shape == () and loaded["scalar"].item() == 2.5
    assert loaded["empty"].shape == (0, 3) and loaded["empty"].dtype == mx.float32
    assert loaded["none"].shape == (0,)


def test_views_and_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    views = {
        "base": base,
        "transposed": base.transpose(0, 2),
        "sliced": base[1:, 2:, ::2],  # storage_offset > 0 and a non-unit stride
        "row": base[2, 1],
        "element": base[1, 2, 3],  # a scalar view at an offset
        "permuted_bf16": base.to(torch.bfloat16).permute(2, 0, 1),
    }
    assert views["sliced"].storage_offset() > 0
    loaded = save_and_load(tmp_path, views)
    assert isinstance(loaded, dict)
    for name, tensor in views.items():
        assert_same(loaded[name], tensor)
    with zipfile.ZipFile(tmp_path / "ckpt.pt") as z:  # all float32 views were written as one storage
        assert len([n for n in z.namelist() if "/data/" in n]) == 2


def test_module_state_dict_and_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.BatchNorm1d(3))
    state = module.state_dict()
    path = tmp_path / "sd.pt"
    torch.save(state, path)
    loaded = load_torch_checkpoint(path)
    assert isinstance(loaded, OrderedDict)
    assert list(loaded) == list(state)  # order kept; BatchNorm's int64 num_batches_tracked included
    for name, tensor in state.items():
        assert_same(loaded[name], tensor)
    params = {name: p for name, p in module.named_parameters()}
    assert all(isinstance(p, torch.nn.Parameter) for p in params.values())
    loaded_params = save_and_load(tmp_path, params)
    assert isinstance(loaded_params, dict)
    for name, param in params.items():
        assert_same(loaded_params[name], param.detach())


def test_state_dict_unwrapping(tmp_path: Path) -> None:
    state = torch.nn.Linear(2, 2).state_dict()
    for wrapper in ("model", "state_dict", "module"):
        path = tmp_path / f"{wrapper}.pt"
        torch.save({wrapper: state}, path)
        loaded = load_torch_state_dict(path)
        assert type(loaded) is dict and list(loaded) == ["weight", "bias"]
        assert_same(loaded["weight"], state["weight"])
    torch.save(state, tmp_path / "flat.pt")
    assert list(load_torch_state_dict(tmp_path / "flat.pt")) == ["weight", "bias"]


@pytest.mark.parametrize(
    ("obj", "found"),
    [
        ({"weight": torch.ones(2), "step": 3}, "'step' holds int"),
        ({"model": {"w": torch.ones(1)}, "optimizer": {"w": torch.ones(1)}}, "'model' holds dict"),
        ({"model": {"inner": {"w": torch.ones(1)}}}, "'inner' holds dict"),
        ([torch.ones(2)], "found list"),
    ],
)
def test_state_dict_refuses_other_shapes(tmp_path: Path, obj: object, found: str) -> None:
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=found) as err:
        load_torch_state_dict(path)
    assert "odd.pt" in str(err.value)


class _Exploit:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (self.command,))


def test_refuses_code_execution_via_torch_save(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "x": _Exploit(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match=rf"refusing to load '{os.system.__module__}\.system'") as err:
        load_torch_state_dict(path)
    assert "evil.pt" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_refuses_builtins_exec(tmp_path: Path, protocol: int) -> None:
    """Protocol 4 reaches globals through STACK_GLOBAL rather than GLOBAL; both go through find_class."""
    marker = tmp_path / "pwned"

    class Exec:
        def __reduce__(self) -> tuple[object, ...]:
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "evil.pt"
    payload = pickle.dumps(Exec(), protocol=protocol)
    write_pickle_zip(path, payload)
    # Protocol 2 spells the module the Python 2 way; the refusal names the global as the file spells it.
    with pytest.raises(CheckpointError, match=r"refusing to load '(builtins|__builtin__)\.exec'"):
        load_torch_checkpoint(path)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: plain pickle does run it
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        # BUILD with a dict state on the float32 storage type: {"numpy": "<i4"} would make later files read
        # their float32 storages as int32 if that entry were shared and mutable.
        b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00numpyX\x03\x00\x00\x00<i4sb.",
        # BUILD with (None, slot state) on a rebuild function: setattr(fn, "__defaults__", (0, 0, 0, 0)).
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__(K\x00K\x00K\x00K\x00ts\x86b.",
        # The same on the OrderedDict stand-in: setattr(cls, "__init__", <a rebuild function>).
        b"\x80\x02ccollections\nOrderedDict\nN}X\x08\x00\x00\x00__init__ctorch._utils\n_rebuild_parameter\ns\x86b.",
    ],
    ids=["dtype-table", "function", "ordered-dict"],
)
def test_hostile_file_cannot_alter_later_loads(tmp_path: Path, payload: bytes) -> None:
    """Pickle's BUILD sets attributes on objects find_class returned; that must not outlive the file."""
    path = tmp_path / "poison.pt"
    write_pickle_zip(path, payload)
    with contextlib.suppress(CheckpointError):
        load_torch_checkpoint(path)
    state = torch.nn.Linear(3, 2).state_dict()
    torch.save(state, tmp_path / "after.pt")
    loaded = load_torch_checkpoint(tmp_path / "after.pt")
    assert isinstance(loaded, OrderedDict)
    for name, tensor in state.items():
        assert_same(loaded[name], tensor)


def test_refuses_unlisted_torch_global(tmp_path: Path) -> None:
    path = tmp_path / "device.pt"
    torch.save({"device": torch.device("cpu")}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load 'torch\.device'"):
        load_torch_checkpoint(path)


def test_unsupported_dtype(tmp_path: Path) -> None:
    path = tmp_path / "complex.pt"
    torch.save({"c": torch.ones(2, dtype=torch.complex64)}, path)
    with pytest.raises(CheckpointError, match=r"complex\.pt: unsupported dtype 'torch.ComplexFloatStorage'"):
        load_torch_checkpoint(path)
    torch.save({"f8": torch.ones(2).to(torch.float8_e4m3fn)}, path)
    with pytest.raises(CheckpointError, match=r"unsupported dtype 'torch\.float8_e4m3fn'"):
        load_torch_checkpoint(path)


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    path = tmp_path / "valid.pt"
    torch.save({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(8, dtype=torch.int64)}, path)
    return path


def test_truncated(tmp_path: Path, valid: Path) -> None:
    data = valid.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.pt: truncated or corrupt zip"):
        load_torch_checkpoint(path)


def test_corrupt_storage_bytes(tmp_path: Path, valid: Path) -> None:
    data = bytearray(valid.read_bytes())
    with zipfile.ZipFile(valid) as z:
        info = z.getinfo("valid/data/0")
    # The payload starts after the local header, whose extra field (torch's alignment padding) differs from
    # the central directory's copy in `info.extra`.
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.pt: truncated or corrupt zip .*CRC"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (bytes(range(256)) * 4, "not a zip archive. Legacy"),
        (None, "not a zip archive. Legacy"),  # the real legacy format
    ],
    ids=["empty", "random", "legacy"],
)
def test_not_a_zip(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"bad\.pt: {message}"):
        load_torch_state_dict(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: cannot read"):
        load_torch_checkpoint(tmp_path / "nope.pt")


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match=r"other\.zip: no '<archive>/data\.pkl'"):
        load_torch_checkpoint(path)


def test_missing_storage_record(tmp_path: Path, valid: Path) -> None:
    path = tmp_path / "holed.pt"
    rewrite_zip(valid, path, lambda name, data: None if name == "valid/data/1" else data)
    with pytest.raises(CheckpointError, match=r"holed\.pt: missing storage record 'valid/data/1'"):
        load_torch_checkpoint(path)


def test_short_storage(tmp_path: Path, valid: Path) -> None:
    path = tmp_path / "short.pt"
    rewrite_zip(valid, path, lambda name, data: data[:100] if name == "valid/data/0" else data)
    with pytest.raises(CheckpointError, match=r"short\.pt: storage record 'data/0' has 100 bytes.* needs 256"):
        load_torch_checkpoint(path)


def test_hostile_stride_cannot_read_out_of_bounds(tmp_path: Path, valid: Path) -> None:
    """A size/stride pointing far past the record must be refused, never handed to as_strided."""
    with zipfile.ZipFile(valid) as z:
        payload = z.read("valid/data.pkl")
    # In the pickle, tensor "a" has size (64,) and stride (1,) as BININT1 pairs; give it stride 10**6 instead.
    hostile = payload.replace(b"K\x01\x85", b"J@B\x0f\x00\x85", 1)  # BININT1 1 -> BININT 1_000_000
    assert hostile != payload
    path = tmp_path / "stride.pt"
    rewrite_zip(valid, path, lambda name, data: hostile if name.endswith("data.pkl") else data)
    with pytest.raises(CheckpointError, match=r"stride\.pt: storage record 'data/0' has 256 bytes"):
        load_torch_checkpoint(path)


def test_big_endian_refused(tmp_path: Path, valid: Path) -> None:
    path = tmp_path / "big.pt"
    rewrite_zip(valid, path, lambda name, data: b"big" if name.endswith("/byteorder") else data)
    with pytest.raises(CheckpointError, match=r"big\.pt: byteorder is b'big'; only little-endian"):
        load_torch_checkpoint(path)


def test_garbage_pickle(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    write_pickle_zip(path, b"\x80\x02not a pickle")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: corrupt data\.pkl"):
        load_torch_checkpoint(path)


def test_any_archive_name_and_no_byteorder(tmp_path: Path) -> None:
    """The top folder is whatever torch.save chose; files before torch 1.9 have no byteorder record."""
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6).reshape(2, 3)}, buffer)
    path = tmp_path / "renamed.pt"
    with zipfile.ZipFile(buffer) as zin, zipfile.ZipFile(path, "w") as zout:
        for name in zin.namelist():
            if not name.endswith("/byteorder"):
                zout.writestr("something_else/" + name.split("/", 1)[1], zin.read(name))
    loaded = load_torch_state_dict(path)
    assert_same(loaded["w"], torch.arange(6).reshape(2, 3))
