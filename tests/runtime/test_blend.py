"""``data.blend``: several files mixed by weight, each file's share exact at every step, each
file's samples a fresh permutation per epoch of its own, independent of the rank count, and
resumable."""

from __future__ import annotations

import numpy as np
import pytest

from orch.config import load_config
from orch.errors import ConfigError
from orch.runtime.blend import BlendedSequences, BlendStream
from orch.runtime.data import DataError, PackedSequences

SEQ = 4
SIZES = (13, 50, 7)  # samples per file; the last wraps several epochs within a few steps
WEIGHTS = (0.5, 0.3, 0.2)


def blended() -> BlendedSequences:
    """Three files whose ids say which file and sample they come from: file ``f``'s sample
    ``i`` holds ``1000 * f + i`` (its boundary token too), so each sample reads back as
    ``(file, index)``."""
    parts = [PackedSequences(np.repeat(1000 * f + np.arange(n + 1), SEQ)[: n * SEQ + 1], SEQ)
             for f, n in enumerate(SIZES)]
    return BlendedSequences(parts, list(WEIGHTS))


def drawn(stream: BlendStream, steps: int) -> list[tuple[int, int]]:
    """The (file, sample) of every sample of the next ``steps`` global batches, on every rank
    of ``stream``'s (it is rank 0 of its dp_size; the others are built alike)."""
    out = []
    for _ in range(steps):
        inputs = [inputs for inputs, _ in stream.next_step()]
        out += [(int(row[0]) // 1000, int(row[0]) % 1000) for batch in inputs for row in batch]
    return out


def streams(dp_size: int, seed: int = 0) -> list[BlendStream]:
    return [BlendStream(blended(), 8, 2, rank, dp_size, seed) for rank in range(dp_size)]


def global_order(dp_size: int, steps: int) -> list[tuple[int, int]]:
    ranks = streams(dp_size)
    out = []
    for _ in range(steps):
        out += [pair for stream in ranks for pair in drawn(stream, 1)]
    return out


def test_each_files_share_is_within_one_sample_of_its_weight_after_every_sample():
    order = global_order(1, 30)
    counts = np.zeros(3)
    for n, (part, _) in enumerate(order, start=1):
        counts[part] += 1
        assert np.all(np.abs(counts - np.array(WEIGHTS) * n) < 1 + 1e-9), (n, counts)


@pytest.mark.parametrize("weights", [[1, 1, 1, 1, 7, 7], [5, 1], [1] * 9 + [20, 3]])
def test_the_share_bound_holds_where_the_furthest_behind_rule_breaks_it(weights):
    """Picking the file furthest below its share let file 5 of [1,1,1,1,7,7] fall 1.06 samples
    behind after 31 samples; Tijdeman's rule keeps every file within 1 - 1/(2k-2)."""
    from orch.runtime.blend import blend_picks

    w = np.array(weights, dtype=float) / sum(weights)
    counts = np.zeros(len(w))
    for n, part in enumerate(blend_picks(w, np.zeros(len(w), dtype=np.int64), 500), start=1):
        counts[part] += 1
        assert np.abs(counts - w * n).max() <= 1 - 1 / (2 * len(w) - 2) + 1e-9, (n, counts)


def test_each_file_gives_a_fresh_permutation_of_its_samples_every_epoch():
    order = global_order(1, 50)
    for part, size in enumerate(SIZES):
        mine = [index for p, index in order if p == part]
        epochs = [mine[start:start + size] for start in range(0, len(mine) - size + 1, size)]
        assert len(epochs) >= 2
        assert all(sorted(epoch) == list(range(size)) for epoch in epochs)
        assert epochs[0] != epochs[1]  # reshuffled (7! orders: equal by chance 1 in 5,040)


def test_the_global_order_does_not_depend_on_the_number_of_ranks():
    assert global_order(1, 12) == global_order(2, 12) == global_order(4, 12)


def test_the_samples_are_the_files_own():
    data = blended()
    inputs, targets = data.gather(np.array([63, 0, 20]))  # file 1's 50th, file 0's 0th, ...
    assert inputs[:, 0].tolist() == [2000 + 0, 0, 1000 + 7]
    expected = data.parts[2].gather(np.array([0]))
    assert inputs[0].tolist() == expected[0][0].tolist()
    assert targets[0].tolist() == expected[1][0].tolist()


def test_a_resume_continues_exactly_on_another_number_of_ranks():
    whole = global_order(1, 20)
    first = streams(1)[0]
    drawn(first, 7)
    state = first.state_dict()
    assert state["blend_taken"] == [28, 17, 11] and sum(state["blend_taken"]) == 7 * 8
    resumed = streams(2)
    for stream in resumed:
        stream.load_state_dict(state)
    rest = []
    for _ in range(13):
        rest += [pair for stream in resumed for pair in drawn(stream, 1)]
    assert whole[7 * 8:] == rest


def test_a_resume_onto_other_files_or_a_damaged_position_is_refused():
    stream = streams(1)[0]
    drawn(stream, 2)
    state = stream.state_dict()
    other = BlendStream(BlendedSequences(blended().parts[:2], [0.5, 0.5]), 8, 2)
    with pytest.raises(DataError, match=r"its files now give \[13, 50\] samples of "
                       r"train.seq_len=4, but the checkpoint's gave \[13, 50, 7\]"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match=r"blend position \[8, 5, 4\] is not one this blend "
                       "reaches"):
        streams(1)[0].load_state_dict({**state, "blend_taken": [8, 5, 4]})
    with pytest.raises(DataError, match="train.seed: 1, but the checkpoint's data order came "
                       "from seed 0"):
        streams(1, seed=1)[0].load_state_dict(state)


@pytest.mark.parametrize(("overrides", "said"), [
    (['data.blend=["0.5 a.bin", "b.txt"]'],
     "data.blend[1]: 'b.txt' is not a weight and a path"),
    (['data.blend=["-1 a.txt"]'], "data.blend[0]: '-1 a.txt': its weight -1 is not a positive"),
    (['data.blend=["nan a.txt"]'], "data.blend[0]: 'nan a.txt': its weight nan is not a"),
    (['data.blend=["1 a.txt"]', "data.path=b.txt"],
     "data.path: 'b.txt' is set beside data.blend, which replaces it"),
    (['data.blend=["1 a.txt", "2 ids.bin"]', "model.vocab_size=70000"],
     "data.token_dtype: uint16 for a .bin file (data.blend[1]) of a model"),
    (['data.blend=["x", "2 ids.bin"]', "model.vocab_size=70000"],  # in place after a bad one
     "data.token_dtype: uint16 for a .bin file (data.blend[1]) of a model"),
    (['data.blend=["1 a.bin", "x b.bin"]', "model.vocab_size=70000"],  # not hidden by the
     "data.token_dtype: uint16 for a .bin file (data.blend[0]) of a model"),  # refused one
    (['data.blend=["1 a.txt"]', "data.format=tokens"],  # read as text all the same
     "data.format: 'tokens' beside data.blend, whose files read as their suffixes say"),
])
def test_blend_entries_are_checked_with_the_config(overrides, said):
    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny.yaml", overrides)
    assert said in str(info.value) and "fix:" in str(info.value)


def test_weights_are_relative_and_a_path_may_hold_spaces():
    from orch.config.blend import parse_blend

    assert parse_blend(["3 /data/my corpus.txt", "1 b"]) == (
        [(0.75, "/data/my corpus.txt"), (0.25, "b")], [])
    # their sum overflowed to infinity: every weight 0, an even mix trained without a word;
    # and one too small beside the others is 0, never drawn: said
    pairs, problems = parse_blend(["1e308 a", "1e308 b", "1 c"])
    assert [w for w, _ in pairs] == pytest.approx([0.5, 0.5, 0.0], abs=1e-300)
    assert problems == []
    problems = parse_blend(["1e308 a", "1e-300 b"])[1]
    assert [p.where for p in problems] == ["data.blend[1]"]
    assert "its weight is 0 beside the others'" in problems[0].message


def test_every_files_ids_beyond_the_vocabulary_are_said_together_by_the_workers(tmp_path):
    from orch.errors import ProblemsError
    from orch.runtime.blend import training_stream

    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / name, np.full(100, 300, dtype=np.uint16))
    cfg = load_config("configs/tiny.yaml", [
        f'data.blend=["1 {tmp_path}/a.npy", "1 {tmp_path}/b.npy"]', "train.seq_len=8",
        "train.global_batch=2"])
    with pytest.raises(ProblemsError) as info:
        training_stream(cfg, 0, 1, None)
    said = [str(p) for p in info.value.problems]
    assert len(said) == 2 and all("contains token id 300" in one for one in said)
    assert f"{tmp_path}/a.npy" in said[0] and f"{tmp_path}/b.npy" in said[1]


def test_a_blend_file_a_rank_cannot_read_is_named_as_the_blends(tmp_path, monkeypatch):
    from orch.config import DataConfig
    from orch.runtime import data as data_module
    from orch.runtime.parallelize import _data_identity

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data_module, "_sampled", unreadable)
    (tmp_path / "b.txt").write_text("text")
    problems: list[str] = []
    _data_identity(DataConfig(blend=[f"1 {tmp_path}/b.txt"]), problems)
    assert problems == [f"data.blend: '{tmp_path}/b.txt' cannot be read (Permission denied)"]
