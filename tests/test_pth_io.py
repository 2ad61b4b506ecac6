"""read_pth / write_pth against torch itself: bitwise tensors, numpy values, torch-loadable output, refused payloads,
clear errors."""

import builtins
import collections
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_layouts import reference_segmentor

from segnext_jax.serving.pth_io import CheckpointFormatError, OpaqueObject, UnsafeCheckpointError, read_pth, write_pth

TORCH_TO_NUMPY = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: np.dtype("bfloat16"),  # registered by ml_dtypes
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


def assert_bitwise_equal(array: np.ndarray, tensor: torch.Tensor, name: str = "") -> None:
    """Same dtype, shape and bytes (bfloat16 compared through its bits, as numpy cannot take it from torch)."""
    assert array.dtype == TORCH_TO_NUMPY[tensor.dtype], name
    assert array.shape == tuple(tensor.shape), name
    if tensor.dtype == torch.bfloat16:
        expected = tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(array.view(np.uint16), expected), name
    else:
        assert array.tobytes() == tensor.contiguous().numpy().tobytes(), name


@pytest.fixture(scope="module")
def reference_t() -> torch.nn.Module:
    return reference_segmentor("t", 150, seed=1)


@pytest.fixture(scope="module")
def reference_t_file(reference_t, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pth") / "segnext_t.pth"
    torch.save({"meta": {"CLASSES": ("wall",)}, "state_dict": reference_t.state_dict()}, path)
    return str(path)


def test_reads_reference_state_dict_bitwise(reference_t, reference_t_file):
    loaded = read_pth(reference_t_file)
    reference = reference_t.state_dict()
    assert list(loaded["state_dict"]) == list(reference)
    for key, tensor in reference.items():
        assert_bitwise_equal(loaded["state_dict"][key], tensor, key)
    assert loaded["meta"] == {"CLASSES": ("wall",)}


def test_reads_every_dtype(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {str(dtype): (torch.randn(3, 5, generator=generator) * 100).to(dtype) for dtype in TORCH_TO_NUMPY}
    tensors["scalar"] = torch.tensor(7, dtype=torch.int64)
    tensors["empty"] = torch.empty(0, 4)
    tensors["parameter"] = torch.nn.Parameter(torch.randn(2, 2, generator=generator))
    torch.save(tensors, tmp_path / "dtypes.pth")
    loaded = read_pth(tmp_path / "dtypes.pth")
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        assert_bitwise_equal(loaded[name], tensor.detach(), name)


def test_reads_strided_and_shared_storages(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    halves = torch.arange(40, dtype=torch.bfloat16).reshape(5, 8)
    views = {
        "base": base,
        "flat": base.view(12, 5),
        "permuted": base.permute(2, 0, 1),
        "offset_strided": base[1:, ::2, 1:4],
        "expanded": base[0, 0].expand(3, 5),
        "bf16_column": halves[:, 3],
    }
    torch.save(views, tmp_path / "views.pth")
    loaded = read_pth(tmp_path / "views.pth")
    for name, tensor in views.items():
        assert_bitwise_equal(loaded[name], tensor, name)
    loaded["base"][0, 0, 0] = -1.0  # storages are shared in torch, but the arrays are independent copies
    assert loaded["flat"][0, 0] == 0.0 and loaded["permuted"][0, 0, 0] == 0.0


def test_reads_mmengine_runner_checkpoint(reference_t, tmp_path):
    """The layout mmengine's runner saves (MMSeg 1.x model zoo): message-hub logs, optimizer, schedulers, meta."""
    from mmengine.logging import MessageHub
    from mmengine.optim.scheduler import PolyLR

    parameters = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    optimizer = torch.optim.AdamW(parameters, lr=6e-5, weight_decay=0.01)
    scheduler = PolyLR(optimizer, eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False)
    for p in parameters:
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    hub = MessageHub.get_instance("test_pth_io")
    hub.update_scalar("train/loss", 0.25)
    hub.update_info("iter", 10)
    checkpoint = {
        "meta": {"dataset_meta": {"classes": ("wall",), "palette": [[120, 120, 120]]}, "lr": np.float64(6e-5)},
        "state_dict": reference_t.state_dict(),
        "message_hub": hub.state_dict(),
        "optimizer": optimizer.state_dict(),
        "param_schedulers": [scheduler.state_dict()],
    }
    torch.save(checkpoint, tmp_path / "iter_160000.pth")

    loaded = read_pth(tmp_path / "iter_160000.pth")

    for key, tensor in reference_t.state_dict().items():
        assert_bitwise_equal(loaded["state_dict"][key], tensor, key)
    for key, tensor in optimizer.state_dict()["state"][1].items():
        assert_bitwise_equal(loaded["optimizer"]["state"][1][key], tensor, key)
    history = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(history, OpaqueObject) and history.global_name == "mmengine.logging.history_buffer.HistoryBuffer"
    assert type(loaded["meta"]["lr"]) is np.float64 and loaded["meta"]["lr"] == 6e-5  # numpy values are rebuilt
    assert loaded["param_schedulers"][0]["end"] == 160000


def test_reads_numpy_arrays_saved_with_torch(tmp_path):
    """A state_dict of numpy arrays (not tensors) saved with torch.save: numpy's own pickling, read without numpy's
    reconstruction functions being called."""
    arrays = {
        "kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "scalar": np.int64(3),
        "names": np.array(["a"]),
    }
    torch.save(arrays, tmp_path / "numpy.pth")
    loaded = read_pth(tmp_path / "numpy.pth")
    assert type(loaded["kernel"]) is np.ndarray and np.array_equal(loaded["kernel"], arrays["kernel"])
    assert loaded["kernel"].dtype == np.float32 and loaded["kernel"].flags.writeable
    assert type(loaded["scalar"]) is np.int64 and loaded["scalar"] == 3
    assert isinstance(loaded["names"], OpaqueObject)  # strings: an inert record


class Payload:
    """Pickles as a call `fn(*args)`: what a malicious checkpoint runs on `torch.load(weights_only=False)`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize(
    "make_payload,refused",
    [
        (lambda marker: Payload(os.system, f"touch {marker}"), f"'{os.system.__module__}.system'"),
        (lambda marker: Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "'builtins.exec'"),
        (lambda marker: Payload(builtins.open, str(marker), "w"), f"'{builtins.open.__module__}.open'"),
        (
            lambda marker: Payload(getattr, collections.OrderedDict, "fromkeys"),
            "getattr(collections.OrderedDict, 'fromkeys')",
        ),
    ],
    ids=["os.system", "exec", "open", "getattr"],
)
def test_refuses_malicious_pickle_without_running_it(reference_t, tmp_path, make_payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    # The payload comes after the tensors, hidden in `meta`, as a doctored published checkpoint would have it.
    torch.save({"state_dict": reference_t.state_dict(), "meta": {"hook": make_payload(marker)}}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_pth(path)
    assert str(info.value).startswith(f"{path}: ") and refused in str(info.value)
    assert not marker.exists()


def zip_with_pickle(path, data_pkl: bytes) -> None:
    """A torch-style zip archive whose data.pkl is `data_pkl`."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/version", "3\n")


def test_refuses_pickle_altering_an_allowed_function(tmp_path):
    """BUILD on an allowed global (setting its attributes) is refused, so one file cannot change how the next loads."""
    state = pickle.dumps((None, {"__defaults__": (1,)}), protocol=2)[2:-1]  # the tuple's opcodes, no PROTO/STOP
    data = b"\x80\x02" + pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + state + pickle.BUILD + pickle.STOP
    zip_with_pickle(tmp_path / "build.pth", data)
    with pytest.raises(UnsafeCheckpointError, match="setting attribute '__defaults__'"):
        read_pth(tmp_path / "build.pth")


def test_refuses_a_whole_pickled_model(reference_t, tmp_path):
    torch.save(reference_t["backbone"], tmp_path / "model.pth")
    with pytest.raises(UnsafeCheckpointError, match="'mmseg.models.backbones.mscan.MSCAN'"):
        read_pth(tmp_path / "model.pth")


def test_truncated_and_corrupt_files(reference_t_file, tmp_path):
    data = Path(reference_t_file).read_bytes()
    for name, content in [("half.pth", data[: len(data) // 2]), ("tail_cut.pth", data[:-10])]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointFormatError, match=f"^{tmp_path / name}: .*truncated"):
            read_pth(tmp_path / name)
    with zipfile.ZipFile(reference_t_file) as zf:  # flip one byte inside the first tensor's data
        offset = zf.getinfo(next(n for n in zf.namelist() if n.endswith("/data/0"))).header_offset
    name_length, extra_length = struct.unpack("<HH", data[offset + 26 : offset + 30])  # from the local file header
    corrupt = bytearray(data)
    corrupt[offset + 30 + name_length + extra_length + 5] ^= 0xFF
    (tmp_path / "corrupt.pth").write_bytes(bytes(corrupt))
    with pytest.raises(CheckpointFormatError, match=r"corrupt.pth: corrupt or truncated checkpoint \(Bad CRC-32"):
        read_pth(tmp_path / "corrupt.pth")
    zip_with_pickle(tmp_path / "cut_pickle.pth", b"\x80\x02}q\x00(X")
    with pytest.raises(CheckpointFormatError, match="cut_pickle.pth: malformed pickle"):
        read_pth(tmp_path / "cut_pickle.pth")


def test_files_of_other_types(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    (tmp_path / "notes.txt").write_text("mscan_t weights are on the cloud drive\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.pth").write_bytes(np.random.RandomState(0).bytes(1000))
    for name in ("image.png", "notes.txt", "empty.pth", "random.pth"):
        with pytest.raises(CheckpointFormatError, match=f"^{tmp_path / name}: not a PyTorch checkpoint"):
            read_pth(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointFormatError, match="other.zip: a zip archive but not a torch.save checkpoint"):
        read_pth(tmp_path / "other.zip")


def test_legacy_format_says_how_to_resave(reference_t, tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save(reference_t.state_dict(), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match="legacy") as info:
        read_pth(legacy)
    assert str(legacy) in str(info.value) and "_use_new_zipfile_serialization=True" in str(info.value)
    resaved = tmp_path / "new.pth"  # the advice in the message works
    torch.save(torch.load(legacy, map_location="cpu"), resaved, _use_new_zipfile_serialization=True)
    assert_bitwise_equal(
        read_pth(resaved)["decode_head.conv_seg.weight"], reference_t.state_dict()["decode_head.conv_seg.weight"]
    )


def test_write_pth_loads_in_torch(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "float32": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "float64": rng.standard_normal(5),
        "float16": rng.standard_normal((2, 3)).astype(np.float16),
        "bfloat16": rng.standard_normal((3, 2)).astype("bfloat16"),
        "int64": np.array(160000, np.int64),
        "int32": rng.integers(-9, 9, (2, 2)).astype(np.int32),
        "int16": rng.integers(-9, 9, 3).astype(np.int16),
        "int8": rng.integers(-9, 9, 3).astype(np.int8),
        "uint8": rng.integers(0, 255, (2, 5)).astype(np.uint8),
        "bool": rng.random(4) > 0.5,
        "transposed": rng.standard_normal((3, 4)).astype(np.float32).T,
        "reversed": np.arange(6, dtype=np.float32)[::-1],
        "empty": np.zeros((0, 3), np.float32),
    }
    plain = {"n": 3, "big": 2**40, "neg": -7, "f": 0.5, "s": "ADE20K", "t": True, "none": None, "seq": [1, ("a", 2.5)]}
    tree = {"state_dict": arrays, "meta": plain}
    path = tmp_path / "written.pth"
    write_pth(tree, path)

    for loaded in (torch.load(path, weights_only=True), torch.load(path, mmap=True, weights_only=True)):
        assert list(loaded["state_dict"]) == list(arrays) and loaded["meta"] == plain
        for name, array in arrays.items():
            assert_bitwise_equal(array, loaded["state_dict"][name], name)
    again = read_pth(path)
    assert again["meta"] == plain
    for name, array in arrays.items():
        assert again["state_dict"][name].dtype == array.dtype and np.array_equal(again["state_dict"][name], array)


def test_write_pth_loads_into_mmseg_strictly(reference_t, reference_t_file, tmp_path):
    """read (torch-free) then write (torch-free): mmseg takes the file with strict key checking, same logits."""
    state = read_pth(reference_t_file)["state_dict"]
    write_pth(state, tmp_path / "exported.pth")
    target = reference_segmentor("t", 150, seed=2)
    target.load_state_dict(torch.load(tmp_path / "exported.pth"), strict=True)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    logits = []
    for model in (reference_t, target):
        torch.manual_seed(4)  # the NMF bases are drawn with torch.rand
        with torch.no_grad():
            logits.append(model["decode_head"](model["backbone"](images)))
    assert logits[0].shape == (1, 150, 8, 8) and torch.equal(logits[1], logits[0])


def test_write_pth_errors(tmp_path):
    path = tmp_path / "bad.pth"
    with pytest.raises(ValueError, match=f"cannot write {path}: state_dict.w: dtype uint16 has no PyTorch storage"):
        write_pth({"state_dict": {"w": np.zeros(2, np.uint16)}}, path)
    with pytest.raises(TypeError, match="cannot write .*: state_dict: key 3 is not a string"):
        write_pth({"state_dict": {3: np.zeros(2, np.float32)}}, path)
    with pytest.raises(TypeError, match=r"cannot write .*: meta.classes: cannot store a set"):
        write_pth({"meta": {"classes": {"wall"}}}, path)
    with pytest.raises(TypeError, match=r"cannot write .*: top level: cannot store a bytes"):
        write_pth(b"x", path)
