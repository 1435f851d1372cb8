"""The grain training pipeline: global sharded batches, exact iterator resume, corrupt records
skipped and counted, and every source kind yielding the same record layout."""

import itertools
import subprocess
import sys

import jax
import numpy as np
import pytest

from big_contrast import sharding
from big_contrast.data import pipeline, sources, synthetic, tokenizers, transforms
from big_contrast.data.position import StreamPosition, rebase, share_index
from big_contrast.data.spec import BatchSpec, ImageView
from tests.helpers import REPO, tiny_clip_config, write_png_manifest

SPEC = BatchSpec(views=(ImageView(16),), text=True, labels=("shape",))


def _tokenizer():
    return tokenizers.get_tokenizer("words", 12, 256)


def _mesh(devices=1):
    return sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1}, jax.devices()[:devices])


def _batches(data_config, spec=SPEC, batch=8, seed=0, devices=1):
    return pipeline.TrainBatches(data_config, spec, _tokenizer(), batch, seed, _mesh(devices))


def _take(batches, n, key="image"):
    try:
        return [np.asarray(next(batches)[key]) for _ in range(n)]
    finally:
        batches.close()


def test_batches_are_global_arrays_split_over_the_data_axis():
    config = tiny_clip_config()
    data = _batches(config.data, devices=8)
    try:
        batch = next(data)
    finally:
        data.close()
    assert data.skipped_total == 0 and data.read == 8 and len(jax.devices()) == 8
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (8, 12) and batch["shape"].shape == (8,)
    assert len(batch["image"].sharding.device_set) == 8
    assert batch["image"].addressable_shards[0].data.shape == (1, 16, 16, 3)


def test_seeded_shuffle_is_deterministic_and_seed_dependent():
    config = tiny_clip_config()
    first = _take(_batches(config.data, seed=1), 3, "text")
    again = _take(_batches(config.data, seed=1), 3, "text")
    other = _take(_batches(config.data, seed=2), 3, "text")
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other))


def test_position_resumes_exactly_despite_prefetching():
    config = tiny_clip_config(**{"data.prefetch": 3})
    data = _batches(config.data)
    for _ in range(3):
        next(data)
    state = data.get_state()  # the thread has already prepared batches 4..6
    expected = _take(data, 3)
    resumed = _batches(config.data)
    resumed.set_state(state)
    got = _take(resumed, 3)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)
    with pytest.raises(RuntimeError, match="set_state after prefetching"):
        resumed.set_state(state)


def test_worker_processes_give_the_same_batches_and_positions_carry_across_worker_counts():
    config = tiny_clip_config()
    in_process = _take(_batches(config.data), 5)
    config.data.num_workers = 2
    in_workers = _batches(config.data)
    for expected in in_process[:3]:  # workers decode, the main process batches in order
        np.testing.assert_array_equal(np.asarray(next(in_workers)["image"]), expected)
    state = in_workers.get_state()
    in_workers.close()
    config.data.num_workers = 0  # resume a position saved with two workers without any
    resumed = _batches(config.data)
    resumed.set_state(state)
    for expected, got in zip(in_process[3:], _take(resumed, 2), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_augmentation_is_seeded_by_the_global_stream_position():
    config = tiny_clip_config(**{"data.augment.crop_scale": "(0.3, 1.0)", "data.augment.flip": "true"})
    spec = BatchSpec(views=(ImageView(16, (0.3, 1.0), True),), text=True)
    stream = pipeline.example_stream(sources.build_source(config.data, "train"), config.data,
                                     spec, _tokenizer(), seed=0)
    examples = list(itertools.islice(iter(stream), 12))
    later = list(itertools.islice(iter(pipeline.example_stream(
        sources.build_source(config.data, "train"), config.data, spec, _tokenizer(), seed=0,
        start=7)), 5))
    for a, b in zip(examples[7:], later, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_corrupt_manifest_records_are_skipped_and_counted(tmp_path):
    manifest = write_png_manifest(tmp_path, 24, corrupt=4)
    config = tiny_clip_config(**{"data.source": "manifest", "data.path": manifest,
                                 "data.shuffle": "false", "data.max_corrupt_fraction": "0.2"})
    spec = BatchSpec(views=(ImageView(16),), text=True)
    data = _batches(config.data, spec, batch=10)
    images = _take(data, 3)
    # 20 good + 4 corrupt per epoch, in order: 30 good images read, 4 corrupt ones skipped.
    assert data.skipped == {"undecodable_image": 4} and data.read == 34
    assert all(image.shape == (10, 16, 16, 3) for image in images)


def test_manifest_reports_missing_columns(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"file": "a.png", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"no column\(s\) \['caption', 'image'\]"):
        sources.ManifestSource(str(path))


def test_array_record_tool_packs_a_source_that_reads_back_identically(tmp_path):
    output = tmp_path / "val.array_record"
    subprocess.run([sys.executable, "tools/build_array_record.py", "--config",
                    "configs/clip.py:demo", "--split", "val", "--output", str(output),
                    "--num_records", "12", "--shards", "2"], check=True, cwd=REPO,
                   capture_output=True)
    packed = sources.ArrayRecordSource(str(tmp_path / "val.array_record-*"))
    world = synthetic.SyntheticWorld("val")
    assert len(packed) == 12
    for index in range(12):
        # Shards are written round-robin and read back in file order.
        original = world[(index % 6) * 2 + index // 6]
        record = packed[index]
        np.testing.assert_array_equal(transforms.decode_image(record), original["image"])
        assert record["caption"] == original["caption"]
        assert record["shape"] == original["shape"] and record["colour"] == original["colour"]


def _read_shares(position, layout, consumed, batch_size):
    """The stream places each process of ``layout`` consumed: the first consumed[p] of its share."""
    return [[position.place(share_index(np.asarray(rows), batch_size, j)) for j in range(k)]
            for rows, k in zip(layout, consumed)]


def test_a_position_rebased_onto_another_layout_repeats_and_leaves_out_no_record():
    batch = 8
    two = [tuple(range(0, 4)), tuple(range(4, 8))]  # 2 processes, 4 rows each
    four = [(0, 1), (2, 3), (4, 5), (6, 7)]
    # 5 steps on two processes, process 1 skipped 3 corrupt records (it reads 3 places ahead);
    # then 6 steps on four processes, process 0 skipped 1; then 2 steps on two again.
    stages = [(two, [5 * 4, 5 * 4 + 3]), (four, [6 * 2 + 1, 12, 12, 12]), (two, [8, 8])]
    position, places = StreamPosition(), []
    for layout, consumed in stages:
        places += [p for share in _read_shares(position, layout, consumed, batch) for p in share]
        position = rebase(position, layout, consumed, batch)
    assert len(places) == len(set(places))  # no record read twice
    assert set(places) == set(range(len(places)))  # and none left out
    assert position.place(0) == len(places)


def test_without_skipped_records_a_rebased_position_is_the_uninterrupted_order():
    batch, two, one = 8, [tuple(range(4)), tuple(range(4, 8))], [tuple(range(8))]
    after = rebase(StreamPosition(), two, [3 * 4, 3 * 4], batch)
    assert after == StreamPosition((), 3 * batch)
    assert rebase(after, one, [2 * 8], batch) == StreamPosition((), 5 * batch)
