"""Input pipeline: TFRecord shards -> `tf.data` batches of windowed LR/HR pairs.

Training batches (`train_dataset`): dict with
    lr: float32 [batch, p/4, p/4, 1] in [0, 1]
    hr: float32 [batch, p, p, 1] in [0, 1]
randomly flipped / rotated by 90 degrees (the same transform for LR and HR),
shuffled, repeated forever. With a seed the stream is one fixed sequence:
the order comes from seeded shuffles and a deterministic interleave, and each
patch's transform is a keyed hash of its position in the stream, so
`train_dataset(..., seed=s, start=n)` yields exactly what the stream with seed
`s` yields after its first `n` patches (how a resumed run continues its input
where the checkpoint left it). Records are parsed a whole batch at a time, and
the flips and the windowing of a batch run as one XLA-compiled function (timings
in docs/benchmarks.md).

Evaluation slices (`eval_dataset`): one whole slice per element, with its
mask and the record's pseudonymous identifiers for per-slice reports.

Under `tf.distribute`, pass the `tf.distribute.InputContext` (from
`strategy.distribute_datasets_from_function`): each input pipeline then reads
its own subset of shard files and batches `global_batch / replicas`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import tensorflow as tf

from tfgan_ct.config import Config
from tfgan_ct.data.shards import FORMAT, FORMAT_VERSION, MANIFEST
from tfgan_ct.errors import TfganError

log = logging.getLogger("tfgan_ct.data.pipeline")

AUTOTUNE = tf.data.AUTOTUNE


class DataError(TfganError, RuntimeError):
    """A dataset folder that cannot be read (no manifest, no shards for a split)."""


def load_manifest(data_dir: str | Path) -> dict:
    """The dataset's manifest.json, checked to be one of ours."""
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{data_dir}: no {MANIFEST}; make the dataset with `tfgan-ct convert`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a tfgan-ct dataset manifest")
    if manifest.get("format_version", 1) > FORMAT_VERSION:
        raise DataError(f"{path}: dataset format version {manifest['format_version']} is newer than "
                        f"this tfgan-ct reads ({FORMAT_VERSION}); upgrade tfgan-ct")
    return manifest


def manifest_sha256(manifest: dict) -> str:
    """SHA-256 (hex) of a dataset's manifest as loaded, keys sorted: how exports and model cards
    name the data they were trained or scored on."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def shard_files(data_dir: str | Path, split: str, modality: str, manifest: dict | None = None) -> list[str]:
    """Paths of the shards of `split` holding `modality`, checked to exist.

    `manifest`: the dataset's already loaded manifest (read from `data_dir` when None).
    """
    manifest = manifest or load_manifest(data_dir)
    files = [str(Path(data_dir) / s["file"]) for s in manifest["shards"].get(split, [])
             if s["modality"] == modality]
    if not files:
        have = sorted({s["modality"] for s in manifest["shards"].get(split, [])})
        raise DataError(f"{data_dir}: no {split} shards of modality {modality!r} "
                        f"(this dataset has: {', '.join(have) or 'none'})")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: shard listed in the manifest is missing")
    return files


def augment(lr: tf.Tensor, hr: tf.Tensor, seed: int = 0, first: int = 0) -> tuple[tf.Tensor, tf.Tensor]:
    """Pseudo-random flip/rotation by 90 degrees per example (one of the 8 dihedral transforms).

    lr: [b, h, h, 1], hr: [b, 4h, 4h, 1] (square patches). The same transform is
    applied to the LR and HR of an example (see `_dihedral`); example i gets
    the transform of stream position `first + i` under `seed` (`_keyed_choice`).
    """
    choice = _keyed_choice(first + tf.range(tf.shape(hr)[0], dtype=tf.int64), seed)
    return _dihedral(lr[..., 0], choice)[..., None], _dihedral(hr[..., 0], choice)[..., None]


def _keyed_choice(positions: tf.Tensor, seed: int) -> tf.Tensor:
    """One of the 8 dihedral transforms for each stream position (int64 [b] -> int32 [b] in 0..7).

    A keyed hash (SipHash, keyed by the seed) of the position rather than a
    random op: the transform of a patch depends only on where it sits in the
    stream, not on how many batches a parallel `map` has drawn before it, so
    a stream started part-way (`train_dataset(start=n)`) continues exactly.
    """
    key = [seed % 2**64, 0x7466_6761_6E2D_6374]  # second half of the key: a fixed salt
    return tf.cast(tf.strings.to_hash_bucket_strong(tf.strings.as_string(positions), 8, key), tf.int32)


def _dihedral(x: tf.Tensor, choice: tf.Tensor) -> tf.Tensor:
    """Transform `choice[i]` of the dihedral group applied to each square x[i] ([b, h, h]).

    Bit 0 of the choice flips left-right, bit 1 up-down, bit 2 transposes; the
    eight combinations are the eight transforms. Working on [b, h, w] matters
    without XLA: with a trailing channel of 1, TensorFlow's reverse along the
    width is several times slower.
    """
    def bit(n):
        return tf.not_equal(tf.bitwise.bitwise_and(choice, n), 0)[:, None, None]

    x = tf.where(bit(1), tf.reverse(x, [2]), x)
    x = tf.where(bit(2), tf.reverse(x, [1]), x)
    return tf.where(bit(4), tf.transpose(x, [0, 2, 1]), x)


@tf.function(jit_compile=True)
def _augment_and_window(lr, hr, choice, floor, inverse_width, augment: bool):
    """Training batch from decoded records: lr [b, l, l] float32 HU and hr [b, p, p] int16 HU
    -> (lr, hr) [b, ., ., 1] in [0, 1], flipped by `choice` when `augment`.

    One XLA function: the flips, the cast and the window fuse into one pass.
    """
    if augment:
        lr, hr = _dihedral(lr, choice), _dihedral(hr, choice)

    def window(x):
        return tf.clip_by_value((tf.cast(x, tf.float32) - floor) * inverse_width, 0.0, 1.0)[..., None]

    return window(lr), window(hr)


def train_dataset(data_dir: str | Path, modality: str, cfg: Config,
                  input_context: tf.distribute.InputContext | None = None,
                  seed: int | None = None, start: int = 0,
                  workers: int = 1, worker: int = 0) -> tf.data.Dataset:
    """Endless shuffled, augmented training batches of `modality` (see the module docstring).

    Distribution: pass either the `input_context` (per-replica batches) or,
    for a dataset of global batches that Keras hands to `tf.distribute`, the
    number of training processes `workers` and this one's index `worker`.
    Each worker reads its own shard files, or, with fewer files than workers,
    every `workers`-th record of all of them; TensorFlow's own auto-sharding is
    off (it refuses this pipeline by file, and fails outright with too few
    files). Either way one step takes `patches_per_step` patches of the stream.

    seed: fixes the stream (None: a different, faster non-deterministic order
    on every call). start: patches of this worker's stream to skip first; they
    are read and shuffled, not decoded, so skipping runs at about the raw read
    speed (see docs/benchmarks.md). Needs a seed.
    """
    if start and seed is None:
        raise ValueError("train_dataset: start needs a seed (an unseeded stream cannot be continued)")
    if start < 0:
        raise ValueError(f"train_dataset: start must be >= 0, got {start}")
    hash_seed = seed if seed is not None else random.SystemRandom().getrandbits(63)
    manifest = load_manifest(data_dir)
    files = shard_files(data_dir, "train", modality, manifest)
    patch, scale = manifest["patch_size"], manifest["scale"]
    window = cfg.modalities.get(modality).window
    batch = cfg.data.batch_size
    if input_context is not None:
        batch = input_context.get_per_replica_batch_size(batch)
        workers, worker = input_context.num_input_pipelines, input_context.input_pipeline_id
    ds = _shuffled_records(files, cfg, seed, workers, worker)
    if start:
        ds = ds.skip(start)
    ds = ds.batch(batch, drop_remainder=True).enumerate()

    def parse(index, records):
        # Only what training needs: the images are already masked, so no `mask`.
        parsed = tf.io.parse_example(records, {"hr": tf.io.FixedLenFeature([], tf.string),
                                               "lr": tf.io.FixedLenFeature([], tf.string)})
        # -1, not `batch`: tf.distribute may rebatch the dataset per replica.
        hr = tf.reshape(tf.io.decode_raw(parsed["hr"], tf.int16), [-1, patch, patch])
        lr = tf.reshape(tf.io.decode_raw(parsed["lr"], tf.float32), [-1, patch // scale, patch // scale])
        positions = start + index * batch + tf.range(tf.shape(hr)[0], dtype=tf.int64)
        lr, hr = _augment_and_window(lr, hr, _keyed_choice(positions, hash_seed), window.floor,
                                     1.0 / window.width, augment=cfg.data.augment)
        return {"lr": lr, "hr": hr}

    ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=seed is not None)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(AUTOTUNE)


def _shuffled_records(files: list[str], cfg: Config, seed: int | None, workers: int,
                      worker: int) -> tf.data.Dataset:
    """Serialised records of this `worker`'s part of `files`, endless: shard files shuffled
    and interleaved, then the records shuffled. With fewer files than `workers`, every
    worker reads all files and keeps every `workers`-th record."""
    by_file = len(files) >= workers
    if workers > 1 and not by_file:
        log.warning("%d shard file(s) for %d workers: each worker reads all of them and keeps "
                    "every %d-th record", len(files), workers, workers)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if workers > 1 and by_file:
        ds = ds.shard(workers, worker)
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(cfg.data.cycle_length, len(files)),
                       num_parallel_calls=AUTOTUNE, deterministic=seed is not None)
    if workers > 1 and not by_file:
        ds = ds.shard(workers, worker)
    return ds.shuffle(cfg.data.shuffle_buffer, seed=seed)


def patches_per_step(workers: int, global_batch: int) -> int:
    """Patches of one worker's `train_dataset` stream that one training step consumes.

    Each worker's share of a global batch: `tf.distribute` spreads every global
    batch a worker's dataset yields over `workers` steps (or, with an input
    context, each step takes that worker's replicas' per-replica batches).
    """
    return global_batch // workers


EVAL_FEATURES = {
    "hr": tf.io.FixedLenFeature([], tf.string), "lr": tf.io.FixedLenFeature([], tf.string),
    "mask": tf.io.FixedLenFeature([], tf.string),
    "height": tf.io.FixedLenFeature([], tf.int64), "width": tf.io.FixedLenFeature([], tf.int64),
    "scale": tf.io.FixedLenFeature([], tf.int64),
    "patient": tf.io.FixedLenFeature([], tf.string), "series": tf.io.FixedLenFeature([], tf.string),
    "slice_index": tf.io.FixedLenFeature([], tf.int64),
}


def eval_dataset(data_dir: str | Path, split: str, modality: str, cfg: Config) -> tf.data.Dataset:
    """Whole slices of `split` ('validation' or 'test') in file order, one per element.

    Elements: lr [h, w, 1] and hr [4h, 4w, 1] in [0, 1], mask [4h, 4w, 1] bool,
    patient / series (pseudonymous hashes), slice_index.
    """
    window = cfg.modalities.get(modality).window
    manifest = load_manifest(data_dir)
    files = shard_files(data_dir, split, modality, manifest)
    packed_mask = manifest.get("format_version", 1) >= 2

    def parse(record):
        ex = tf.io.parse_single_example(record, EVAL_FEATURES)
        h, w, s = ex["height"], ex["width"], ex["scale"]
        hr = tf.reshape(tf.io.decode_raw(ex["hr"], tf.int16), tf.stack([h, w, 1]))
        lr = tf.reshape(tf.io.decode_raw(ex["lr"], tf.float32), tf.stack([h // s, w // s, 1]))
        mask = tf.io.decode_raw(ex["mask"], tf.uint8)
        if packed_mask:  # 8 pixels per byte, first pixel in the high bit
            shifts = tf.constant([7, 6, 5, 4, 3, 2, 1, 0], tf.uint8)
            mask = tf.reshape(tf.bitwise.right_shift(mask[:, None], shifts) & 1,
                              [-1])[:h * w]
        mask = tf.reshape(mask, tf.stack([h, w, 1])) > 0
        return {"lr": window.to_unit(tf.cast(lr, tf.float32)), "hr": window.to_unit(tf.cast(hr, tf.float32)),
                "mask": mask,
                "patient": ex["patient"], "series": ex["series"], "slice_index": ex["slice_index"]}

    return tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
