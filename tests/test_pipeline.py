"""The tf.data input pipeline over converted shards."""
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfgan_ct.config import Window
from tfgan_ct.data import pipeline, resize
from tfgan_ct.data.shards import decode_numpy, read_records


def test_train_batches(converted, small_cfg):
    out, _ = converted
    ds = pipeline.train_dataset(out, "ncct", small_cfg, seed=1)
    batch = next(iter(ds))
    assert batch["hr"].shape == (4, 32, 32, 1) and batch["lr"].shape == (4, 8, 8, 1)
    for x in batch.values():
        assert x.dtype == tf.float32 and 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0


def _take(ds, n):
    return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def test_seeded_stream_repeats_and_continues_from_start(converted, small_cfg):
    """The same seed gives the same batches; `start=n` continues the stream after n patches."""
    out, _ = converted
    batch = small_cfg.data.batch_size
    whole = _take(pipeline.train_dataset(out, "ncct", small_cfg, seed=7), 6)
    again = _take(pipeline.train_dataset(out, "ncct", small_cfg, seed=7), 6)
    for a, b in zip(whole, again):
        np.testing.assert_array_equal(a["hr"], b["hr"])
    # Start mid-batch: the continued stream's batches straddle the first one's.
    later = _take(pipeline.train_dataset(out, "ncct", small_cfg, seed=7, start=2 * batch + 1), 3)
    flat = {k: np.concatenate([b[k] for b in whole]) for k in ("lr", "hr")}
    for i, b in enumerate(later):
        lo = 2 * batch + 1 + i * batch
        np.testing.assert_array_equal(b["hr"], flat["hr"][lo:lo + batch])
        np.testing.assert_array_equal(b["lr"], flat["lr"][lo:lo + batch])
    other = _take(pipeline.train_dataset(out, "ncct", small_cfg, seed=8), 6)
    assert not all(np.array_equal(a["hr"], b["hr"]) for a, b in zip(whole, other))


def test_start_needs_a_seed(converted, small_cfg):
    out, _ = converted
    with pytest.raises(ValueError, match="needs a seed"):
        pipeline.train_dataset(out, "ncct", small_cfg, start=4)


def test_keyed_transforms_are_uniform_and_depend_on_seed():
    """All 8 transforms, in about equal shares, independently of neighbouring positions."""
    positions = tf.range(80_000, dtype=tf.int64)
    a = pipeline._keyed_choice(positions, 0).numpy()
    counts = np.bincount(a, minlength=8)
    assert counts.min() > 9_500 and counts.max() < 10_500, counts
    pairs = np.bincount(a[:-1] * 8 + a[1:], minlength=64)  # neighbours are not correlated
    assert pairs.min() > 1_000, pairs
    assert np.mean(a == pipeline._keyed_choice(positions, 1).numpy()) < 0.2


def test_augmentation_keeps_lr_hr_aligned():
    """LR and HR get the same flip/rotation: the LR stays the resize of the HR."""
    hr = np.random.default_rng(0).random((64, 32, 32, 1)).astype(np.float32)
    lr = np.stack([resize.downscale(h[..., 0], 4)[..., None] for h in hr]).astype(np.float32)
    lr_a, hr_a = pipeline.augment(tf.constant(lr), tf.constant(hr), seed=3)
    lr_a, hr_a = lr_a.numpy(), hr_a.numpy()
    changed = 0
    for low, h, h0 in zip(lr_a, hr_a, hr):
        np.testing.assert_allclose(low[..., 0], resize.downscale(h[..., 0], 4), atol=1e-5)
        changed += not np.array_equal(h, h0)
    assert changed > 32  # 7 of 8 transforms change the patch


def test_eval_slices_and_window(converted, small_cfg):
    out, _ = converted
    n = 0
    for item in pipeline.eval_dataset(out, "test", "ncct", small_cfg):
        hr, lr = item["hr"].numpy(), item["lr"].numpy()
        assert hr.shape[0] == 4 * lr.shape[0] and item["mask"].dtype == tf.bool
        assert len(item["patient"].numpy()) == 16
        n += 1
    assert n > 0
    w = Window(40, 80)
    np.testing.assert_allclose(w.to_unit(tf.constant([-100.0, 0.0, 40.0, 200.0])).numpy(), [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(w.to_unit(np.array([-100.0, 0.0, 40.0, 200.0], np.float32)), [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(w.from_unit(tf.constant([0.5])).numpy(), [40.0])
    assert Window.from_dict(w.as_dict()) == w


def _eval_masks(folder, cfg):
    return [item["mask"].numpy()[..., 0] for item in pipeline.eval_dataset(folder, "test", "ncct", cfg)]


def test_eval_masks_match_the_records_and_format_1_still_reads(tmp_path, converted, small_cfg):
    """Masks are bit-packed since format 2; a format-1 dataset (a byte per pixel) still reads."""
    out, _ = converted
    files = pipeline.shard_files(out, "test", "ncct")
    expected = [r["mask"] for f in files for r in read_records(f)]
    got = _eval_masks(out, small_cfg)
    assert len(got) == len(expected) and all(np.array_equal(g, e) for g, e in zip(got, expected))
    assert any(m.any() and not m.all() for m in got)

    old = tmp_path / "v1"
    old.mkdir()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    for f in files:
        with tf.io.TFRecordWriter(str(old / Path(f).name)) as writer:
            for record in tf.data.TFRecordDataset(f):
                ex = tf.train.Example.FromString(record.numpy())
                h, w = (ex.features.feature[k].int64_list.value[0] for k in ("height", "width"))
                mask = decode_numpy(record.numpy())["mask"]
                ex.features.feature["mask"].bytes_list.value[0] = mask.astype(np.uint8).tobytes()
                assert mask.shape == (h, w)
                writer.write(ex.SerializeToString())
    got_v1 = _eval_masks(old, small_cfg)
    assert all(np.array_equal(g, e) for g, e in zip(got_v1, expected))

    manifest["format_version"] = 99
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(pipeline.DataError, match="format version 99 is newer"):
        pipeline.load_manifest(old)


def test_distributed_input_reads_disjoint_files(converted, small_cfg):
    out, _ = converted
    files = pipeline.shard_files(out, "train", "ncct")
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0, num_replicas_in_sync=2)
    batch = next(iter(pipeline.train_dataset(out, "ncct", small_cfg, input_context=ctx, seed=0)))
    assert batch["hr"].shape[0] == 2  # global batch 4 over two replicas
    assert len(files) >= 1


def test_missing_dataset_and_modality(tmp_path, converted, small_cfg):
    with pytest.raises(pipeline.DataError, match="no manifest.json"):
        pipeline.load_manifest(tmp_path)
    out, _ = converted
    with pytest.raises(pipeline.DataError, match="no train shards of modality 'natural'"):
        pipeline.shard_files(out, "train", "natural")


def test_augmentation_reaches_all_eight_transforms():
    patch = np.arange(64, dtype=np.float32).reshape(1, 8, 8, 1)
    hr = np.repeat(np.kron(patch, np.ones((1, 4, 4, 1), np.float32)), 128, axis=0)
    lr = np.repeat(patch, 128, axis=0)
    lr_a, hr_a = pipeline.augment(tf.constant(lr), tf.constant(hr), seed=5)
    variants = {a.tobytes() for a in lr_a.numpy()}
    expected = set()
    for k in range(4):
        rotated = np.rot90(patch[0, ..., 0], k)
        expected |= {rotated.tobytes(), np.fliplr(rotated).copy().tobytes()}
    assert variants == {np.ascontiguousarray(e).tobytes() for e in map(
        lambda b: np.frombuffer(b, np.float32).reshape(8, 8), expected)}
