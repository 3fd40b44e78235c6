"""``orch data prepare``: documents (text files, JSON lines) to a token file training reads.

Training reads token ids memory-mapped. This writes them as Megatron's ``preprocess_data.py``
does: ``NAME.bin``, the ids back to back (uint16, or int32 for vocabularies over 65,536), and
``NAME.idx`` beside it, Megatron's index of their type and of where each document starts
(:mod:`orch.runtime.indexed`), so the same files train under orch and Megatron. Text given
straight to ``data.path`` is
byte-tokenized, which suits orch's own small models but not one initialized from a HuggingFace
checkpoint, whose embedding rows belong to its own tokenizer's ids. This module tokenizes with
that tokenizer (the ``tokenizers`` package reading ``tokenizer.json``, the file transformers reads;
nothing is downloaded): each document's ids as the tokenizer encodes it without special tokens,
then the end-of-document id, so packed training sequences show where one document ends and the
next begins (Megatron's convention). Ids are written as they come, to a temporary file renamed
into place at the end, so a corpus never has to fit in memory and a failed or interrupted run
leaves no partial file behind and overwrites nothing.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from orch.errors import Problem, ProblemsError
from orch.runtime.data import OTHER_FORMATS, TOKEN_SUFFIXES, ByteTokenizer
from orch.runtime.indexed import IndexWriter

JSONL_SUFFIXES = (".jsonl", ".ndjson")
"""Inputs read as one JSON object per line, each a document (``.gz`` read transparently)."""

PIECE_CHARS = 1 << 20
"""A text file is tokenized in pieces of about this many characters, each cut after a newline
(before a space in a longer line), so a large file is never held whole: the tokenizers package
holds about 200 bytes per character it encodes at once (1.4-1.7 GB for 8 MiB, measured), about
220 MB here. Tokenization can differ from the whole file's only where a piece ends (one place
in a MiB)."""

BATCH_CHARS = 1 << 20
"""JSON-lines documents are encoded in batches of about this many characters (the tokenizers
package spreads a batch over the cores; its memory grows with the batch as with a piece)."""

UINT16_VOCAB = 1 << 16
"""Vocabularies up to this size are written as uint16 ids, larger ones as int32 (Megatron's
index has no uint32; ids of real vocabularies are far below 2**31, so the bytes are the same)."""


class PrepareError(ProblemsError):
    """The inputs, tokenizer or output of ``orch data prepare`` cannot be used."""

    title = "cannot prepare the data"


class Tokenizer(Protocol):
    """What preparing needs of a tokenizer: its vocabulary size, the end-of-document id (None:
    none appended) and ids for a batch of documents, without special tokens."""

    vocab_size: int
    eos: int | None

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...


class Bytes:
    """orch's byte tokenizer (``data.tokenizer: byte``): UTF-8 bytes; the end-of-document id a
    byte value given with ``--eos`` (such as 0, which text never holds), or none."""

    vocab_size = ByteTokenizer.vocab_size

    def __init__(self, eos: int | None = None) -> None:
        self.eos = eos

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [ByteTokenizer().encode(text) for text in texts]


class HuggingFace:
    """A HuggingFace ``tokenizer.json`` read by the ``tokenizers`` package."""

    def __init__(self, path: Path, eos: str | None) -> None:
        """``path``: the ``tokenizer.json`` file; ``eos``: the end-of-document token's text
        (None: no end-of-document id)."""
        from tokenizers import Tokenizer as Fast

        self._tokenizer = Fast.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos = None if eos is None else self._tokenizer.token_to_id(eos)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` wrote."""

    out: Path
    tokens: int
    documents: int
    dtype: str
    vocab_size: int
    eos: int | None
    """The end-of-document id after each document (``data.eos_id``), or None."""


def _tokenizer_file(value: str) -> Path:
    """``tokenizer.json`` itself, or the one in a model directory."""
    path = Path(value).expanduser()
    return path / "tokenizer.json" if path.is_dir() else path


def _configured_eos(tokenizer_file: Path) -> str | None:
    """The ``eos_token`` of the ``tokenizer_config.json`` beside ``tokenizer_file``, if any
    (transformers' own source of it; a string, or a dict with its ``content``)."""
    config = tokenizer_file.parent / "tokenizer_config.json"
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos


def load_tokenizer(value: str, eos: str | None, no_eos: bool) -> Tokenizer:
    """The tokenizer ``--tokenizer`` names (``byte``, a ``tokenizer.json`` or a directory
    holding one) with its end-of-document token: ``eos`` when given, else the one its
    ``tokenizer_config.json`` names; ``no_eos``: none. Raises :class:`PrepareError`."""
    if value == "byte":
        if eos is not None and not (eos.isdigit() and int(eos) < Bytes.vocab_size):
            raise PrepareError([Problem("--eos", f"{eos!r}, but the byte tokenizer's ids are "
                                        "the bytes 0-255 and it has no special tokens",
                                        "give a byte value, e.g. --eos 0 (text never holds it), "
                                        "or leave --eos out (documents simply concatenated)")])
        return Bytes(None if eos is None else int(eos))
    path = _tokenizer_file(value)
    if not path.is_file():
        raise PrepareError([Problem("--tokenizer", f"{value!r}: no tokenizer.json there",
                                    "give 'byte', a tokenizer.json file, or a HuggingFace model "
                                    "directory holding one (the model.init_from directory)")])
    try:
        import tokenizers  # noqa: F401
    except ImportError as e:
        raise PrepareError([Problem("--tokenizer", f"{value!r} needs the tokenizers package, "
                                    "which is not installed", "pip install tokenizers (it comes "
                                    "with transformers)")]) from e
    name = None if no_eos else eos or _configured_eos(path)
    try:
        tokenizer = HuggingFace(path, name)
    except Exception as e:  # the package's own parse errors (a Rust exception type)
        raise PrepareError([Problem("--tokenizer", f"{str(path)!r} is not a tokenizer.json the "
                                    f"tokenizers package reads: {e}", "give the tokenizer.json "
                                    "of a HuggingFace model")]) from e
    if not no_eos and name is None:
        config = path.parent / "tokenizer_config.json"
        said = (f"{str(config)!r} names no eos_token" if config.is_file() else
                f"no tokenizer_config.json beside {str(path)!r} names the eos_token")
        raise PrepareError([Problem("--eos", said, "name the end-of-document token with --eos "
                                    "(e.g. --eos '</s>'), or pass --no-eos")])
    if name is not None and tokenizer.eos is None:
        raise PrepareError([Problem("--eos", f"{name!r} is not a token of {str(path)!r}",
                                    "give the tokenizer's end-of-document token (its "
                                    "tokenizer_config.json's eos_token), or pass --no-eos")])
    return tokenizer


def _input_problems(inputs: list[str]) -> list[Problem]:
    """What is wrong with the input files, all of them: missing, not files, or a format that
    is not text or JSON lines."""
    problems = []
    for value in inputs:
        path = Path(value).expanduser()
        stem = path.name.lower().removesuffix(".gz")
        if not path.is_file():
            problems.append(Problem(value, "does not exist" if not path.exists() else
                                    "is not a file", "give text or JSON-lines files"))
        elif not _is_jsonl(path) and (suffix := next(
                (s for s in (*TOKEN_SUFFIXES, *OTHER_FORMATS, ".json") if stem.endswith(s)),
                None)):
            problems.append(Problem(value, f"is a {suffix} file, not text or JSON lines",
                                    "token files train as they are (data.path); write other "
                                    "formats as .jsonl, one {\"text\": ...} object per line"))
    return problems


def _out_problems(out: Path, force: bool) -> list[Problem]:
    problems = []
    if out.suffix != ".bin":
        problems.append(Problem("--out", f"{str(out)!r} does not end in .bin", "name the output "
                                "NAME.bin: training reads .bin files as token ids"))
    for written in dict.fromkeys((out, out.with_suffix(".idx"))):
        if written.exists() and not written.is_file():
            problems.append(Problem("--out", f"{str(written)!r} exists and is not a file",
                                    "name a file to write"))
        elif written.exists() and not force:
            problems.append(Problem("--out", f"{str(written)!r} exists", "choose another name, "
                                    "or pass --force to replace it (only once the new files are "
                                    "complete)"))
    if not out.parent.is_dir():
        problems.append(Problem("--out", f"its directory {str(out.parent)!r} does not exist",
                                "create it first"))
    elif not os.access(out.parent, os.W_OK):
        problems.append(Problem("--out", f"its directory {str(out.parent)!r} is not writable",
                                "choose a directory you can write to"))
    return problems


def _open_text(path: Path) -> IO[str]:
    """``path`` as text, its line ends kept as written (``\r\n`` stays two characters: the
    byte tokenizer must give the file's bytes, as training on the text file does) and a
    leading byte-order mark dropped."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", newline="")  # type: ignore[operator]


def _text_pieces(path: Path) -> Iterator[str]:
    """The text of ``path`` in pieces of about :data:`PIECE_CHARS`, each but the last ending
    at a line end, or, in a line longer than a piece, before a space (a 10 MB line went to the
    tokenizer whole: 2 GB of memory); a file that fits in one piece is one piece."""
    with _open_text(path) as f:
        text = f.read(PIECE_CHARS)
        while text:
            more = f.read(PIECE_CHARS)
            if not more:
                yield text
                return
            cut = text.rfind("\n") + 1 or text.rfind(" ")
            if cut > 0:
                yield text[:cut]
                text = text[cut:] + more
            else:  # not a line end nor a space in a whole piece: wait for one
                text += more


def _json_documents(path: Path, key: str) -> Iterator[str]:
    """The ``key`` string of each JSON object line of ``path`` (blank lines skipped)."""
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise PrepareError([Problem(where, f"not JSON: {e}", "give one JSON object per "
                                            "line")]) from e
            text = record.get(key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                what = (f"its field {key!r} is {type(text).__name__}, not a string"
                        if isinstance(record, dict) and key in record else
                        f"no field {key!r} (holds {sorted(record)})"
                        if isinstance(record, dict) else f"a {type(record).__name__}, not an "
                        "object")
                raise PrepareError([Problem(where, what, "name the documents' text field with "
                                            "--key")])
            yield text


def _is_jsonl(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").endswith(JSONL_SUFFIXES)


def _encoded(tokenizer: Tokenizer, files: list[Path], key: str) -> Iterator[tuple[np.ndarray,
                                                                                   bool]]:
    """Every document's ids in order, in parts: ``(ids, ends_a_document)``."""
    for path in files:
        try:
            yield from (_jsonl_encoded if _is_jsonl(path) else _text_encoded)(tokenizer, path,
                                                                              key)
        except UnicodeDecodeError as e:
            raise PrepareError([Problem(str(path), f"is not UTF-8 text ({e.reason} at a byte "
                                        f"{e.object[e.start:e.start + 1]!r})", "convert it to "
                                        "UTF-8 (e.g. iconv), or leave binary files out")]) from e
        except (OSError, EOFError) as e:  # a damaged .gz, a file gone while read
            raise PrepareError([Problem(str(path), f"cannot be read: {e}",
                                        "give a readable file (a .gz must be complete)")]) from e


def _jsonl_encoded(tokenizer: Tokenizer, path: Path, key: str) -> Iterator[tuple[np.ndarray,
                                                                                  bool]]:
    batch: list[str] = []
    size = 0
    for text in _json_documents(path, key):
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield from ((ids, True) for ids in tokenizer.encode_batch(batch))
            batch, size = [], 0
    yield from ((ids, True) for ids in tokenizer.encode_batch(batch))


def _text_encoded(tokenizer: Tokenizer, path: Path, _key: str) -> Iterator[tuple[np.ndarray,
                                                                                bool]]:
    pieces = _text_pieces(path)
    piece = next(pieces, None)
    while piece is not None:
        following = next(pieces, None)
        yield tokenizer.encode_batch([piece])[0], following is None
        piece = following


@contextlib.contextmanager
def _terminated_as_exit() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, ``kill``) raises ``SystemExit`` inside the block, so
    the partial file is removed as after an error or Ctrl-C: Python's default handling ends the
    process at once, leaving it. (Only the main thread can take signals.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # as a shell reports a process ended by it

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare(inputs: list[str], tokenizer: str, out: str, key: str = "text",
            eos: str | None = None, no_eos: bool = False, force: bool = False) -> Prepared:
    """Tokenize ``inputs`` into the token file ``out`` (see the module docstring). Every problem
    with the arguments is reported together before anything is written."""
    out_path = Path(out).expanduser()
    problems = _input_problems(inputs) + _out_problems(out_path, force)
    try:
        chosen = load_tokenizer(tokenizer, eos, no_eos)
    except PrepareError as e:
        problems += e.problems
    if problems:
        raise PrepareError(problems)
    dtype = np.dtype(np.uint16 if chosen.vocab_size <= UINT16_VOCAB else np.int32)
    index = IndexWriter(dtype)
    idx_path = out_path.with_suffix(".idx")
    partial, idx_partial = (p.with_name(f".{p.name}.partial-{os.getpid()}")
                            for p in (out_path, idx_path))
    tokens = 0
    with _terminated_as_exit():
        try:
            with open(partial, "wb") as f:
                for ids, ends in _encoded(chosen, [Path(i).expanduser() for i in inputs], key):
                    if ends and chosen.eos is not None:
                        ids = np.append(ids, chosen.eos)
                    f.write(ids.astype(dtype).tobytes())
                    tokens += len(ids)
                    index.add(len(ids), ends)
                f.flush()
                os.fsync(f.fileno())
            if tokens == 0:
                raise PrepareError([Problem(", ".join(inputs), "hold no text",
                                            "give files with documents in them")])
            index.write(idx_partial)
            os.replace(partial, out_path)
            os.replace(idx_partial, idx_path)
        finally:
            if idx_partial.exists() and not partial.exists():  # stopped between the renames:
                os.replace(idx_partial, idx_path)  # the new ids are in place, so is their index
            partial.unlink(missing_ok=True)
            idx_partial.unlink(missing_ok=True)
    return Prepared(out_path, tokens, len(index.document_starts) - 1, dtype.name,
                    chosen.vocab_size, chosen.eos)


__all__ = ["PrepareError", "Prepared", "load_tokenizer", "prepare"]
