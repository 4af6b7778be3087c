"""The hand-written tf.train.Example encoding reads back with TensorFlow's own parsers."""
import numpy as np
import tensorflow as tf

from tfgan_ct.data.shards import RecordMeta, ShardWriter, decode_numpy, encode, read_records


def sample():
    rng = np.random.default_rng(0)
    hr = rng.integers(-1024, 3000, (16, 12)).astype(np.int16)
    lr = rng.random((4, 3)).astype(np.float32) * 100 - 50
    mask = rng.random((16, 12)) > 0.5
    meta = RecordMeta("cta", "train", "a" * 16, "b" * 16, slice_index=300, patch_y=-1, patch_x=2 ** 40,
                      pixel_spacing=(0.43, 0.5))
    return hr, lr, mask, meta


def test_round_trip_through_tensorflow_protobuf():
    hr, lr, mask, meta = sample()
    record = encode(hr, lr, mask, meta, 4)
    ex = tf.train.Example.FromString(record).features.feature
    assert set(ex) == {"hr", "lr", "mask", "height", "width", "scale", "modality", "split", "patient",
                       "series", "slice_index", "patch_y", "patch_x", "pixel_spacing"}
    out = decode_numpy(record)
    np.testing.assert_array_equal(out["hr"], hr)
    np.testing.assert_array_equal(out["lr"], lr)
    np.testing.assert_array_equal(out["mask"], mask)
    assert (out["slice_index"], out["patch_y"], out["patch_x"]) == (300, -1, 2 ** 40)
    assert out["modality"] == "cta" and out["split"] == "train"
    np.testing.assert_allclose(out["pixel_spacing"], (0.43, 0.5), rtol=1e-6)
    parsed = tf.io.parse_single_example(record, {"height": tf.io.FixedLenFeature([], tf.int64),
                                                 "hr": tf.io.FixedLenFeature([], tf.string)})
    assert int(parsed["height"]) == 16
    np.testing.assert_array_equal(tf.io.decode_raw(parsed["hr"], tf.int16).numpy().reshape(16, 12), hr)


def test_mask_is_bit_packed_and_format_1_masks_still_read():
    hr, lr, mask, meta = sample()
    ex = tf.train.Example.FromString(encode(hr, lr, mask, meta, 4))
    assert len(ex.features.feature["mask"].bytes_list.value[0]) == 16 * 12 // 8
    # format version 1: one 0/1 byte per pixel
    ex.features.feature["mask"].bytes_list.value[0] = mask.astype(np.uint8).tobytes()
    np.testing.assert_array_equal(decode_numpy(ex.SerializeToString())["mask"], mask)


def test_writer_rolls_shards_and_renames_atomically(tmp_path):
    hr, lr, mask, meta = sample()
    writer = ShardWriter(tmp_path, "train", "cta", shard_size=2)
    for _ in range(5):
        writer.write(encode(hr, lr, mask, meta, 4))
    shards = writer.close()
    assert [s["records"] for s in shards] == [2, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [s["file"] for s in shards]
    assert all(len(read_records(tmp_path / s["file"])) == s["records"] for s in shards)
