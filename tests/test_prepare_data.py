"""``orch data prepare``: documents to the token file training reads, against the tokenizer's own
encoding of each document; refusals before anything is written."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from orch import prepare_data
from orch.cli import main
from orch.config.schema import DataConfig
from orch.runtime.data import load_tokens

DOCS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs",
        "How vexingly quick daft zebras jump!\nSphinx of black quartz, judge my vow."]
REPO = Path(__file__).resolve().parents[1]
TEXT = "In the beginning was the word.\nAnd the word was with the dog, the fox and the box.\n"


def bpe_dir(tmp_path: Path, eos: str | None = "</s>") -> Path:
    """A small BPE tokenizer trained here (nothing downloaded), saved as a HuggingFace model
    directory keeps it: tokenizer.json, and tokenizer_config.json naming ``eos``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(DOCS + [TEXT] * 3, trainer)
    out = tmp_path / "model"
    out.mkdir()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({} if eos is None else
                                                          {"eos_token": {"content": eos}}))
    return out


def write_inputs(tmp_path: Path) -> list[str]:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "text": d}) for i, d in enumerate(DOCS))
                     + "\n\n")
    text = tmp_path / "book.txt.gz"
    text.write_bytes(gzip.compress(TEXT.encode()))
    return [str(jsonl), str(text)]


def test_each_document_is_the_tokenizers_encoding_then_the_eos_id(tmp_path, capsys):
    model = bpe_dir(tmp_path)
    out = tmp_path / "train.bin"
    assert main(["data", "prepare", *write_inputs(tmp_path), "--tokenizer", str(model),
                 "--out", str(out)]) == 0
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    eos = tokenizer.token_to_id("</s>")
    expected = [i for doc in [*DOCS, TEXT]
                for i in [*tokenizer.encode(doc, add_special_tokens=False).ids, eos]]
    written = np.fromfile(out, dtype=np.uint16)
    assert written.tolist() == expected
    said = capsys.readouterr().out
    assert f"{len(expected):,} tokens of 4 documents (uint16, vocabulary 300)" in said
    assert f"data.path={out} data.eos_id={eos} (model.vocab_size at least 300; train.idx " \
        "beside it" in said
    assert f"--data-path {tmp_path / 'train'})" in said
    # what the trainer reads back from it, as the printed settings say
    read = load_tokens(DataConfig(path=str(out), token_dtype="uint16"), vocab_size=300)
    assert read.tolist() == expected


def test_a_text_file_read_in_pieces_loses_and_repeats_nothing(tmp_path, monkeypatch):
    """Pieces shorter than a line, and than the file: the byte tokenizer's ids are the file's
    bytes, so the output must be exactly those."""
    monkeypatch.setattr(prepare_data, "PIECE_CHARS", 7)
    text = tmp_path / "t.txt"
    body = "short\na line much longer than one piece of seven\n\nlast line without newline"
    text.write_text(body)
    out = tmp_path / "t.bin"
    assert main(["data", "prepare", str(text), "--tokenizer", "byte", "--out", str(out)]) == 0
    assert np.fromfile(out, dtype=np.uint16).tobytes() == np.frombuffer(
        body.encode(), dtype=np.uint8).astype(np.uint16).tobytes()
    # a file that fits in one piece is one piece, its last line too (a tokenizer that marks a
    # text's start, as Llama 2's does, marked that line's as well)
    monkeypatch.setattr(prepare_data, "PIECE_CHARS", 1000)
    assert list(prepare_data._text_pieces(text)) == [body]
    # a line longer than a piece is cut before a space (it went to the tokenizer whole)
    monkeypatch.setattr(prepare_data, "PIECE_CHARS", 16)
    text.write_text(" ".join(f"word{i}" for i in range(40)))
    pieces = list(prepare_data._text_pieces(text))
    assert "".join(pieces) == text.read_text() and max(map(len, pieces)) < 40
    assert all(piece.startswith(" ") for piece in pieces[1:])


def test_an_index_is_no_input_and_megatrons_stale_cache_is_pointed_out(tmp_path, capsys):
    (tmp_path / "x.idx").write_bytes(b"MMIDIDX\0\0")
    assert main(["data", "prepare", str(tmp_path / "x.idx"), "--tokenizer", "byte", "--out",
                 str(tmp_path / "o.bin")]) == 2
    assert "x.idx: is a .idx file, not text or JSON lines" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("text")
    (tmp_path / "o" / "cache").mkdir(parents=True)  # Megatron's, for an earlier o.{bin,idx}
    assert main(["data", "prepare", str(tmp_path / "t.txt"), "--tokenizer", "byte", "--out",
                 str(tmp_path / "o.bin"), "--force"]) == 0
    assert f"note: {tmp_path / 'o' / 'cache'} holds Megatron's sample indices" in (
        capsys.readouterr().out)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, as megatron imports
def test_a_document_longer_than_an_index_sequence_is_split_in_order(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from orch.runtime import indexed

    monkeypatch.setattr(indexed, "SEQUENCE_MAX", 4)
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"text": "abcdefghij"}) + "\n" + json.dumps({"text": "xy"}) + "\n")
    assert main(["data", "prepare", str(docs), "--tokenizer", "byte", "--out",
                 str(tmp_path / "d.bin")]) == 0
    megatron = IndexedDataset(str(tmp_path / "d"))
    assert [len(megatron[i]) for i in range(len(megatron))] == [4, 4, 2, 2]
    assert megatron.document_indices.tolist() == [0, 3, 4]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, as megatron imports
def test_megatron_reads_the_pair_with_each_document_where_it_was(tmp_path, monkeypatch):
    """The .idx is Megatron's: its own reader (megatron-core's IndexedDataset, the reference)
    finds the ids and the document boundaries, a text file cut into pieces being one document
    of several sequences."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    monkeypatch.setattr(prepare_data, "PIECE_CHARS", 40)
    model = bpe_dir(tmp_path)
    out = tmp_path / "train.bin"
    assert main(["data", "prepare", *write_inputs(tmp_path), "--tokenizer", str(model),
                 "--out", str(out)]) == 0
    megatron = IndexedDataset(str(tmp_path / "train"))
    pieces = [megatron[i] for i in range(len(megatron))]
    assert np.concatenate(pieces).tolist() == np.fromfile(out, dtype=np.uint16).tolist()
    # one sequence per document, the text file's too though tokenized in pieces: Megatron's
    # GPTDataset shuffles sequences, and trained the pieces of one document out of order
    assert megatron.document_indices.tolist() == [0, 1, 2, 3, 4] and len(megatron) == 4
    eos = Tokenizer.from_file(str(model / "tokenizer.json")).token_to_id("</s>")
    assert [piece[-1] for piece in pieces] == [eos] * 4
    assert len(pieces[3]) > prepare_data.PIECE_CHARS // 4  # more than one piece's ids
    assert megatron.index.dtype == np.uint16
    # --force replaces the pair: the byte tokenizer's index is the new one
    assert main(["data", "prepare", str(tmp_path / "book.txt.gz"), "--tokenizer", "byte",
                 "--out", str(out), "--force"]) == 0
    assert IndexedDataset(str(tmp_path / "train")).document_indices.tolist() == [0, 1]


def test_the_byte_tokenizer_ends_documents_with_a_byte_given_as_eos(tmp_path, capsys):
    """Without it byte-level documents ran into each other, and train.document_mask had no
    data.eos_id to split them by."""
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    out = tmp_path / "d.bin"
    assert main(["data", "prepare", str(docs), "--tokenizer", "byte", "--eos", "0", "--out",
                 str(out)]) == 0
    assert np.fromfile(out, dtype=np.uint16).tolist() == [97, 98, 0, 99, 0]
    assert "data.eos_id=0" in capsys.readouterr().out
    assert main(["data", "prepare", str(docs), "--tokenizer", "byte", "--eos", "</s>", "--out",
                 str(tmp_path / "e.bin")]) == 2
    assert "--eos: '</s>', but the byte tokenizer's ids are the bytes 0-255" in (
        capsys.readouterr().err)


def test_a_vocabulary_over_65536_is_written_as_int32(tmp_path):
    words = {f"w{i}": i for i in range(70_000)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"body": "w3 w69999 w65536"}) + "\n")
    out = tmp_path / "d.bin"
    assert main(["data", "prepare", str(docs), "--tokenizer", str(path), "--key", "body",
                 "--eos", "w1", "--out", str(out)]) == 0
    assert np.fromfile(out, dtype=np.int32).tolist() == [3, 69999, 65536, 1]
    # read with the index's type, whatever data.token_dtype says (no uint32 in Megatron's index)
    read = load_tokens(DataConfig(path=str(out), token_dtype="uint16"), vocab_size=70_000)
    assert read.dtype == np.int32 and read.tolist() == [3, 69999, 65536, 1]


def test_every_bad_argument_is_named_together_and_nothing_is_written(tmp_path, capsys):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    (tmp_path / "x.json").write_text("[]")
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"saved")
    kept.with_suffix(".idx").write_bytes(b"index")
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), str(tmp_path / "x.parquet"),
                 str(tmp_path / "x.json"), "--tokenizer", str(tmp_path), "--out",
                 str(kept)]) == 2
    err = capsys.readouterr().err
    assert "cannot prepare the data (6 problems)" in err
    assert f"--out: '{kept.with_suffix('.idx')}' exists" in err
    assert kept.with_suffix(".idx").read_bytes() == b"index"
    assert f"{tmp_path / 'missing.txt'}: does not exist" in err
    assert "x.parquet: is a .parquet file, not text or JSON lines" in err
    assert "x.json: is a .json file" in err and "one {\"text\": ...} object per line" in err
    assert f"--out: '{kept}' exists" in err and "pass --force" in err
    assert "--tokenizer" in err and "no tokenizer.json there" in err
    assert kept.read_bytes() == b"saved"
    assert main(["data", "prepare", str(tmp_path / "x.json"), "--tokenizer", "byte", "--out",
                 str(tmp_path / "no" / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "x.npy' does not end in .bin" in err and "does not exist\n" in err
    (tmp_path / "dir.bin").mkdir()
    assert main(["data", "prepare", str(tmp_path / "x.json"), "--tokenizer", "byte", "--out",
                 str(tmp_path / "dir.bin"), "--force"]) == 2
    assert f"--out: '{tmp_path / 'dir.bin'}' exists and is not a file" in capsys.readouterr().err


def test_a_bad_line_stops_the_run_leaving_the_old_file_and_no_partial_one(tmp_path, capsys):
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "typo"}) + "\n")
    out = tmp_path / "d.bin"
    out.write_bytes(b"earlier")
    assert main(["data", "prepare", str(docs), "--tokenizer", "byte", "--out", str(out),
                 "--force"]) == 2
    err = capsys.readouterr().err
    assert f"{docs}:2: no field 'text' (holds ['txt'])" in err
    assert "--key" in err
    assert out.read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.jsonl"]
    docs.write_text("{not json\n")
    assert main(["data", "prepare", str(docs), "--tokenizer", "byte", "--out",
                 str(tmp_path / "e.bin")]) == 2
    assert f"{docs}:1: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "e.bin").exists()


@pytest.mark.parametrize(("eos", "args", "said"), [
    (None, [], "names no eos_token"),
    ("</s>", ["--eos", "<end>"], "'<end>' is not a token of"),
])
def test_an_end_of_document_token_that_cannot_be_found_is_refused(tmp_path, capsys, eos, args,
                                                                   said):
    model = bpe_dir(tmp_path, eos)
    docs = write_inputs(tmp_path)
    assert main(["data", "prepare", *docs, "--tokenizer", str(model), *args, "--out",
                 str(tmp_path / "o.bin")]) == 2
    err = capsys.readouterr().err
    assert said in err and "--no-eos" in err
    assert main(["data", "prepare", *docs, "--tokenizer", str(model), "--no-eos", "--out",
                 str(tmp_path / "o.bin")]) == 0
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert np.fromfile(tmp_path / "o.bin", dtype=np.uint16).tolist() == [
        i for doc in [*DOCS, TEXT] for i in tokenizer.encode(doc, add_special_tokens=False).ids]


def test_a_file_that_is_not_utf8_or_a_damaged_gz_is_named(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(b"x" * 1000)[:20])
    for name, said in [("latin1.txt", "is not UTF-8 text"), ("cut.txt.gz", "cannot be read")]:
        assert main(["data", "prepare", str(tmp_path / name), "--tokenizer", "byte", "--out",
                     str(tmp_path / "o.bin")]) == 2
        assert f"{tmp_path / name}: {said}" in capsys.readouterr().err
        assert not (tmp_path / "o.bin").exists()


def test_line_ends_are_kept_as_written_and_a_byte_order_mark_dropped(tmp_path):
    """Universal newlines turned every \\r\\n and lone \\r into \\n: the byte tokenizer's ids
    then differed from training on the text file itself."""
    text = tmp_path / "crlf.txt"
    body = b"line1\r\nline2\r\nlone\rcr\r\n"
    text.write_bytes(b"\xef\xbb\xbf" + body)
    out = tmp_path / "crlf.bin"
    assert main(["data", "prepare", str(text), "--tokenizer", "byte", "--out", str(out)]) == 0
    assert np.fromfile(out, dtype=np.uint16).astype(np.uint8).tobytes() == body
    docs = tmp_path / "bom.jsonl"
    docs.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a"}).encode() + b"\r\n")
    assert main(["data", "prepare", str(docs), "--tokenizer", "byte", "--out",
                 str(tmp_path / "bom.bin")]) == 0


def test_messages_name_a_field_of_another_type_and_a_missing_tokenizer_config(tmp_path, capsys):
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"text": 5}) + "\n")
    assert main(["data", "prepare", str(docs), "--tokenizer", "byte", "--out",
                 str(tmp_path / "d.bin")]) == 2
    assert f"{docs}:1: its field 'text' is int, not a string" in capsys.readouterr().err
    model = bpe_dir(tmp_path)
    (model / "tokenizer_config.json").unlink()
    assert main(["data", "prepare", str(docs), "--tokenizer", str(model), "--out",
                 str(tmp_path / "d.bin")]) == 2
    assert "no tokenizer_config.json beside" in capsys.readouterr().err


def test_sigterm_between_the_renames_leaves_the_new_pair_whole(tmp_path):
    """The old .idx was removed first and the finished new one deleted with the partial files:
    a SIGTERM between the renames left the new .bin without an index Megatron needs."""
    text = tmp_path / "held.txt"
    text.write_text("new text\n")
    for name in ("g.bin", "g.idx"):
        (tmp_path / name).write_bytes(b"old")
    script = (
        "import os, signal\n"
        "from orch import prepare_data\n"
        "real = os.replace\n"
        "calls = []\n"
        "def replace(*args):\n"
        "    real(*args)\n"
        "    calls.append(1)\n"
        "    if len(calls) == 1:  # between the two renames, once\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "prepare_data.os.replace = replace\n"
        f"prepare_data.prepare([{str(text)!r}], 'byte', {str(tmp_path / 'g.bin')!r}, "
        "force=True)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.bin", "g.idx", "held.txt"]
    assert load_tokens(DataConfig(path=str(tmp_path / "g")), 256).tolist() == list(b"new text\n")


def test_sigterm_removes_the_partial_file(tmp_path):
    """Python's default SIGTERM ended the process with ``.NAME.bin.partial-PID`` left behind."""
    text = tmp_path / "big.txt"
    text.write_text("x" * 1000 + "\n")
    script = (
        "import os, signal, sys\n"
        "from orch import prepare_data\n"
        "real = prepare_data._encoded\n"
        "def slow(*args):\n"
        "    yield from real(*args)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    yield np.zeros(1), True\n"
        "import numpy as np\n"
        "prepare_data._encoded = slow\n"
        f"prepare_data.prepare([{str(text)!r}], 'byte', {str(tmp_path / 'o.bin')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]
