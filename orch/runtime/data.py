"""Training data: a byte tokenizer, token streams, packed samples and resumable samplers.

The pipeline is deliberately small. ``load_tokens`` turns ``data.path`` into one 1-D integer
array (text is byte-tokenized in memory; token files are memory-mapped, never read whole).
``PackedSequences`` cuts that stream into fixed-length samples with no padding. ``BatchStream``
walks a seeded permutation of those samples, one global batch per optimizer step, and hands each
data-parallel rank its slice as micro-batches; :mod:`orch.runtime.blend` does the same for a
``data.blend``, several files' samples mixed by weight.

The samplers' positions count global samples, not per-rank ones, so a checkpoint's data state is
the same on every rank and can be resumed on a different number of data-parallel ranks. Every
problem with the user's data is a ``DataError`` raised before training starts.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.resources
import math
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from orch.config.blend import blend_field, blend_weights, parse_blend
from orch.config.schema import DataConfig
from orch.errors import OrchError, Problem
from orch.runtime.indexed import (
    NotAnIndex,
    index_beside,
    megatron_prefix,
    read_index,
    typed_by_config,
)

TOKEN_SUFFIXES = (".bin", ".npy")
"""Suffixes that ``data.format: auto`` reads as token files; everything else is text."""

OTHER_FORMATS = (".npz", ".pt", ".pth", ".pkl", ".pickle", ".safetensors", ".parquet",
                 ".arrow", ".h5", ".hdf5", ".zip", ".tar", ".zst", ".idx")
"""Suffixes of formats that are neither text nor token ids as orch reads them (they were read
as text: their bytes trained on as if they were a corpus)."""

_SNIFF_BYTES = 1 << 16
"""How much of a text file is looked at for NUL bytes, which text never holds."""

_NOT_TEXT_FIX = "give a text file, or token ids as .npy (np.save) or raw .bin of data.token_dtype"

_SCAN_CHUNK = 1 << 24
"""Tokens per chunk when scanning a memory-mapped file, so the scan never loads it whole."""


class DataError(OrchError):
    """The training data cannot be used: names the field, the offending value and the fix, and
    the other fields the check read (``Problem.reads``)."""

    def __init__(self, where: str, message: str, fix: str, reads: tuple[str, ...] = ()) -> None:
        self.problem = Problem(where, message, fix, reads)
        super().__init__(str(self.problem))

    @classmethod
    def of(cls, problem: Problem) -> DataError:
        """The error saying ``problem`` (one found in a file, said of the field holding it)."""
        return cls(problem.where, problem.message, problem.fix, problem.reads)


_READ_AS = ("data.format", "data.token_dtype")
"""What decides how ``data.path``'s bytes are read (as text, or as ids of which type): what a
check of what it read reads besides the path."""


class ByteTokenizer:
    """UTF-8 bytes as token ids: 256 ids, no special tokens, nothing to download.

    Weak as language modelling goes, but it makes the default run self-contained and any text
    file usable as data, which is what a training library's own tests and demos need.
    """

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as a uint8 array (a non-ASCII character spans ids)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Any) -> str:
        """Text from ids; a sequence cut mid-character decodes with replacement characters."""
        data = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
        return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokens(data: DataConfig, vocab_size: int, limit: int | None = None,
                checked: bool = True) -> np.ndarray:
    """The whole training stream of ``data`` as a 1-D array of token ids below ``vocab_size``
    (with ``limit``, its first ``limit`` ids alone, read and checked: a held-out file of which
    an evaluation uses the start; not ``checked``: the ids not scanned, for a caller that uses a
    part of them and checks that, :func:`check_ids`).

    An empty ``data.path`` means the corpus shipped with orch. Text (any suffix, ``.gz`` read
    transparently) is byte-tokenized into a uint8 array in memory; token files are memory-mapped:
    ``.bin`` is raw ids of ``data.token_dtype`` (nanoGPT's format) unless a Megatron ``.idx``
    beside it names their type (:mod:`orch.runtime.indexed`; ``data.path`` may then also be the
    pair's prefix, as Megatron's ``--data-path`` takes it), and ``.npy`` carries its own dtype in
    its header, so ``token_dtype`` does not apply to either. Every check (existence, format,
    size, largest id) runs here, before training starts; nothing is cached on disk.
    """
    if not data.path:
        blob = importlib.resources.files("orch.runtime").joinpath("corpus/kjv.txt.gz")
        tokens = np.frombuffer(gzip.decompress(blob.read_bytes()), dtype=np.uint8)[:limit]
    else:
        path, kind = check_source(data)
        tokens = (_read_text(data, path, limit) if kind == "text"
                  else _map_tokens(data, path)[:limit])
    if checked:
        check_ids(tokens, vocab_size, data)
    return tokens


def check_ids(tokens: np.ndarray, vocab_size: int, data: DataConfig) -> None:
    """Every id of ``tokens`` (read from ``data``, or a part of them) below ``vocab_size``, the
    fix saying what else may be wrong for that kind of file."""
    if not data.path:
        _check_range(tokens, vocab_size, "the shipped corpus", _TEXT_IDS)
        return
    path = _existing_file(data.path)  # what the file is, from its name: its head read already
    _check_range(tokens, vocab_size, repr(data.path), _TEXT_IDS if _file_kind(data, path) ==
                 "text" else ", or check data.token_dtype" if typed_by_config(str(path)) else "")


_TEXT_IDS = "; text is read as bytes, 256 ids"


_SAMPLE_BYTES = 1 << 16
_SAMPLES = 32
"""A data file's identity hashes this many pieces of this size, spread over it (2 MiB read,
whatever its size: a resume reads it, not the terabytes a corpus may hold)."""


def source_identity(data: DataConfig) -> dict[str, Any]:
    """What tells the data a checkpoint was trained on from other data at the same path: the
    file's size and a sha256 of pieces spread over it (the whole file when it is small); for a
    ``data.blend``, each file's, in order. A rewritten or replaced file of the same size is told
    apart unless every sampled piece is unchanged; a file that changes only between the pieces
    is not (hashing a corpus whole at every resume would take minutes)."""
    if data.blend:
        return {"blend": each_blended(data, source_identity),
                "weights": blend_weights(data.blend)}
    if not data.path:
        path = Path(str(importlib.resources.files("orch.runtime").joinpath("corpus/kjv.txt.gz")))
    else:
        path = _existing_file(data.path)
    identity = _sampled(path)
    if idx := index_beside(path):  # it types the ids: another one reads them otherwise
        identity["index"] = _sampled(idx)
    return identity


def _sampled(path: Path) -> dict[str, Any]:
    """``path``'s size and the sha256 of :data:`_SAMPLES` pieces spread over it."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _SAMPLE_BYTES * _SAMPLES:
            digest.update(f.read())
        else:
            for index in range(_SAMPLES):
                f.seek((size - _SAMPLE_BYTES) * index // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return {"bytes": size, "sampled_sha256": digest.hexdigest()}


def source_change(saved: dict[str, Any] | None, now: dict[str, Any],
                  data: DataConfig) -> Problem | None:
    """A problem when ``now`` (``data``'s :func:`source_identity`) is not the identity a
    checkpoint saved (``saved``; None for checkpoints from before it was saved, which are not
    checked)."""
    if not saved:
        return None
    fresh = ("set it back to resume, or start over in a new run.dir (orch ckpt export RUN_DIR "
             "--to hf OUT, then model.init_from: OUT, keeps the weights)")
    if ("blend" in saved) != bool(data.blend):
        then = (f"a data.blend of {len(saved['blend'])} files" if "blend" in saved
                else "data.path")
        return Problem("data.blend" if data.blend else "data.path", f"the checkpoint was "
                       f"trained on {then}: its saved position counts that data's samples", fresh)
    if not data.blend:
        shown = repr(data.path) if data.path else "the shipped corpus"
        return None if _same_file(saved, now) else _changed(saved, now, "data.path", shown)
    if len(saved["blend"]) != len(now["blend"]) or not np.allclose(
            saved["weights"], now["weights"], rtol=1e-12, atol=0):
        return Problem("data.blend", f"{len(now['blend'])} files of weights "
                       f"{_rounded(now['weights'])}, but the checkpoint was trained on "
                       f"{len(saved['blend'])} of weights {_rounded(saved['weights'])}: its "
                       "saved position counts samples of that blend", fresh)
    for index, (before, after, (_, path)) in enumerate(zip(
            saved["blend"], now["blend"], parse_blend(data.blend)[0], strict=True)):
        if not _same_file(before, after):
            return _changed(before, after, blend_field(index), repr(path))
    return None


def _same_file(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether a file's identity ``now`` is the one a checkpoint ``saved``, compared on what was
    saved (a checkpoint from before a Megatron .idx was part of it saved none)."""
    return all(now.get(key) == value for key, value in saved.items())


def _rounded(weights: list[float]) -> list[float]:
    return [round(weight, 4) for weight in weights]


def _changed(saved: dict[str, Any], now: dict[str, Any], where: str, shown: str) -> Problem:
    if saved["bytes"] != now["bytes"]:
        what = f"{saved['bytes']:,} bytes then, {now['bytes']:,} now"
    elif saved["sampled_sha256"] != now["sampled_sha256"]:
        what = f"the same size, {now['bytes']:,} bytes, but other contents"
    else:
        what = ("the same ids, but " + ("another Megatron .idx beside them, which types them"
                                        if "index" in now else "no Megatron .idx beside them now"))
    return Problem(where, f"{shown} is not the data the checkpoint was trained on ({what}): "
                   "its saved position would continue in other samples",
                   "restore that file to resume; to train these weights on the new data, export "
                   "them (orch ckpt export RUN_DIR --to hf OUT) and start a new run.dir with "
                   "model.init_from: OUT; or start over with --resume none")


T = TypeVar("T")


def each_blended(data: DataConfig, read: Callable[[DataConfig], T]) -> list[T]:
    """``read`` of each ``data.blend`` file, given the config that reads it by ``data.path``'s
    rules (:func:`read_like_data`); a ``DataError`` it raises is said of the entry
    (``data.blend[i]``)."""
    done, problems = every_blended(data, read)
    if problems:
        raise DataError.of(problems[0])
    return done


def every_blended(data: DataConfig, read: Callable[[DataConfig], T]
                  ) -> tuple[list[T], list[Problem]]:
    """:func:`each_blended` reading every file whatever the others' problems: what they gave,
    and every problem, each said of its entry."""
    done, problems = [], []
    for index, (_, path) in enumerate(parse_blend(data.blend)[0]):
        try:
            done.append(read(read_like_data(data, path)))
        except DataError as exc:
            problems.append(problem_of(exc.problem, blend_field(index)))
    return done, problems


def too_short(count: int, seq_len: int) -> DataError:
    return DataError("data.path", f"the data has {count} tokens to train on, fewer than one "
                     f"sample of train.seq_len={seq_len} needs ({seq_len + 1})",
                     "use more data, or lower train.seq_len or data.holdout", ("data.holdout",))


def check_source(data: DataConfig) -> tuple[Path, str]:
    """The file checks of ``load_tokens`` that read no data: the launcher runs them before it
    starts any process. Returns the path and its kind ('text' or 'tokens')."""
    path = _existing_file(data.path)
    kind = _file_kind(data, path)
    if not os.access(path, os.R_OK):
        raise DataError("data.path", f"{data.path!r} cannot be read by this user (permission "
                        "denied)", "make it readable (chmod a+r), or point data.path at a copy")
    if path.stat().st_size == 0:
        raise DataError(
            "data.path", f"{data.path!r} is empty", "point data.path at a file with data"
        )
    if kind == "text":
        gz = _gzipped(path)
        head = _text_head(data, path)
        if b"\0" in head[:_SNIFF_BYTES]:
            raise DataError("data.path", f"{data.path!r} holds NUL bytes in its first "
                            f"{_SNIFF_BYTES // 1024} KiB{' decompressed' if gz else ''}: a "
                            "binary file, not text", _NOT_TEXT_FIX, _READ_AS)
        if gz and not head:
            raise _decompresses_to_nothing(data)
    return path, kind


def _gzipped(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _text_head(data: DataConfig, path: Path) -> bytes:
    """A text file's first ``_SNIFF_BYTES + 1`` bytes, decompressed for gzip: all of it where
    it is shorter, so a small compressed corpus's size is known before any process starts."""
    try:
        with gzip.open(path, "rb") if _gzipped(path) else open(path, "rb") as f:
            return f.read(_SNIFF_BYTES + 1)
    except (OSError, EOFError) as e:  # gzip's complaints: not gzip, truncated
        raise _bad_gzip(data, e) from e


def _bad_gzip(data: DataConfig, error: Exception) -> DataError:
    return DataError("data.path", f"{data.path!r} is not a valid gzip file ({error})",
                     "re-compress it", _READ_AS)


def _decompresses_to_nothing(data: DataConfig) -> DataError:
    return DataError("data.path", f"{data.path!r} decompresses to nothing", "point it at text",
                     _READ_AS)


_CORPUS_HINT = ", or set data.path to '' for the shipped corpus"


def _existing_file(value: str) -> Path:
    """The file ``value`` names: itself, or ``PREFIX.bin`` for a Megatron data prefix."""
    path = Path(value).expanduser()
    shown = f"{value!r}" if str(path.resolve()) == value else f"{value!r} ({path.resolve()})"
    if pair := megatron_prefix(value):
        if path.is_file():  # Megatron's --data-path would read the pair, orch the file
            raise DataError("data.path", f"{shown} is a file and the prefix of the Megatron "
                            f"pair {pair.name} + .idx beside it: which is meant is not clear",
                            f"point data.path at {pair.name} for the pair's token ids, or "
                            "rename the file")
        return pair
    if path.name.lower().endswith(".idx") and path.with_suffix(".bin").is_file():
        raise DataError("data.path", f"{shown} is the index of a Megatron pair, not its ids",
                        f"point data.path at {path.with_suffix('.bin').name} or at the prefix "
                        f"{path.with_suffix('').name}")
    if not path.exists():
        halves = [path.with_name(path.name + s) for s in (".bin", ".idx")]
        half = next((h.name for h in halves if h.exists()), None)
        raise DataError(
            "data.path",
            f"{shown} does not exist" + (f" (as a Megatron prefix: {half} is there, but not "
                                         "both .bin and .idx)" if half else ""),
            f"correct the path (relative paths start where orch runs){_CORPUS_HINT}",
        )
    if not path.is_file():
        raise DataError("data.path", f"{shown} is not a file", "point data.path at one file")
    return path


def _file_kind(data: DataConfig, path: Path) -> str:
    """'text' or 'tokens', from ``data.format`` and the suffix, refusing combinations that lie."""
    name = path.name.lower()
    compressed = name.endswith(".gz")
    stem = name.removesuffix(".gz")
    token_suffix = next((s for s in TOKEN_SUFFIXES if stem.endswith(s)), None)
    if other := next((s for s in OTHER_FORMATS if stem.endswith(s)), None):
        raise DataError("data.path", f"{data.path!r} is a {other} file: neither text nor token "
                        "ids as orch reads them", "export the token ids with numpy as .npy "
                        "(np.save) or as raw .bin of data.token_dtype, or give a text file")

    if token_suffix and data.format != "text" and compressed:
        raise DataError(
            "data.path",
            f"{data.path!r} is a compressed token file, which cannot be memory-mapped",
            f"decompress it (gunzip) and point data.path at the {token_suffix} file",
            ("data.format",),
        )
    if data.format == "text" and token_suffix:
        named = (f"ends in {token_suffix}, a token-file suffix" if data.path.lower().endswith(
            token_suffix) else f"is the prefix of the Megatron pair {path.name} + .idx, token ids")
        raise DataError(
            "data.format",
            f"'text', but data.path {data.path!r} {named}",
            "set data.format to 'tokens' (or 'auto') to read token ids, or rename a text file "
            "so it does not end in .bin or .npy",
            ("data.path",),
        )
    if data.format == "tokens" and not token_suffix:
        raise DataError(
            "data.format",
            f"'tokens', but data.path {data.path!r} ends in neither .bin nor .npy",
            "set data.format to 'text' (or 'auto') for a text file, or give a token file the "
            ".bin suffix (raw ids of data.token_dtype) or save it with numpy as .npy",
            ("data.path",),
        )
    return "tokens" if token_suffix else "text"


def _read_text(data: DataConfig, path: Path, limit: int | None = None) -> np.ndarray:
    """The bytes of ``path`` (decompressed), the first ``limit`` of them where given."""
    size = -1 if limit is None else limit
    if _gzipped(path):
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read(size)
        except (OSError, EOFError) as e:  # truncated past the head check_source read
            raise _bad_gzip(data, e) from e
        if not raw:
            raise _decompresses_to_nothing(data)
    else:
        with open(path, "rb") as f:
            raw = f.read(size)
    # Byte-level tokenization of a file is its bytes: no decode/encode round trip needed.
    return np.frombuffer(raw, dtype=np.uint8)


_NPY_MAGIC = b"\x93NUMPY"


def _map_tokens(data: DataConfig, path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return _map_npy(data, path)
    if idx := index_beside(path):
        return _map_indexed(data, path, idx)
    dtype = np.dtype(data.token_dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(
            "data.path",
            f"{data.path!r} has {size} bytes, not a multiple of {dtype.itemsize} "
            f"(data.token_dtype={data.token_dtype!r})",
            "set data.token_dtype to the type the file was written with, or re-export the "
            "file; it may be truncated",
            _READ_AS,
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _map_indexed(data: DataConfig, path: Path, idx: Path) -> np.ndarray:
    """A Megatron ``.bin`` read with the id type its ``.idx`` names (``data.token_dtype`` is
    not read), once the index shows the two belong together."""
    redo = ("re-run the preprocessing that wrote the pair, or move the .idx away to read the .bin "
            "alone as raw ids of data.token_dtype")
    try:
        header = read_index(idx)
    except NotAnIndex as e:
        raise DataError("data.path", f"{data.path!r} has {idx.name} beside it, which is not a "
                        f"Megatron index: {e}", redo) from e
    if header.dtype.kind not in "iu":
        raise DataError("data.path", f"{data.path!r}: its index {idx.name} says the ids are "
                        f"{header.dtype}, not integers", "give a token file of integer ids")
    size = path.stat().st_size
    if size != header.data_bytes:
        raise DataError("data.path", f"{data.path!r} has {size:,} bytes, but its index "
                        f"{idx.name} says {header.data_bytes:,} ({header.sequences:,} sequences "
                        f"of {header.dtype}): one of the pair is truncated or from another "
                        "corpus", redo)
    return np.memmap(path, dtype=header.dtype, mode="r")


def _map_npy(data: DataConfig, path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            raise DataError("data.path", f"{data.path!r} is not a .npy file (it does not start "
                            "with NumPy's header)",
                            "save token ids with numpy.save(path, ids), or name a raw file of "
                            "data.token_dtype ids .bin", _READ_AS)
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(
            "data.path",
            f"{data.path!r} is not a readable .npy array ({e})",
            "save token ids with numpy.save(path, ids), or use a raw .bin file",
            _READ_AS,
        ) from e
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(
            "data.path",
            f"{data.path!r} holds a {tokens.dtype} array of shape {tokens.shape}; token ids "
            "must be a 1-D integer array",
            "save a flat integer array, e.g. numpy.save(path, ids.ravel().astype(np.uint16))",
            _READ_AS,
        )
    if tokens.size == 0:
        raise DataError("data.path", f"{data.path!r} holds no tokens", "save some token ids",
                        _READ_AS)
    return tokens


def token_count(data: DataConfig) -> int | None:
    """How many tokens ``data.path`` holds, read from its size or header only (token files are
    mapped, nothing of their ids read; a plain text file's bytes are its tokens), with the
    format checks of :func:`load_tokens`; None where only reading it all would tell (a gzip
    file that decompresses to more than the bytes :func:`check_source` looks at)."""
    path, kind = check_source(data)
    if kind == "tokens":
        return len(_map_tokens(data, path))
    if not _gzipped(path):
        return path.stat().st_size
    head = _text_head(data, path)
    return len(head) if len(head) <= _SNIFF_BYTES else None


def read_like_data(data: DataConfig, path: str) -> DataConfig:
    """The config that reads ``path`` by ``data``'s rules (token dtype, tokenizer), its format
    told by its suffix (``data.format`` says how ``data.path`` reads: a text held-out file
    beside a token file's training, or the other way round, is normal): a held-out file
    (``eval.path``) goes through the same checks and loading as ``data.path``; its problems are
    said of its own field with :func:`problem_of`."""
    return dataclasses.replace(data, path=path, format="auto", blend=[])


def problem_of(problem: Problem, field: str) -> Problem:
    """``problem``, found in a file read by :func:`read_like_data`, said of ``field`` (the
    field holding that file) where it names ``data.path`` (the shipped corpus is no fix
    there)."""
    def said(text: str) -> str:
        return text.replace(_CORPUS_HINT, "").replace("data.path", field)

    return Problem(said(problem.where), said(problem.message), said(problem.fix),
                   tuple(dict.fromkeys(said(read) for read in problem.reads)))


def held_out_start(count: int, holdout: float) -> int:
    """Where the part of ``count`` tokens that ``data.holdout`` keeps out of training starts:
    the last ``ceil(count * holdout)`` tokens are held out (none for 0), the product taken in
    decimal (``holdout`` as written: 100 x 0.07 is 7, not the 8 binary floats make of it)."""
    return count - math.ceil(count * Fraction(str(holdout)))


def packed_samples(count: int, seq_len: int) -> int:
    """How many samples of ``seq_len`` tokens :class:`PackedSequences` cuts from ``count``
    tokens (neighbours share a boundary token)."""
    return max(0, (count - 1) // seq_len)


def check_token_count(count: int, global_batch: int, seq_len: int) -> None:
    """Enough tokens for one global batch of packed samples (``global_batch x seq_len + 1``);
    ``count`` is the data's (its every field read)."""
    samples = packed_samples(count, seq_len)
    if samples < global_batch:
        raise DataError(
            "train.global_batch",
            f"{global_batch} sequences of train.seq_len={seq_len} need at least "
            f"{global_batch * seq_len + 1} tokens, but the data has {count} to train on "
            f"({samples} samples)",
            "use more data (data.path), or lower train.global_batch, train.seq_len or "
            "data.holdout",
            ("train.seq_len", "data"),
        )


def _check_range(tokens: np.ndarray, vocab_size: int, source: str, hint: str) -> None:
    """Every id in ``[0, vocab_size)``, scanned in chunks so a memory map stays a memory map;
    ``hint`` ends the fix of an id too large (what else may be wrong than the vocabulary)."""
    low, high = 0, -1
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start : start + _SCAN_CHUNK]
        low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
    if low < 0:
        raise DataError(
            "data.path",
            f"{source} contains the negative token id {low}",
            "token ids must be non-negative; re-export the file with an unsigned dtype",
            _READ_AS,
        )
    if high >= vocab_size:
        raise DataError(
            "model.vocab_size",
            f"{vocab_size}, but {source} contains token id {high}",
            f"set model.vocab_size to at least {high + 1} (the tokenizer's vocabulary){hint}",
            ("data",),
        )


# ---------------------------------------------------------------------------------------------
# Samples


class PackedSequences:
    """Fixed-length samples packed back to back from one token stream, with no padding.

    Sample ``i`` is the window ``tokens[i*L : i*L + L + 1]``: its first ``L`` ids are the input
    and its last ``L`` the target, so neighbouring samples share one boundary token and no token
    is wasted. Documents are not separated; with packing, attention simply runs across their
    boundaries, as in nanoGPT and most pre-training.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        if len(self) == 0:
            raise too_short(len(tokens), seq_len)

    def __len__(self) -> int:
        return packed_samples(len(self.tokens), self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``index`` as (input, target), int64 tensors of shape ``[seq_len]``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        inputs, targets = self.gather(np.array([index]))
        return inputs[0], targets[0]

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``indices`` stacked as (inputs, targets), int64 ``[len(indices), seq_len]``.

        One fancy-indexing read per batch; on a memory map it touches only the pages it needs.
        """
        length = self.seq_len
        starts = np.asarray(indices, dtype=np.int64) * length
        windows = self.tokens[starts[:, None] + np.arange(length + 1)]
        batch = torch.from_numpy(windows.astype(np.int64))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


# ---------------------------------------------------------------------------------------------
# Sampling


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Which document each token of ``tokens`` (``[batch, seq]``) is in, counted from 0 at each
    sequence's start: a new document begins after every ``eos_id``, which belongs to the one it
    ends (what ``train.document_mask`` masks attention by)."""
    ends = tokens == eos_id
    return torch.cumsum(ends, dim=1) - ends.long()


class Samples(Protocol):
    """What batches are gathered from: one file's :class:`PackedSequences`, or a blend's files'
    (:class:`orch.runtime.blend.BlendedSequences`)."""

    seq_len: int

    def __len__(self) -> int: ...

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


def rank_micro_batches(dataset: Samples, indices: np.ndarray, micro_batch: int,
                       dp_rank: int, dp_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Data-parallel rank ``dp_rank``'s share of the global batch of samples ``indices``: the
    ``dp_rank``-th contiguous ``1 / dp_size`` of them, as ``(inputs, targets)`` micro-batches
    of ``micro_batch`` samples (how every batch, training's or an evaluation's, is split)."""
    per_rank = len(indices) // dp_size
    mine = indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [dataset.gather(mine[i : i + micro_batch]) for i in range(0, per_rank, micro_batch)]


class GlobalBatches:
    """What every training stream shares: a deterministic, resumable order of global batches of
    sample indices (a subclass's :meth:`_next_indices`), split the same way over data-parallel
    ranks: rank ``r`` of ``dp_size`` takes the ``r``-th contiguous ``G / dp_size`` of each batch
    and cuts it into micro-batches. The order of global samples therefore depends only on the
    seed, the data and ``global_batch``, never on the rank count, and a position saved on one
    number of ranks resumes on another."""

    def __init__(self, dataset: Samples, global_batch: int,
                 micro_batch: int, dp_rank: int, dp_size: int, seed: int,
                 source: dict[str, Any] | None) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if global_batch < 1 or micro_batch < 1:
            raise ValueError(f"batch sizes must be positive: {global_batch=}, {micro_batch=}")
        if global_batch % (dp_size * micro_batch):
            raise DataError(
                "train.global_batch",
                f"{global_batch} does not split into {dp_size} data-parallel ranks x "
                f"train.micro_batch={micro_batch}",
                f"make train.global_batch a multiple of {dp_size * micro_batch}",
            )
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.source = source
        """The data's :func:`source_identity`, saved with the position and checked on resume
        (None: not saved, as in the tests' in-memory datasets)."""
        self._last = "no step taken"

    def _next_indices(self) -> np.ndarray:
        """The next global batch's sample indices, advancing the position."""
        raise NotImplementedError

    def _position(self) -> str:
        """Where the next global batch comes from, in words."""
        raise NotImplementedError

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step: ``(inputs, targets)`` pairs,
        each ``[micro_batch, seq_len]`` int64, ``global_batch / (dp_size * micro_batch)`` of them.
        """
        self._last = self._position()
        return rank_micro_batches(self.dataset, self._next_indices(), self.micro_batch,
                                  self.dp_rank, self.dp_size)

    def last_step(self) -> str:
        """Where the last step's global batch came from, in words (for a step that went
        wrong: which data to look at)."""
        return self._last

    def _state(self, position: dict[str, Any]) -> dict[str, Any]:
        """``position`` with what every stream saves: the seed, the global batch and the data's
        identity when known."""
        state = {**position, "seed": self.seed, "global_batch": self.global_batch}
        if self.source is not None:
            state["source"] = self.source
        return state

    def _check_state(self, state: dict[str, Any], keys: set[str]) -> None:
        """Refuse a saved position lacking ``keys``, or of another seed or global batch: with
        either changed it would point into a different order, and resuming would silently
        repeat or skip data."""
        if missing := (keys | {"seed", "global_batch"}) - set(state):
            raise DataError(
                "checkpoint data state",
                f"lacks {sorted(missing)}",
                "resume from a checkpoint written by this version of orch with this data, or "
                "start afresh (checkpoint.resume: none)",
            )
        if int(state["global_batch"]) != self.global_batch:
            raise DataError(
                "train.global_batch",
                f"{self.global_batch}, but the checkpoint was trained with "
                f"{state['global_batch']}; its data position counts global batches of that size",
                f"set train.global_batch back to {state['global_batch']} to resume, {FRESH}",
            )
        if int(state["seed"]) != self.seed:
            raise DataError(
                "train.seed",
                f"{self.seed}, but the checkpoint's data order came from seed {state['seed']}",
                f"set train.seed back to {state['seed']} to resume, {FRESH}",
            )


FRESH = "or start a fresh run (checkpoint.resume: none)"


class BatchStream(GlobalBatches):
    """One data file's global batches: each epoch a permutation of all sample indices from
    ``default_rng((seed, epoch))``. Step ``s`` of an epoch takes the ``global_batch`` permuted
    indices ``[s*G, (s+1)*G)``; the epoch's tail that cannot fill a whole batch is dropped (it is
    in another place next epoch)."""

    def __init__(
        self,
        dataset: PackedSequences,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        source: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(dataset, global_batch, micro_batch, dp_rank, dp_size, seed, source)
        check_token_count(len(dataset.tokens), global_batch, dataset.seq_len)
        self.steps_per_epoch = len(dataset) // global_batch
        self._epoch = 0
        self._step_in_epoch = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def tokens_seen(self) -> int:
        """Input tokens consumed by all ranks together since the start of training."""
        steps = self._epoch * self.steps_per_epoch + self._step_in_epoch
        return steps * self.global_batch * self.dataset.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            self._order = (epoch, rng.permutation(len(self.dataset)))
        return self._order[1]

    def _position(self) -> str:
        return (f"epoch {self._epoch}, global batch {self._step_in_epoch + 1} of "
                f"{self.steps_per_epoch}, seed {self.seed}")

    def _next_indices(self) -> np.ndarray:
        start = self._step_in_epoch * self.global_batch
        indices = self._permutation(self._epoch)[start : start + self.global_batch]
        self._step_in_epoch += 1
        if self._step_in_epoch == self.steps_per_epoch:
            self._epoch, self._step_in_epoch = self._epoch + 1, 0
        return indices

    def state_dict(self) -> dict[str, Any]:
        """The position as plain values (JSON-ready), identical on every data-parallel rank,
        with the data file's identity when the stream knows it."""
        return self._state({"epoch": self._epoch, "step_in_epoch": self._step_in_epoch,
                            "samples": len(self.dataset)})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the step at which ``state`` was saved, on any ``dp_size``;
        the sample count must match too (another file or ``train.seq_len`` gives another
        order)."""
        self._check_state(state, {"epoch", "step_in_epoch", "samples"})
        if int(state["samples"]) != len(self.dataset):
            raise DataError(
                "data.path",
                f"the data now gives {len(self.dataset)} samples of train.seq_len="
                f"{self.dataset.seq_len}, but the checkpoint's had {state['samples']}",
                f"resume with the same data and train.seq_len as the checkpoint, {FRESH}",
            )
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise DataError(
                "checkpoint data state",
                f"position epoch={epoch}, step_in_epoch={step} is outside the data "
                f"({self.steps_per_epoch} steps per epoch)",
                f"the checkpoint is damaged; resume from an earlier one, {FRESH}",
            )
        self._epoch, self._step_in_epoch = epoch, step
