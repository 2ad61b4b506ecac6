"""JSeg (Jittor) `.pkl` checkpoints: read without Jittor and without running pickled code, converted to the same model
as the equivalent `.pth` (and so the same logits as mmseg), and malicious pickles refused with nothing run.

Jittor's `jt.save` (`safepickle`) writes `pickle.dumps(obj, 4)` of a dict whose tensors are numpy arrays, followed by
the pickle's SHA-1 digest and b'HCAJSLHD'; JSeg's runner saves {'meta', 'model', 'scheduler', 'optimizer'} with the
official SegNeXt key naming. Files here are made the same way with numpy and pickle alone."""

import builtins
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from flax import nnx
from test_conversion import NUM_CLASSES, assert_same_logits, numpy_state_dict, weights
from test_layouts import official_naming, reference_segmentor

from segnext_jax import checkpoints, models
from segnext_jax.serving.pth_io import read_checkpoint, read_pickle
from weights_conversion import CheckpointFormatError, UnsafeCheckpointError, load_pytorch_checkpoint
from weights_conversion.__main__ import main

JITTOR_MARKER = b"HCAJSLHD"


def jittor_save(obj, path, protocol: int = 4) -> str:
    """What `jt.save(obj, path)` writes for a tree of numpy arrays (protocol 4 in every Jittor version)."""
    data = pickle.dumps(obj, protocol)
    path.write_bytes(data + hashlib.sha1(data).digest() + JITTOR_MARKER)
    return str(path)


def plain_save(obj, path, protocol: int) -> str:
    path.write_bytes(pickle.dumps(obj, protocol))
    return str(path)


def jseg_checkpoint(state: dict[str, np.ndarray]) -> dict:
    """JSeg's Runner.save layout around a numpy state_dict in the official naming (no num_batches_tracked)."""
    model = {k: v for k, v in official_naming(state).items() if not k.endswith("num_batches_tracked")}
    meta = {"jseg_version": "0.1.0", "epoch": 0, "iter": 160000, "max_iter": 160000, "max_epoch": None}
    meta.update(save_time="2023-02-01 10:00:00", config="model:\n  type: EncoderDecoder\n")
    optimizer = {"lr": 6e-05, "param_groups": [{"lr": np.float32(6e-05), "values": [np.zeros((2, 3), np.float32)]}]}
    scheduler = {"max_steps": 160000, "power": np.float64(1.0), "warmup_ratio": 1e-06}
    return {"meta": meta, "model": model, "scheduler": scheduler, "optimizer": optimizer}


@pytest.fixture(scope="module")
def reference():
    return reference_segmentor("t", NUM_CLASSES, seed=1)


@pytest.fixture(scope="module")
def pth_weights(reference, tmp_path_factory) -> dict[str, np.ndarray]:
    """The model converted from the equivalent .pth, as an mmseg state_dict (no num_batches_tracked)."""
    path = tmp_path_factory.mktemp("pth") / "segnext_t.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    return weights(load_pytorch_checkpoint(path))


@pytest.fixture(scope="module")
def model_t():
    """One SegNeXt-T that each parametrised case fills (every tensor is replaced)."""
    return models.create("t", NUM_CLASSES, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "save,protocol,wrap",
    [
        (jittor_save, 4, jseg_checkpoint),  # jt.save of JSeg's Runner.save
        (jittor_save, 2, lambda sd: {"state_dict": official_naming(sd)}),
        (plain_save, 2, official_naming),  # a bare state_dict, pickled without Jittor's checksum
        (plain_save, pickle.HIGHEST_PROTOCOL, jseg_checkpoint),  # numpy arrays by _frombuffer, not _reconstruct
    ],
    ids=["jittor-4", "jittor-2-state_dict", "plain-2-bare", "plain-highest"],
)
def test_pkl_converts_like_the_equivalent_pth(reference, pth_weights, model_t, tmp_path, save, protocol, wrap):
    pkl = save(wrap(numpy_state_dict(reference)), tmp_path / "segnext_t.pkl", protocol)
    from_pkl = weights(load_pytorch_checkpoint(pkl, model_t))
    expected = {k: v for k, v in numpy_state_dict(reference).items() if not k.endswith("num_batches_tracked")}
    assert from_pkl.keys() == pth_weights.keys() == expected.keys()
    for key, value in expected.items():
        assert from_pkl[key].dtype == value.dtype and np.array_equal(from_pkl[key], value), key
        assert np.array_equal(from_pkl[key], pth_weights[key]), key


def test_command_line_converts_a_jseg_pkl_to_mmseg_logits(reference, pth_weights, tmp_path, capsys):
    pkl = jittor_save(jseg_checkpoint(numpy_state_dict(reference)), tmp_path / "segnext_t.pkl")
    assert main([pkl, str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{pkl}: SegNeXt-T, {NUM_CLASSES} classes; {len(pth_weights)} tensors converted -> ")
    model = checkpoints.restore_model(str(tmp_path / "model"))
    images = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
    assert_same_logits(model, reference, images, "t")


def test_reads_jittor_metadata_and_numpy_values(tmp_path):
    """Arrays of every plain dtype and order, scalars; arrays of strings stay inert records."""
    arrays = {
        "float16": np.arange(6, dtype=np.float16).reshape(2, 3),
        "float64_fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "int32_big_endian": np.arange(4, dtype=">i4"),
        "bool": np.array([True, False]),
        "uint8": np.arange(5, dtype=np.uint8),
        "empty": np.zeros((0, 3), np.float32),
        "zero_d": np.array(2.5, np.float32),
    }
    tree = {
        "arrays": arrays,
        "scalar": np.int64(7),
        "strings": np.array(["wall", "sky"]),
        "shared": [arrays["bool"]] * 2,
    }
    for protocol in (2, 4, 5):
        loaded = read_checkpoint(jittor_save(tree, tmp_path / f"p{protocol}.pkl", protocol))
        for name, array in arrays.items():
            value = loaded["arrays"][name]
            assert type(value) is np.ndarray and value.dtype == array.dtype.newbyteorder("="), (protocol, name)
            assert value.shape == array.shape and np.array_equal(value, array), (protocol, name)
        assert type(loaded["scalar"]) is np.int64 and loaded["scalar"] == 7
        assert type(loaded["strings"]).__name__ == "OpaqueObject"
        assert loaded["shared"][0] is loaded["shared"][1]


def test_damaged_pkl_files(reference, tmp_path):
    pkl = tmp_path / "segnext_t.pkl"
    jittor_save(jseg_checkpoint(numpy_state_dict(reference)), pkl)
    data = bytearray(pkl.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.pkl").write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=r"flipped.pkl: corrupt Jittor checkpoint \(its SHA-1"):
        read_pickle(tmp_path / "flipped.pkl")
    (tmp_path / "cut.pkl").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointFormatError, match="cut.pkl: malformed pickle"):
        read_checkpoint(tmp_path / "cut.pkl")
    plain_save({"w": WrongSize()}, tmp_path / "sizes.pkl", 4)
    with pytest.raises(CheckpointFormatError, match=r"shape \(3,\) and dtype float64 has 17 bytes, expected 24"):
        read_checkpoint(tmp_path / "sizes.pkl")


class WrongSize:
    """Pickles as numpy pickles an array, but with 17 bytes for a (3,) float64 array."""

    def __reduce__(self):
        reconstruct, args, (version, _, _, fortran, _) = np.zeros(3).__reduce__()
        return reconstruct, args, (version, (3,), np.dtype("f8"), fortran, b"\0" * 17)


class Payload:
    """Pickles as a call `fn(*args)`: what a malicious checkpoint runs on a plain `pickle.load` / `jt.load`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def numpy_load_payload(marker, folder):
    """numpy.load(evil.npy, None, True): unpickles an object array whose element runs `touch marker`."""
    evil = str(folder / "evil.npy")
    np.save(evil, np.array([Payload(os.system, f"touch {marker}"), None], dtype=object), allow_pickle=True)
    return Payload(np.load, evil, None, True)


@pytest.mark.parametrize(
    "make_payload,refused",
    [
        (lambda marker, folder: Payload(os.system, f"touch {marker}"), f"'{os.system.__module__}.system'"),
        (lambda marker, folder: Payload(builtins.eval, f"open({str(marker)!r}, 'w')"), "'builtins.eval'"),
        (numpy_load_payload, "'numpy.load'"),
        (lambda marker, folder: Payload(bytes, 10**12), "builtins.bytes(1000000000000,) is not allowed"),
    ],
    ids=["os.system", "eval", "numpy.load", "huge-bytes"],
)
@pytest.mark.parametrize("protocol", [2, 4])
def test_refuses_malicious_pkl_without_running_it(reference, tmp_path, make_payload, refused, protocol):
    marker = tmp_path / "pwned"
    checkpoint = jseg_checkpoint(numpy_state_dict(reference))
    checkpoint["meta"]["hook"] = make_payload(marker, tmp_path)  # after the tensors, as in a doctored checkpoint
    pkl = jittor_save(checkpoint, tmp_path / "evil.pkl", protocol)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(pkl)
    assert str(info.value).startswith(f"{pkl}: ") and refused in str(info.value)
    assert main([pkl, str(tmp_path / "model")]) == 1
    assert not marker.exists() and not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "make_payload", [lambda marker, folder: Payload(os.system, f"touch {marker}"), numpy_load_payload]
)
def test_the_payloads_are_real(tmp_path, make_payload):
    """What the reader refuses above is what pickle itself (and so `jt.load`) runs."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps({"meta": {"hook": make_payload(marker, tmp_path)}}, 4))
    assert marker.exists()
