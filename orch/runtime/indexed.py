"""Megatron-LM's indexed dataset, ``NAME.bin`` with ``NAME.idx`` beside it, read and written.

Megatron's ``preprocess_data.py`` writes a corpus as this pair: the ``.bin`` holds every
document's token ids back to back, and the ``.idx`` (magic ``MMIDIDX``, version 1) their type and
where each sequence and each document starts. Reading the pair lets data a Megatron user has
already tokenized (often terabytes) train under orch as it is, and writing it lets
``orch data prepare``'s output train under Megatron. orch packs a ``.bin`` as one stream, as it
packs any token file, so of the index it needs only the id type (which a ``.bin`` alone cannot
say) and the byte count the ``.bin`` must have, which tells a truncated or mismatched pair.

Index layout, little-endian: the 9-byte magic, version (u64), dtype code (u8), sequence count N
(u64), document-index count D (u64), N sequence lengths (i32, tokens), N sequence pointers
(i64, byte offsets into the ``.bin``), D document indices (i64: the first sequence of each
document, then N; so D is the document count plus one).
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
_FIXED = struct.Struct("<9sQBQQ")
"""magic, version, dtype code, sequence count, document-index count: 34 bytes."""

DTYPE_CODES: dict[int, np.dtype] = {code: np.dtype(name) for code, name in (
    (1, "uint8"), (2, "int8"), (3, "int16"), (4, "int32"), (5, "int64"), (6, "float64"),
    (7, "float32"), (8, "uint16"))}
"""Megatron's ``DType`` codes (it has no uint32: vocabularies over 65,536 are written int32)."""


class NotAnIndex(ValueError):
    """The ``.idx`` file is not a Megatron index orch can read (the message says how)."""


@dataclass(frozen=True)
class IndexHeader:
    """What an ``.idx`` says of its ``.bin``."""

    dtype: np.dtype
    sequences: int
    documents: int
    data_bytes: int
    """The size the ``.bin`` must have: the last sequence's pointer plus its length in bytes."""


def index_beside(bin_path: Path) -> Path | None:
    """The ``.idx`` of the same name beside a ``.bin`` file, if there is one."""
    idx = bin_path.with_suffix(".idx")
    return idx if bin_path.suffix.lower() == ".bin" and idx.is_file() else None


def megatron_prefix(value: str) -> Path | None:
    """``PREFIX.bin`` where ``value`` is a Megatron data prefix (``--data-path``'s form: the
    pair's common name, no suffix) with both files there; else None. A directory of the
    prefix's name may be there too: Megatron keeps its sample-index cache in ``PREFIX/cache``."""
    path = Path(value).expanduser()
    data = path.with_name(path.name + ".bin")
    return data if data.is_file() and path.with_name(path.name + ".idx").is_file() else None


def typed_by_config(value: str) -> bool:
    """Whether ``data.token_dtype`` says the type of the ids of the file ``value`` names: a
    ``.bin`` without an index beside it (text, ``.npy`` and indexed pairs say their own)."""
    path = Path(value).expanduser()
    return path.name.lower().endswith(".bin") and index_beside(path) is None


def read_index(idx: Path) -> IndexHeader:
    """The header of ``idx`` and the ``.bin`` size it implies, read from its first 34 bytes and
    the last sequence's length and pointer (an index of a large corpus is never read whole).
    Raises :class:`NotAnIndex` for anything else than a version-1 Megatron index."""
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        fixed = f.read(_FIXED.size)
        if len(fixed) < _FIXED.size or not fixed.startswith(MAGIC):
            raise NotAnIndex("it does not start with Megatron's index magic MMIDIDX")
        _, version, code, sequences, doc_indices = _FIXED.unpack(fixed)
        if version != 1:
            raise NotAnIndex(f"its format version is {version}; orch reads version 1")
        if code not in DTYPE_CODES:
            raise NotAnIndex(f"its dtype code {code} is none of Megatron's "
                             f"({sorted(DTYPE_CODES)})")
        needed = _FIXED.size + 12 * sequences + 8 * doc_indices
        if size < needed:
            raise NotAnIndex(f"it has {size:,} bytes where its counts ({sequences:,} sequences, "
                              f"{doc_indices:,} document indices) need {needed:,}: truncated")
        dtype = DTYPE_CODES[code]
        data_bytes = 0
        if sequences:
            f.seek(_FIXED.size + 4 * (sequences - 1))
            (length,) = struct.unpack("<i", f.read(4))
            f.seek(_FIXED.size + 4 * sequences + 8 * (sequences - 1))
            (pointer,) = struct.unpack("<q", f.read(8))
            data_bytes = pointer + length * dtype.itemsize
    return IndexHeader(dtype, sequences, max(0, doc_indices - 1), data_bytes)


SEQUENCE_MAX = (1 << 31) - 1
"""The longest sequence an index holds (its lengths are int32)."""


class IndexWriter:
    """Collects document lengths as ids are written to a ``.bin``, then writes the ``.idx``
    Megatron reads beside it.

    Each document is one sequence, as Megatron's ``preprocess_data.py`` writes without
    ``--split-sentences``: Megatron's GPTDataset shuffles sequences, so a document written as
    several (the pieces a long text file is tokenized in) would be trained out of order there.
    Only a document longer than an int32 length is split."""

    def __init__(self, dtype: np.dtype) -> None:
        codes = {known: code for code, known in DTYPE_CODES.items()}
        if np.dtype(dtype) not in codes:
            raise ValueError(f"Megatron's index has no code for {dtype}")
        self.code = codes[np.dtype(dtype)]
        self.itemsize = np.dtype(dtype).itemsize
        self.lengths = array("i")
        self.document_starts = array("q", [0])
        self._open = 0  # ids of the document being written

    def add(self, length: int, ends_document: bool) -> None:
        """``length`` more ids of the current document, written to the ``.bin`` after the
        previous ones; ``ends_document``: they end it."""
        self._open += length
        if ends_document:
            self._close()

    def _close(self) -> None:
        while self._open > SEQUENCE_MAX:
            self.lengths.append(SEQUENCE_MAX)
            self._open -= SEQUENCE_MAX
        self.lengths.append(self._open)
        self._open = 0
        self.document_starts.append(len(self.lengths))

    def write(self, path: Path) -> None:
        """The index file, synced to disk: a document still open (no end seen) is closed
        first."""
        if self._open:
            self._close()
        lengths = np.frombuffer(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.itemsize, out=pointers[1:])
        with open(path, "wb") as f:
            f.write(_FIXED.pack(MAGIC, 1, self.code, len(lengths), len(self.document_starts)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.frombuffer(self.document_starts, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
