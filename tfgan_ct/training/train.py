"""`tfgan-ct train`: one stage of the chain, with warm start, checkpoints and export.

    natural -> ncct -> ctp -> cta     (default warm start: the stage before; natural: none)

A run lives in `runs/<stage>-<id>/`, where the id is a hash of what defines
the run (stage, dataset manifest, configuration, warm-start source): running
the same command again resumes from its newest checkpoint, or reports the
export of a run that already finished. The run folder holds `checkpoints/`,
`tensorboard/`, `config.yaml` and `train.log`.

Distribution: `MultiWorkerMirroredStrategy` when `TF_CONFIG` names several
workers, `MirroredStrategy` over the visible GPUs (`--gpus N` to use fewer)
when there are two or more, otherwise the default strategy (one GPU or CPU).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfgan_ct.data import pipeline
from tfgan_ct.deploy import export
from tfgan_ct.evaluation import metrics
from tfgan_ct.config import Config
from tfgan_ct.model.discriminator import build_discriminator
from tfgan_ct.fileio import atomic_write_text
from tfgan_ct.model.gan import TransferGAN
from tfgan_ct.logs import log_to_file
from tfgan_ct.model.generator import build_generator
from tfgan_ct.model.vgg import FeatureExtractorError, build_feature_extractor, check_weights_setting
from tfgan_ct.errors import TfganError
from tfgan_ct.stages import PARENT, STAGES

log = logging.getLogger("tfgan_ct.training.train")



class TrainingError(TfganError, RuntimeError):
    """Training cannot start or cannot go on (bad warm start, non-finite loss, ...)."""


@dataclass
class TrainResult:
    """Where a finished run left its outputs."""

    run_dir: Path
    export_dir: Path
    steps: int
    resumed_from: int


def choose_strategy(gpus: int | None = None) -> tf.distribute.Strategy:
    """The distribution strategy for this machine (see the module docstring)."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    workers = tf_config.get("cluster", {}).get("worker", [])
    if len(workers) > 1:
        log.info("TF_CONFIG names %d workers: MultiWorkerMirroredStrategy", len(workers))
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = tf.config.list_logical_devices("GPU")
    if gpus is not None:
        if gpus > len(devices):
            raise TrainingError(f"--gpus {gpus}: only {len(devices)} GPU(s) visible")
        devices = devices[:gpus]
    if len(devices) > 1:
        log.info("MirroredStrategy over %d GPUs", len(devices))
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    log.info("single device (%s)", devices[0].name if devices else "CPU")
    return tf.distribute.get_strategy()


def resolve_warm_start(stage: str, spec: str, models_dir: Path) -> Path | None:
    """Export folder to start from: 'default' (the paper's parent), 'none', a stage[@N] or a path."""
    if spec == "default":
        spec = PARENT[stage] or "none"
    if spec == "none":
        return None
    try:
        return export.resolve(spec, models_dir)
    except export.ExportError as exc:
        raise TrainingError(f"warm start for stage {stage!r}: {exc}; or train from scratch with "
                            f"--warm-start none") from None


def check_updates(cfg: Config) -> None:
    """Refuse a configuration whose run makes no optimizer update at all.

    Such a run would export its starting point (an untrained or a merely
    copied network) as the stage's newest version. A run resumed at or past
    its last step is another matter: it only exports its final checkpoint.
    """
    tc = cfg.train
    updates = max(tc.l1_phase.steps, 0) + max(tc.gan_phase.steps, 0)
    if updates <= 0:
        raise TrainingError(f"train.l1_phase.steps={tc.l1_phase.steps} and train.gan_phase.steps="
                            f"{tc.gan_phase.steps}: this run would make no optimizer update and export "
                            f"an untrained model; set at least one of them above 0")


def run_id(stage: str, manifest: dict, cfg: Config, parent: Path | None) -> str:
    """Short hash of what defines a run, so the same command resumes the same run."""
    parent_meta = export.read_metadata(parent) if parent else {}
    key = json.dumps({"stage": stage, "shards": manifest["shards"], "config": cfg.to_dict(),
                      "parent": [parent_meta.get("stage"), parent_meta.get("version"), str(parent)]},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def train_stage(stage: str, data_dir: str | Path, cfg: Config, warm_start: str = "default",
                models_dir: str | Path = "saved_models", runs_dir: str | Path = "runs",
                strategy: tf.distribute.Strategy | None = None, restart: bool = False) -> TrainResult:
    """Train `stage` on the shards in `data_dir`, then export it; see the module docstring."""
    if stage not in STAGES:
        raise TrainingError(f"unknown stage {stage!r} (use {', '.join(STAGES)})")
    models_dir, data_dir = Path(models_dir), Path(data_dir)
    check_updates(cfg)
    try:
        manifest = pipeline.load_manifest(data_dir)
        pipeline.shard_files(data_dir, "train", stage, manifest)  # a stage trains on its own modality
    except pipeline.DataError as exc:
        raise TrainingError(str(exc)) from None
    try:
        check_weights_setting(cfg.model.vgg_weights)
    except FeatureExtractorError as exc:
        raise TrainingError(str(exc)) from None
    parent = resolve_warm_start(stage, warm_start, models_dir)
    run_dir = Path(runs_dir) / f"{stage}-{run_id(stage, manifest, cfg, parent)}"
    if restart and run_dir.exists():
        shutil.rmtree(run_dir)
    done = run_dir / "exported.json"
    if done.is_file():
        info = json.loads(done.read_text())
        here = [Path(e) for e in _exports(info) if (Path(e) / "saved_model.pb").is_file()
                and Path(e).resolve().parent.parent == models_dir.resolve()]
        if here:
            log.info("run %s already finished; its export is %s (use --restart to train again)", run_dir, here[-1])
            return TrainResult(run_dir, here[-1], info["steps"], info["steps"])
        # Finished, but its export is gone or lives in another models folder:
        # export the final checkpoint again (resuming at the last step trains nothing).
        final = run_dir / "checkpoints" / f"ckpt-{info['steps']}.index"
        if not final.is_file():
            raise TrainingError(f"run {run_dir} finished, but its export is not in {models_dir} and its final "
                                f"checkpoint ({final.with_suffix('')}) is gone: use --restart to train it again")
        log.info("run %s already finished; exporting its final checkpoint to %s", run_dir, models_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    policy = keras.mixed_precision.global_policy()
    try:
        with log_to_file(run_dir / "train.log"):
            return _train(stage, stage, data_dir, manifest, cfg, parent, models_dir, run_dir,
                          strategy or choose_strategy())
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _train(stage, modality, data_dir, manifest, cfg, parent, models_dir, run_dir, strategy) -> TrainResult:
    tc = cfg.train
    if tc.mixed_precision != "float32":
        keras.mixed_precision.set_global_policy(tc.mixed_precision)
    keras.utils.set_random_seed(tc.seed)
    patch = manifest["patch_size"]
    replicas = strategy.num_replicas_in_sync
    if cfg.data.batch_size % replicas:
        raise TrainingError(f"data.batch_size={cfg.data.batch_size} does not split over {replicas} replicas")
    with strategy.scope():
        generator = build_generator(cfg.model.num_blocks, cfg.model.features, cfg.model.growth,
                                    manifest["scale"])
        discriminator = build_discriminator(patch, features=cfg.model.d_features)
        try:
            vgg = build_feature_extractor(cfg.model.vgg_weights)
        except FeatureExtractorError as exc:
            raise TrainingError(str(exc)) from None
        model = TransferGAN(generator, discriminator, vgg, tc, global_batch=cfg.data.batch_size)
        model.build_optimizers()
        model.compile()
        checkpoint = tf.train.Checkpoint(generator=generator, discriminator=discriminator,
                                         g_optimizer=model.g_optimizer, d_optimizer=model.d_optimizer)
    manager = tf.train.CheckpointManager(checkpoint, str(_checkpoint_dir(run_dir, strategy)),
                                         max_to_keep=tc.keep_checkpoints)
    resumed = 0
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        resumed = int(model.step.numpy())
        log.info("resuming %s from its checkpoint at step %d (%s)", run_dir, resumed, manager.latest_checkpoint)
    elif parent is not None:
        count = export.warm_start(generator, discriminator, parent)
        log.info("warm start from %s: %d variables of generator and discriminator", parent, count)
    else:
        log.info("no warm start: training %s from scratch", stage)

    total = tc.l1_phase.steps + tc.gan_phase.steps
    workers, worker = worker_position(strategy)
    per_step = pipeline.patches_per_step(workers, cfg.data.batch_size)
    watcher = StepWatcher(model, manager, run_dir, cfg, data_dir, modality, total, strategy, manifest["scale"])
    for phase, (gan_phase, begin, end) in enumerate(((False, 0, tc.l1_phase.steps),
                                                     (True, tc.l1_phase.steps, total))):
        start = int(model.step.numpy())
        if start >= end:
            continue
        model.gan_phase = gan_phase
        model.train_function = None  # rebuild the step function for this phase
        watcher.phase_end = end
        log.info("%s phase: steps %d-%d", "GAN" if gan_phase else "L1", start + 1, end)
        # Each phase reads its own seeded stream from its first step on; a run
        # resumed inside a phase skips what the steps before the checkpoint read,
        # so it sees exactly the batches an uninterrupted run would have seen.
        # max(0, ...): under mixed_float16 the loss scaling skips (and does not count)
        # updates whose gradients overflow, so a phase can end a few steps short.
        skip = max(0, start - begin) * per_step
        if skip:
            log.info("input: skipping the %d patches that steps %d-%d read, to continue the stream "
                     "where the checkpoint left it", skip, begin + 1, start)
        # Global batches; Keras has tf.distribute split them over the replicas.
        dataset = pipeline.train_dataset(data_dir, modality, cfg, seed=stream_seed(tc.seed, phase),
                                     start=skip, workers=workers, worker=worker)
        chunk = max(1, min(tc.log_every, end - start))
        model.fit(dataset, steps_per_epoch=chunk, epochs=math.ceil((end - start) / chunk),
                  verbose=0, shuffle=False, callbacks=[watcher])
        if watcher.error:
            raise TrainingError(watcher.error)
    steps = int(model.step.numpy())
    manager.save(checkpoint_number=steps)
    parent_meta = export.read_metadata(parent) if parent else {}
    meta = {"parent": parent_meta.get("stage"), "parent_version": parent_meta.get("version"),
            "parent_path": str(parent) if parent else None, "steps": steps, "modality": modality,
            "data_manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "config": cfg.to_dict()}
    window = cfg.modalities.get(modality).window
    if not is_chief(strategy):  # every worker must save; only the chief's export is kept
        scratch = run_dir / ".export-scratch"
        export.export_stage(generator, discriminator, scratch, stage, window, manifest["scale"], meta)
        shutil.rmtree(scratch, ignore_errors=True)
        return TrainResult(run_dir, models_dir / stage, steps, resumed)
    out = export.export_stage(generator, discriminator, models_dir, stage, window, manifest["scale"], meta)
    log.info("exported %s", out)
    done = run_dir / "exported.json"
    earlier = _exports(json.loads(done.read_text())) if done.is_file() else []
    atomic_write_text(done, json.dumps({"exports": [*earlier, str(out.resolve())], "steps": steps}) + "\n")
    return TrainResult(run_dir, out, steps, resumed)


def stream_seed(seed: int, phase: int) -> int:
    """Seed of the input stream of phase 0 (L1) or 1 (GAN) for `train.seed`: distinct per phase."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{phase}".encode()).digest()[:4], "little") >> 1


def worker_position(strategy) -> tuple[int, int]:
    """(training processes in the cluster, this one's index); (1, 0) without a cluster.

    Numbered as tf.distribute numbers input pipelines: the chief (if any) first, then the workers.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    chiefs, workers = len(spec.get("chief", [])), len(spec.get("worker", []))
    if chiefs + workers <= 1:
        return 1, 0
    index = 0 if resolver.task_type == "chief" else chiefs + resolver.task_id
    return chiefs + workers, index


def _exports(info: dict) -> list[str]:
    """Export folders recorded in a run's exported.json (older runs recorded one, as `export_dir`)."""
    return info.get("exports") or [info["export_dir"]]


def is_chief(strategy) -> bool:
    """True unless this is a non-chief worker of a multi-worker run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type in (None, "chief"):
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and \
        "chief" not in resolver.cluster_spec().as_dict()


def _checkpoint_dir(run_dir: Path, strategy) -> Path:
    """Checkpoints of the chief; other workers write theirs to a scratch folder (MWMS needs all to save)."""
    if is_chief(strategy):
        return run_dir / "checkpoints"
    resolver = strategy.cluster_resolver
    return run_dir / f".checkpoints-{resolver.task_type}{resolver.task_id}"


class StepWatcher(keras.callbacks.Callback):
    """Per-step bookkeeping: non-finite check, log lines, TensorBoard, checkpoints, validation."""

    def __init__(self, model, manager, run_dir, cfg, data_dir, modality, total, strategy, scale):
        super().__init__()
        self.gan, self.manager, self.cfg, self.total, self.scale = model, manager, cfg, total, scale
        self.phase_end = total
        self.error: str | None = None
        tensorboard = run_dir / ("tensorboard" if is_chief(strategy) else ".tensorboard-worker")
        self.writer = tf.summary.create_file_writer(str(tensorboard))
        self.val = list(pipeline.eval_dataset(data_dir, "validation", modality, cfg)
                        .take(cfg.train.eval_slices)) if _has_split(data_dir, "validation", modality) else []
        self.t0, self.s0 = time.perf_counter(), None

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.gan.step.numpy())
        if self.s0 is None:
            self.s0, self.t0 = step - 1, time.perf_counter()
        logs = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in (logs or {}).items()}
        bad = [k for k, v in logs.items() if not math.isfinite(v)]
        if bad:
            last = self.manager.latest_checkpoint or "none"
            self.error = (f"non-finite {', '.join(bad)} at step {step}; stopped. The last good checkpoint "
                          f"is {last}; lower the learning rate or check the data, then run again to resume")
            self.gan.stop_training = True
            return
        tc = self.cfg.train
        if step % tc.log_every == 0 or step == self.phase_end:
            self._log(step, logs)
        if step % tc.checkpoint_every == 0:
            self.manager.save(checkpoint_number=step)
        if self.val and (step % tc.eval_every == 0 or step == self.total):
            self._validate(step)
        if step >= self.phase_end:
            self.gan.stop_training = True

    def _log(self, step, logs):
        rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        rates = self.gan.last_learning_rates()  # what this step used, not the next step's rate
        g_lr = rates["generator"]
        log.info("step %d/%d %s | %s | lr %.2e | %.2f steps/s | ETA %s", step, self.total,
                 "GAN" if self.gan.gan_phase else "L1",
                 " ".join(f"{k} {v:.4g}" for k, v in sorted(logs.items())), g_lr, rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)))
        with self.writer.as_default(step=step):
            for key, value in logs.items():
                tf.summary.scalar(f"loss/{key}", value)
            tf.summary.scalar("learning_rate/generator", g_lr)
            if self.gan.gan_phase:
                tf.summary.scalar("learning_rate/discriminator", rates["discriminator"])
            tf.summary.scalar("steps_per_second", rate)

    def _validate(self, step):
        scores, images = [], []
        for item in self.val:
            sr = np.clip(self.gan.generator(item["lr"][None], training=False).numpy()[0, ..., 0], 0, 1)
            hr, mask = item["hr"].numpy()[..., 0], item["mask"].numpy()[..., 0]
            scores.append((metrics.psnr(sr, hr, mask=mask), metrics.ssim(sr, hr, mask=mask)))
            if len(images) < 3:
                images.append(validation_panel(item["lr"].numpy()[..., 0], sr, hr, self.scale))
        psnr, ssim = np.mean(scores, axis=0)
        log.info("step %d validation (%d slices, in mask): PSNR %.2f dB, SSIM %.4f", step, len(scores), psnr, ssim)
        with self.writer.as_default(step=step):
            tf.summary.scalar("validation/psnr_mask", psnr)
            tf.summary.scalar("validation/ssim_mask", ssim)
            for i, image in enumerate(images):  # LR (nearest) | SR | HR
                tf.summary.image(f"validation/lr_sr_hr_{i}", image[None, ..., None])


def validation_panel(lr: np.ndarray, sr: np.ndarray, hr: np.ndarray, scale: int) -> np.ndarray:
    """LR (nearest-neighbour upscaled) | SR | HR side by side for TensorBoard.

    lr [h, w], sr and hr [scale*h, scale*w], all in [0, 1]; returns [scale*h, 3*scale*w].
    """
    lr_up = np.repeat(np.repeat(lr, scale, 0), scale, 1)
    return np.concatenate([lr_up, sr, hr], axis=1)


def _has_split(data_dir, split, modality) -> bool:
    try:
        pipeline.shard_files(data_dir, split, modality)
        return True
    except pipeline.DataError:
        return False
