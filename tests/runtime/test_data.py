"""Data: byte tokenizer, loading text and token files, packing, and the resumable sampler."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orch.config import DataConfig
from orch.errors import OrchError
from orch.runtime import data as data_module
from orch.runtime.data import (
    BatchStream,
    ByteTokenizer,
    DataError,
    PackedSequences,
    load_tokens,
)

# --- tokenizer ---------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_including_non_ascii():
    tok = ByteTokenizer()
    text = "In the beginning — Ærø, 天地, 🙂\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.from_numpy(ids.astype(np.int64))) == text
    assert tok.vocab_size == 256


def test_byte_tokenizer_decodes_a_cut_character_with_replacement():
    ids = ByteTokenizer().encode("é")[:1]
    assert ByteTokenizer().decode(ids) == "\ufffd"


# --- loading -----------------------------------------------------------------------------------


def test_shipped_corpus_loads():
    tokens = load_tokens(DataConfig(), vocab_size=256)
    assert tokens.ndim == 1
    assert len(tokens) > 4_000_000
    assert int(tokens.max()) < 256
    assert ByteTokenizer().decode(tokens[:2000]).count("God") > 0


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz", "notes.md"])
def test_text_file_loads_as_bytes(tmp_path: Path, name: str):
    text = "hello wörld\n" * 10
    raw = text.encode("utf-8")
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    tokens = load_tokens(DataConfig(path=str(tmp_path / name)), vocab_size=256)
    assert tokens.tobytes() == raw


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_token_file_is_memory_mapped(tmp_path: Path, dtype: str):
    ids = np.arange(1000, dtype=dtype) * 7
    path = tmp_path / "train.bin"
    ids.tofile(path)
    tokens = load_tokens(DataConfig(path=str(path), token_dtype=dtype), vocab_size=7000)
    assert isinstance(tokens, np.memmap)
    assert tokens.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(tokens, ids)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_npy_token_file_is_memory_mapped(tmp_path: Path, dtype: str):
    ids = np.arange(1000, dtype=dtype)
    path = tmp_path / "train.npy"
    np.save(path, ids)
    tokens = load_tokens(DataConfig(path=str(path), format="tokens"), vocab_size=1000)
    assert isinstance(tokens, np.memmap)
    np.testing.assert_array_equal(tokens, ids)


def _error(data: DataConfig, vocab_size: int = 256) -> str:
    with pytest.raises(DataError) as info:
        load_tokens(data, vocab_size)
    assert isinstance(info.value, OrchError)
    return str(info.value)


def test_missing_file_names_field_value_and_fix(tmp_path: Path):
    path = str(tmp_path / "nope.txt")
    message = _error(DataConfig(path=path))
    assert message.startswith("data.path:")
    assert path in message and "does not exist" in message
    assert "fix:" in message and "''" in message


def test_directory_is_refused(tmp_path: Path):
    assert "is not a file" in _error(DataConfig(path=str(tmp_path)))


@pytest.mark.parametrize("name, content, said", [
    ("tokens.npz", b"PK\x03\x04", "is a .npz file: neither text nor token ids"),
    ("tokens.pt", b"PK\x03\x04", "is a .pt file"),
    ("random.dat", bytes(range(256)) * 4, "holds NUL bytes in its first 64 KiB: a binary file"),
    # compressed, the same was trained on; and numpy's own words for a file that is not .npy
    ("data.gz", gzip.compress(bytes(range(256)) * 4), "NUL bytes in its first 64 KiB "
                                                       "decompressed: a binary file"),
    ("tokens.npy", b"\x80\x04K\x01." * 20, "is not a .npy file (it does not start with NumPy"),
])
def test_a_file_that_is_neither_text_nor_token_ids_is_refused(tmp_path: Path, name: str,
                                                              content: bytes, said: str):
    """Each trained, its bytes read as if they were a corpus."""
    (tmp_path / name).write_bytes(content)
    message = _error(DataConfig(path=str(tmp_path / name)))
    assert message.startswith("data.path:") and said in message and "fix:" in message


@pytest.mark.parametrize("name", ["empty.txt", "empty.bin", "empty.npy"])
def test_empty_file(tmp_path: Path, name: str):
    (tmp_path / name).write_bytes(b"")
    message = _error(DataConfig(path=str(tmp_path / name)))
    assert message.startswith("data.path:") and name in message and "is empty" in message
    assert "fix:" in message


def test_bin_size_not_a_multiple_of_the_dtype(tmp_path: Path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03")
    message = _error(DataConfig(path=str(path), token_dtype="uint16"))
    assert message.startswith("data.path:") and "odd.bin" in message
    assert "5 bytes" in message and "uint16" in message
    assert "fix: set data.token_dtype" in message


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_at_or_above_vocab_size(tmp_path: Path, dtype: str, monkeypatch):
    monkeypatch.setattr(data_module, "_SCAN_CHUNK", 16)  # the bad id sits in the 4th chunk
    ids = np.zeros(100, dtype=dtype)
    ids[57] = 300
    path = tmp_path / "big.bin"
    ids.tofile(path)
    message = _error(DataConfig(path=str(path), token_dtype=dtype), vocab_size=300)
    assert message.startswith("model.vocab_size: 300")
    assert "big.bin" in message and "token id 300" in message
    assert "fix: set model.vocab_size to at least 301" in message


def test_text_needs_a_byte_vocabulary(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text("é")  # bytes 0xC3 0xA9
    message = _error(DataConfig(path=str(path)), vocab_size=128)
    assert "model.vocab_size: 128" in message and "at least 196" in message
    assert "text is read as bytes, 256 ids" in message and "token_dtype" not in message


def test_npy_must_be_a_flat_integer_array(tmp_path: Path):
    path = tmp_path / "f.npy"
    np.save(path, np.zeros((2, 3), dtype=np.float32))
    assert "1-D integer array" in _error(DataConfig(path=str(path)))
    np.save(path, np.array([1, -2, 3], dtype=np.int32))
    assert "negative token id -2" in _error(DataConfig(path=str(path)))


@pytest.mark.parametrize(
    ("name", "fmt", "expected"),
    [
        ("a.bin", "text", "data.format: 'text'"),
        ("a.npy", "text", "data.format: 'text'"),
        ("a.txt", "tokens", "data.format: 'tokens'"),
        ("a.bin.gz", "auto", "compressed token file"),
    ],
)
def test_format_and_suffix_must_agree(tmp_path: Path, name: str, fmt: str, expected: str):
    (tmp_path / name).write_bytes(b"\x00\x01")
    message = _error(DataConfig(path=str(tmp_path / name), format=fmt))  # type: ignore[arg-type]
    assert expected in message and name in message and "fix:" in message


# --- packing -----------------------------------------------------------------------------------


def test_packing_shapes_and_target_shift():
    tokens = np.arange(101, dtype=np.uint16)
    data = PackedSequences(tokens, seq_len=10)
    assert len(data) == 10
    inputs, targets = data[3]
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == list(range(30, 40))
    assert targets.tolist() == list(range(31, 41))
    inputs, targets = data.gather(np.array([9, 0]))
    assert inputs.shape == targets.shape == (2, 10)
    assert targets[0, -1].item() == 100  # the last sample ends on the last token
    assert len(PackedSequences(tokens[:100], seq_len=10)) == 9  # one short: no shifted target


def test_too_few_samples_for_a_global_batch():
    data = PackedSequences(np.arange(50, dtype=np.uint16), seq_len=8)  # 6 samples
    with pytest.raises(DataError) as info:
        BatchStream(data, global_batch=8, micro_batch=1)
    message = str(info.value)
    assert message.startswith("train.global_batch: 8")
    assert "at least 65 tokens" in message and "has 50" in message
    assert "fix:" in message and "train.seq_len" in message


def test_too_few_tokens_for_one_sample():
    with pytest.raises(DataError, match="fewer than one sample"):
        PackedSequences(np.arange(8, dtype=np.uint16), seq_len=8)


def test_global_batch_must_split_over_ranks_and_micro_batches():
    data = PackedSequences(np.arange(1001, dtype=np.uint16), seq_len=10)
    with pytest.raises(DataError, match="multiple of 6"):
        BatchStream(data, global_batch=8, micro_batch=2, dp_rank=0, dp_size=3)


# --- sampling ----------------------------------------------------------------------------------

SEQ = 4
SAMPLES = 103  # 12 full steps of 8, a tail of 7 dropped each epoch


def _dataset() -> PackedSequences:
    # Token i is i, so a sample's identity is its first input token / SEQ.
    return PackedSequences(np.arange(SAMPLES * SEQ + 1, dtype=np.uint32), SEQ)


def _stream(dp_rank: int = 0, dp_size: int = 1, seed: int = 0, micro: int = 2) -> BatchStream:
    return BatchStream(_dataset(), 8, micro, dp_rank=dp_rank, dp_size=dp_size, seed=seed)


def _ids(step: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """The sample ids of one rank's step, in order, after checking each micro-batch's shapes."""
    ids = []
    for inputs, targets in step:
        assert inputs.shape == targets.shape and inputs.shape[1] == SEQ
        torch.testing.assert_close(targets[:, :-1], inputs[:, 1:])
        ids += (inputs[:, 0] // SEQ).tolist()
    return ids


def _global(streams: list[BatchStream]) -> list[int]:
    """One step of all ranks' streams, concatenated in rank order."""
    return [i for s in streams for i in _ids(s.next_step())]


def test_micro_batch_count_and_shape():
    step = _stream(dp_rank=1, dp_size=2, micro=2).next_step()
    assert len(step) == 2  # 8 / (2 ranks x 2)
    assert all(inputs.shape == (2, SEQ) for inputs, _ in step)


def test_ranks_together_give_the_single_rank_global_batch_in_order():
    for dp_size, micro in [(2, 2), (4, 1), (8, 1), (2, 4)]:
        ranks = [_stream(r, dp_size, micro=micro) for r in range(dp_size)]
        reference = _stream(micro=1)
        for _ in range(3):
            expected = _ids(reference.next_step())
            assert len(expected) == 8
            assert _global(ranks) == expected


def test_seeds_differ_and_are_reproducible():
    assert _ids(_stream(seed=1).next_step()) == _ids(_stream(seed=1).next_step())
    assert _ids(_stream(seed=1).next_step()) != _ids(_stream(seed=2).next_step())


def test_epochs_reshuffle_without_repeats_and_drop_the_tail():
    stream = _stream()
    assert stream.steps_per_epoch == SAMPLES // 8
    epochs = [
        [i for _ in range(stream.steps_per_epoch) for i in _ids(stream.next_step())]
        for _ in range(2)
    ]
    for seen in epochs:
        assert len(seen) == len(set(seen)) == stream.steps_per_epoch * 8
        assert set(seen) <= set(range(SAMPLES))
    assert epochs[0] != epochs[1]
    assert stream.epoch == 2
    assert stream.tokens_seen == 2 * stream.steps_per_epoch * 8 * SEQ


def test_resume_continues_identically():
    uninterrupted = _stream(seed=5)
    expected = [_ids(uninterrupted.next_step()) for _ in range(12)][7:]
    first = _stream(seed=5)
    for _ in range(7):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"epoch": 0, "step_in_epoch": 7, "seed": 5, "global_batch": 8, "samples": 103}
    resumed = _stream(seed=5)
    resumed.load_state_dict(state)
    assert resumed.tokens_seen == first.tokens_seen == 7 * 8 * SEQ
    # The 5 steps cross the epoch boundary (12 steps per epoch), so the reshuffle resumes too.
    assert [_ids(resumed.next_step()) for _ in range(5)] == expected


def test_resume_onto_a_different_dp_size_keeps_the_global_order():
    single = _stream(micro=1)
    for _ in range(7):
        single.next_step()
    state = single.state_dict()
    ranks = [_stream(r, 4, micro=1) for r in range(4)]
    for stream in ranks:
        stream.load_state_dict(state)
        assert stream.state_dict() == state  # the same position on every rank
    for _ in range(6):
        assert _global(ranks) == _ids(single.next_step())


def test_resume_refuses_a_changed_global_batch_seed_or_data():
    state = _stream().state_dict()
    other = BatchStream(_dataset(), 4, 1)
    with pytest.raises(DataError) as info:
        other.load_state_dict(state)
    message = str(info.value)
    assert message.startswith("train.global_batch: 4") and "trained with 8" in message
    assert "fix: set train.global_batch back to 8" in message
    with pytest.raises(DataError, match="train.seed: 3"):
        _stream(seed=3).load_state_dict(state)
    shorter = PackedSequences(np.arange(50 * SEQ + 1, dtype=np.uint32), SEQ)
    with pytest.raises(DataError, match="checkpoint's had 103"):
        BatchStream(shorter, 8, 2).load_state_dict(state)


def test_the_data_files_identity_tells_other_contents_apart(tmp_path: Path, monkeypatch):
    """Saved with every checkpoint and compared on resume: the size and a sha256 of pieces
    spread over the file (here 4 pieces of 16 bytes, so the file is sampled, not read whole)."""
    from orch.runtime.data import source_change, source_identity

    monkeypatch.setattr(data_module, "_SAMPLE_BYTES", 16)
    monkeypatch.setattr(data_module, "_SAMPLES", 4)
    path = tmp_path / "corpus.txt"
    text = bytearray(b"abcdefgh" * 100)
    path.write_bytes(text)
    data = DataConfig(path=str(path))
    saved = source_identity(data)
    assert saved["bytes"] == 800 and source_change(saved, source_identity(data), data) is None
    assert source_change(None, saved, data) is None  # a checkpoint from before: not checked
    text[800 - 16] = ord("X")  # inside the last piece
    path.write_bytes(text)
    changed = source_change(saved, source_identity(data), data)
    assert changed is not None and "the same size, 800 bytes, but other contents" in str(changed)
    path.write_bytes(bytes(text) + b"more")
    assert "800 bytes then, 804 now" in str(source_change(saved, source_identity(data), data))
    corpus = source_identity(DataConfig())  # the shipped corpus has one too
    assert corpus["bytes"] > 1e6 and len(corpus["sampled_sha256"]) == 64


def test_a_binary_gz_is_refused_before_start(tmp_path: Path):
    """The launcher's check (``check_source``) looked inside uncompressed text only: a binary
    .gz passed it and failed in every worker."""
    from orch.runtime.data import check_source

    path = tmp_path / "data.gz"
    path.write_bytes(gzip.compress(bytes(range(256)) * 4))
    with pytest.raises(DataError, match="decompressed: a binary file"):
        check_source(DataConfig(path=str(path)))
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="is not a valid gzip file"):
        check_source(DataConfig(path=str(path)))


def test_a_small_or_empty_gz_corpus_is_counted_before_start(tmp_path: Path):
    """A gzip corpus's size was unknown to the launcher (None), so one that decompresses to
    nothing, or to less than one global batch, failed in every worker after torchrun started;
    what decompresses within the bytes ``check_source`` reads is its whole size."""
    from orch.runtime.data import _SNIFF_BYTES, check_source, token_count

    path = tmp_path / "data.txt.gz"
    path.write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match="decompresses to nothing"):
        check_source(DataConfig(path=str(path)))
    path.write_bytes(gzip.compress(b"hello world " * 50))
    assert token_count(DataConfig(path=str(path))) == 600
    path.write_bytes(gzip.compress(b"x" * _SNIFF_BYTES))
    assert token_count(DataConfig(path=str(path))) == _SNIFF_BYTES
    path.write_bytes(gzip.compress(b"x" * (_SNIFF_BYTES + 1)))
    assert token_count(DataConfig(path=str(path))) is None  # only reading it all would tell


def test_loading_a_gz_corpus_reads_its_head_once(tmp_path: Path, monkeypatch):
    """The id check ran the file checks again: a second gzip open and decompression of the
    head of every text corpus each load."""
    path = tmp_path / "c.txt.gz"
    path.write_bytes(gzip.compress(b"some text\n" * 100))
    heads = []
    real = data_module._text_head
    monkeypatch.setattr(data_module, "_text_head", lambda *a: heads.append(1) or real(*a))
    assert len(load_tokens(DataConfig(path=str(path)), 256)) == 1000
    assert len(heads) == 1
