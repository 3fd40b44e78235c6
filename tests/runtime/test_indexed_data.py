"""Megatron's indexed datasets (``NAME.bin`` + ``NAME.idx``) train as they are: written here by
megatron-core's own builder (the reference), read by orch with the type the index names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from orch.config import DataConfig, load_config
from orch.errors import ConfigError
from orch.runtime.data import DataError, load_tokens, token_count
from orch.runtime.indexed import read_index

TINY = Path(__file__).resolve().parents[2] / "configs/tiny.yaml"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # megatron's imports

DOCUMENTS = [[5, 70_000, 9], [1], [65_535, 65_536, 2, 3, 4]]


def megatron_pair(tmp_path: Path, dtype: type = np.int32,
                  documents: list[list[int]] = DOCUMENTS) -> Path:
    """``tmp_path/corpus.{bin,idx}`` as Megatron's preprocess_data.py writes them; returns the
    prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for document in documents:
        builder.add_document(torch.tensor(document), [len(document)])
    builder.finalize(f"{prefix}.idx")
    return prefix


@pytest.mark.parametrize("given", ["corpus.bin", "corpus"])
def test_a_megatron_pair_reads_with_its_index_type_by_file_or_prefix(tmp_path, given):
    """int32 ids (Megatron's type for vocabularies over 65,500) read with data.token_dtype left
    at uint16: read as uint16 they would be two ids each. The prefix is --data-path's form."""
    megatron_pair(tmp_path)
    data = DataConfig(path=str(tmp_path / given), token_dtype="uint16")
    tokens = load_tokens(data, vocab_size=80_000)
    assert tokens.dtype == np.int32 and isinstance(tokens, np.memmap)
    assert tokens.tolist() == [i for document in DOCUMENTS for i in document]
    assert token_count(data) == 9


def test_the_index_header_is_read_without_the_arrays(tmp_path):
    prefix = megatron_pair(tmp_path, np.uint16, [[1, 2], [3, 4, 5]])
    header = read_index(Path(f"{prefix}.idx"))
    assert (header.dtype, header.sequences, header.documents, header.data_bytes) == (
        np.dtype(np.uint16), 2, 2, 10)


def test_a_pair_that_does_not_match_is_refused(tmp_path):
    prefix = megatron_pair(tmp_path)
    data_file = Path(f"{prefix}.bin")
    data_file.write_bytes(data_file.read_bytes()[:-4])  # one id short
    with pytest.raises(DataError) as info:
        load_tokens(DataConfig(path=str(data_file)), vocab_size=80_000)
    said = str(info.value)
    assert "has 32 bytes, but its index corpus.idx says 36 (3 sequences of int32)" in said
    assert "move the .idx away" in said
    Path(f"{prefix}.idx").write_bytes(b"not an index at all, but long enough to be read ...")
    with pytest.raises(DataError) as info:
        load_tokens(DataConfig(path=str(data_file)), vocab_size=80_000)
    assert "corpus.idx beside it, which is not a Megatron index: it does not start" in str(
        info.value)


def test_a_float_index_and_a_half_pair_prefix_are_refused(tmp_path):
    prefix = megatron_pair(tmp_path, np.float32, [[1.0, 2.0]])
    with pytest.raises(DataError, match="its index corpus.idx says the ids are float32"):
        load_tokens(DataConfig(path=str(prefix)), vocab_size=256)
    Path(f"{prefix}.idx").unlink()
    with pytest.raises(DataError, match=r"does not exist \(as a Megatron prefix: corpus.bin is "
                       r"there, but not both .bin and .idx\)"):
        load_tokens(DataConfig(path=str(prefix)), vocab_size=256)


def test_the_uint16_rule_leaves_a_bin_with_an_index_to_its_index(tmp_path):
    """The config rule refusing uint16 for a large vocabulary's .bin must not refuse a file
    whose index types it; without the index it still does."""
    prefix = megatron_pair(tmp_path)
    overrides = [f"data.path={prefix}.bin", "model.vocab_size=128256"]
    assert load_config(TINY, overrides).data.path == f"{prefix}.bin"
    Path(f"{prefix}.idx").unlink()
    with pytest.raises(ConfigError, match="data.token_dtype: uint16 for a .bin file"):
        load_config(TINY, overrides)


def test_a_prefix_reads_beside_megatrons_cache_directory_but_not_beside_a_file_of_its_name(
        tmp_path):
    """Megatron keeps its sample indices in PREFIX/cache: the prefix was refused as "not a
    file" once Megatron had trained on the pair. A file of the prefix's own name is another
    matter: Megatron would read the pair, orch the file, so it is refused, naming both."""
    prefix = megatron_pair(tmp_path)
    (prefix / "cache" / "GPTDataset_indices").mkdir(parents=True)
    assert load_tokens(DataConfig(path=str(prefix)), 80_000).tolist()[:3] == DOCUMENTS[0]
    (prefix / "cache" / "GPTDataset_indices").rmdir()
    (prefix / "cache").rmdir()
    prefix.rmdir()
    prefix.write_text("some text")
    with pytest.raises(DataError, match="(?s)is a file and the prefix of the Megatron pair "
                       r"corpus.bin \+ .idx beside it.*point data.path at corpus.bin"):
        load_tokens(DataConfig(path=str(prefix)), 80_000)


def test_the_index_itself_or_a_prefix_read_as_text_is_told_what_it_is(tmp_path):
    prefix = megatron_pair(tmp_path)
    with pytest.raises(DataError, match="(?s)is the index of a Megatron pair, not its ids.*point "
                       "data.path at corpus.bin or at the prefix corpus"):
        load_tokens(DataConfig(path=f"{prefix}.idx"), 80_000)
    with pytest.raises(DataError, match=f"data.format: 'text', but data.path '{prefix}' is the "
                       r"prefix of the Megatron pair corpus.bin \+ .idx, token ids"):
        load_tokens(DataConfig(path=str(prefix), format="text"), 80_000)


def test_another_index_beside_the_same_ids_is_another_source(tmp_path):
    """The index types the ids, so it is part of the data's identity: an index of another
    type beside the same .bin reads other ids. A checkpoint from before indexes were read has
    no index identity and still resumes."""
    from orch.runtime.data import source_change, source_identity

    prefix = megatron_pair(tmp_path, np.uint16, [[1, 2], [3, 4]])
    data = DataConfig(path=str(prefix))
    saved = source_identity(data)
    assert set(saved) == {"bytes", "sampled_sha256", "index"}
    assert source_change(saved, source_identity(data), data) is None
    old = {key: saved[key] for key in ("bytes", "sampled_sha256")}
    assert source_change(old, source_identity(data), data) is None
    megatron_pair(tmp_path, np.uint8, [[1, 0, 2, 0, 3, 0, 4, 0]])  # the same 8 bytes
    changed = source_change(saved, source_identity(data), data)
    assert changed is not None and "the same ids, but another Megatron .idx beside them" in (
        changed.message)
    by_file = DataConfig(path=f"{prefix}.bin")
    Path(f"{prefix}.idx").unlink()
    gone = source_change(saved, source_identity(by_file), by_file)
    assert gone is not None and "the same ids, but no Megatron .idx beside them now" in (
        gone.message)


def test_fields_nothing_reads_do_not_refuse_a_resume(tmp_path):
    """The field is not read for an indexed pair (nor text, nor .npy): a resume that changed it
    was refused as another config."""
    from types import SimpleNamespace

    from orch.config import Config, config_to_dict
    from orch.runtime.checkpoint.fingerprint import config_changes

    prefix = megatron_pair(tmp_path)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\0" * 8)
    for path, refused in [(f"{prefix}.bin", False), (str(prefix), False), (str(raw), True)]:
        saved = Config(data=DataConfig(path=path, token_dtype="uint16"))
        now = Config(data=DataConfig(path=path, token_dtype="uint32"))
        manifest = SimpleNamespace(config=config_to_dict(saved), data={"source": {"bytes": 1}})
        assert bool(config_changes(manifest, config_to_dict(now))) == refused, path
    # data.eos_id (orch data prepare prints it) matters only to train.document_mask
    saved, now = Config(), Config(data=DataConfig(eos_id=2))
    manifest = SimpleNamespace(config=config_to_dict(saved), data={"source": {"bytes": 1}})
    assert config_changes(manifest, config_to_dict(now)) == []
    now.train.document_mask = True
    assert config_changes(manifest, config_to_dict(now)) == [
        "data.eos_id: -1 -> 2", "train.document_mask: False -> True"]
