"""MindSpore .ckpt files without MindSpore: our reader against mindspore.load_checkpoint's view of files MindSpore
wrote (tests/fixtures/mindspore, made by make_fixtures.py), our writer byte for byte against save_checkpoint."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from qwen15.mindspore import protobuf as pb
from qwen15.mindspore.ckpt import CkptError, CkptFile, CkptWriter
from qwen15.mindspore.dtypes import convert, f32_to_bf16

FIX = Path(__file__).parent / "fixtures" / "mindspore"
META = json.loads((FIX / "expected.json").read_text())
ARRAYS = np.load(FIX / "expected.npz")
CKPTS = sorted(META["checkpoints"])
SLICED = {"sliced_fp32.ckpt", "sliced_fp16_crc.ckpt"}  # saved with MindSpore's SLICE_SIZE set to 1 KiB


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("rel", CKPTS)
def test_reader_gives_mindspores_tensors_bit_for_bit(rel):
    expected = META["checkpoints"][rel]
    with CkptFile(FIX / rel) as f:
        assert set(f.tensors) | set(f.strings) == set(expected)
        for name, e in expected.items():
            if "string" in e:
                assert f.strings[name] == e["string"]
                continue
            t = f.tensors[name]
            assert (t.dtype, list(t.shape)) == (e["dtype"], e["shape"])
            assert same_bits(t.read(), ARRAYS[e["key"]]), name
            if t.rows > 2:  # rows read across slice boundaries
                assert same_bits(t.read_rows(1, t.rows - 1), ARRAYS[e["key"]][1:-1]), name
        assert f.has_crc == rel.endswith("crc.ckpt")
        if rel in SLICED:
            assert max(len(t.pieces) for t in f.tensors.values()) >= 4


@pytest.mark.parametrize("rel", CKPTS)
def test_writer_output_is_byte_identical_to_save_checkpoint(rel, tmp_path):
    """Rewriting MindSpore's tensors with our writer (same slice size, same CRC choice) gives the same file."""
    expected = META["checkpoints"][rel]
    if any("string" in e for e in expected.values()):
        pytest.skip("append_dict strings are not written by qwen15")
    out = tmp_path / "ours.ckpt"
    with CkptWriter(out, crc=rel.endswith("crc.ckpt"), slice_bytes=1024 if rel in SLICED else 512 << 20) as w:
        for name in META["order"][rel]:
            e = expected[name]
            w.add(name, e["dtype"], tuple(e["shape"]), [ARRAYS[e["key"]]])
    assert out.read_bytes() == (FIX / rel).read_bytes()


def test_writer_streams_blocks_across_slices(tmp_path):
    data = np.arange(3000, dtype=np.float32).reshape(100, 30)
    with CkptWriter(tmp_path / "a.ckpt", slice_bytes=1000) as w:
        w.add("w", "float32", data.shape, [data[:7], data[7:8], data[8:]])
    with CkptFile(tmp_path / "a.ckpt") as f:
        assert len(f.tensors["w"].pieces) == 12
        assert same_bits(f.tensors["w"].read(), data)
        assert same_bits(f.tensors["w"].read_rows(33, 67), data[33:67])


def test_bfloat16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 1e3
    x[:4] = [np.inf, -np.inf, np.nan, 0.0]
    ours = f32_to_bf16(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours[3:], ref[3:]) and np.array_equal(ours[:2], ref[:2])  # NaN bits may differ
    wide = convert(ours, "bfloat16", "float32")
    assert np.isnan(wide[2]) and np.array_equal(wide[3:], torch.from_numpy(ref[3:].view(np.int16)).view(
        torch.bfloat16).float().numpy())  # fmt: skip


# ------------------------------------------------------------------------------------------- bad input


def test_truncated_file_names_the_tensor(tmp_path):
    src = (FIX / "tied_fp16.ckpt").read_bytes()
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(CkptError, match=r"cut\.ckpt: tensor '.+' is cut off .*truncated"):
        CkptFile(bad)


def test_bad_crc_is_refused(tmp_path):
    data = bytearray((FIX / "train_bf16_crc.ckpt").read_bytes())
    data[200] ^= 0xFF  # a payload byte
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CkptError, match=r"flipped\.ckpt: CRC check failed .*damaged"):
        CkptFile(bad)


def test_encrypted_file_says_so():
    with pytest.raises(CkptError, match=r"encrypted.ckpt: an encrypted MindSpore checkpoint .*dec_key"):
        CkptFile(FIX / "encrypted.ckpt")


@pytest.mark.parametrize("content", [b"\x08\x96\x01 not a checkpoint", b"", b"PK\x03\x04zip"])
def test_non_checkpoint_file(tmp_path, content):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(content)
    with pytest.raises(CkptError, match=r"x\.ckpt: not a MindSpore checkpoint"):
        CkptFile(bad)


def test_a_safetensors_file_is_not_a_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(3, np.float32)}, str(tmp_path / "model.ckpt"))
    with pytest.raises(CkptError, match="not a MindSpore checkpoint"):
        CkptFile(tmp_path / "model.ckpt")


def test_unknown_tensor_type_names_it(tmp_path):
    tensor = (
        pb.key(1, 0)
        + pb.encode_varint(2)
        + pb.length_delimited(2, b"Complex64")
        + pb.length_delimited(3, b"\0" * 16)
    )
    value = pb.length_delimited(1, b"weird") + pb.length_delimited(2, tensor)
    (tmp_path / "t.ckpt").write_bytes(pb.length_delimited(1, value))
    with pytest.raises(CkptError, match=r"t\.ckpt: tensor 'weird' has tensor_type 'Complex64'"):
        CkptFile(tmp_path / "t.ckpt")


def test_crc_trailer_is_mindspores(tmp_path):
    """The trailer is b'crc_num' + CRC-32 of the bytes before it, 10 bytes big-endian (serialization.py)."""
    body = (FIX / "sliced_fp16_crc.ckpt").read_bytes()
    assert body[-17:-10] == b"crc_num"
    assert int.from_bytes(body[-10:], "big") == zlib.crc32(body[:-17])


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(ValueError), CkptWriter(tmp_path / "a.ckpt") as w:
        w.add("w", "float32", (4,), [np.zeros(3, np.float32)])
    assert list(tmp_path.iterdir()) == []
    shutil.rmtree(tmp_path)
