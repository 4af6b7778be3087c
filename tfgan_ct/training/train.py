"""`tfgan-ct train`: one stage of the chain, with warm start, checkpoints and export.

    natural -> ncct -> ctp -> cta     (default warm start: the stage before; natural: none)

A stage trains on the modality of its name. A run lives in `runs/<stage>-<id>/`,
where the id is a hash of what defines it (stage, dataset manifest, configuration,
warm-start source): the same command again resumes from its newest checkpoint,
continuing each phase's seeded input stream where the checkpoint left it, or
reports the export of a run that already finished. Phases: L1, then GAN
(`model.gan`); strategy and workers: `distribute`; per-step work: `callbacks`;
which weights are exported (moving average, best validated, last): `selection`;
collapse warnings and `train.stop_on_collapse`: `collapse`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from tfgan_ct.config import Config
from tfgan_ct.data import pipeline
from tfgan_ct.deploy import export
from tfgan_ct.fileio import atomic_write_text
from tfgan_ct.logs import log_to_file
from tfgan_ct.model.discriminator import build_discriminator
from tfgan_ct.model.gan import TransferGAN
from tfgan_ct.model.generator import build_generator
from tfgan_ct.model.vgg import FeatureExtractorError, build_feature_extractor, check_weights_setting
from tfgan_ct.stages import PARENT, STAGES
from tfgan_ct.training.callbacks import StepWatcher, score, validation_slices
from tfgan_ct.training.collapse import CollapseGuard
from tfgan_ct.training.distribute import best_dir, checkpoint_dir, choose_strategy, is_chief, worker_position
from tfgan_ct.training.run import Run, TrainingError, TrainResult
from tfgan_ct.training.selection import PHASES, BestWeights, load_ema

log = logging.getLogger("tfgan_ct.training.train")


def train_stage(stage: str, data_dir: str | Path, cfg: Config, warm_start: str = "default",
                models_dir: str | Path = "saved_models", runs_dir: str | Path = "runs",
                strategy: tf.distribute.Strategy | None = None, restart: bool = False) -> TrainResult:
    """Train `stage` on the shards in `data_dir`, then export it; see the module docstring."""
    models_dir, data_dir = Path(models_dir), Path(data_dir)
    manifest = _check_inputs(stage, data_dir, cfg)
    parent = resolve_warm_start(stage, warm_start, models_dir)
    run_dir = Path(runs_dir) / f"{stage}-{run_id(stage, manifest, cfg, parent)}"
    if restart and run_dir.exists():
        shutil.rmtree(run_dir)
    finished = _finished_export(run_dir, models_dir)
    if finished is not None:
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    policy = keras.mixed_precision.global_policy()
    try:
        with log_to_file(run_dir / "train.log"):
            return _train(Run(stage, data_dir, manifest, cfg, parent, models_dir, run_dir,
                              strategy or choose_strategy()))
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _check_inputs(stage: str, data_dir: Path, cfg: Config) -> dict:
    """Refuse, before any run folder is made, what would fail later; returns the dataset's manifest."""
    if stage not in STAGES:
        raise TrainingError(f"unknown stage {stage!r} (use {', '.join(STAGES)})")
    check_updates(cfg)
    try:
        manifest = pipeline.load_manifest(data_dir)
        pipeline.shard_files(data_dir, "train", stage, manifest)  # a stage trains on its own modality
        check_weights_setting(cfg.model.vgg_weights)
    except (pipeline.DataError, FeatureExtractorError) as exc:
        raise TrainingError(str(exc)) from None
    _check_validation(stage, data_dir, manifest, cfg)
    return manifest


def _check_validation(stage: str, data_dir: Path, manifest: dict, cfg: Config) -> None:
    """`best` weights and `stop_on_collapse` choose by validation: refuse a run that has none."""
    tc = cfg.train
    wants = [f"train.export_weights={tc.export_weights}"] if tc.weights_to_export == "best" else []
    wants += ["train.stop_on_collapse=true"] if tc.stop_on_collapse else []
    if not wants:
        return
    try:
        pipeline.shard_files(data_dir, "validation", stage, manifest)
    except pipeline.DataError:
        raise TrainingError(f"{' and '.join(wants)} choose weights by validation, but {data_dir} has no "
                            f"{stage} validation slices; export 'ema' or 'last' instead") from None
    if tc.eval_slices == 0:
        raise TrainingError(f"{' and '.join(wants)} choose weights by validation, but train.eval_slices=0")


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


def stream_seed(seed: int, phase: int) -> int:
    """Seed of the input stream of phase 0 (L1) or 1 (GAN) for `train.seed`: distinct per phase."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{phase}".encode()).digest()[:4], "little") >> 1


def _exports(info: dict) -> list[str]:
    """Export folders recorded in a run's exported.json (older runs recorded one, as `export_dir`)."""
    return info.get("exports") or [info["export_dir"]]


def _finished_export(run_dir: Path, models_dir: Path) -> TrainResult | None:
    """The export of a finished run in `models_dir`; None when the run is to (re)start or re-export.

    A finished run whose export is gone or lives in another models folder exports
    its final checkpoint again (resuming at the last step trains nothing).
    """
    done = run_dir / "exported.json"
    if not done.is_file():
        return None
    info = json.loads(done.read_text())
    here = [Path(e) for e in _exports(info) if (Path(e) / "saved_model.pb").is_file()
            and Path(e).resolve().parent.parent == models_dir.resolve()]
    if here:
        log.info("run %s already finished; its export is %s (use --restart to train again)", run_dir, here[-1])
        return TrainResult(run_dir, here[-1], info["steps"], info["steps"])
    final = run_dir / "checkpoints" / f"ckpt-{info['steps']}.index"
    if not final.is_file():
        raise TrainingError(f"run {run_dir} finished, but its export is not in {models_dir} and its final "
                            f"checkpoint ({final.with_suffix('')}) is gone: use --restart to train it again")
    log.info("run %s already finished; exporting its final checkpoint to %s", run_dir, models_dir)
    return None


def _train(run: Run) -> TrainResult:
    """Build, restore or warm-start, run the phases, save the final checkpoint and export."""
    tc = run.cfg.train
    if tc.mixed_precision != "float32":
        keras.mixed_precision.set_global_policy(tc.mixed_precision)
    keras.utils.set_random_seed(tc.seed)
    best, guard = BestWeights(best_dir(run.run_dir, run.strategy)), CollapseGuard(tc.collapse)
    model, checkpoint = _build(run, best, guard)
    manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir(run.run_dir, run.strategy)),
                                         max_to_keep=tc.keep_checkpoints)
    resumed = _start_from(run, model, checkpoint, manager)
    best.forget_after(resumed)
    # Holds G's moving average for validation and export (outside the strategy's scope).
    shadow = export.float32_clone(model.generator) if tc.ema_decay > 0 else None
    _run_phases(run, model, manager, StepWatcher(model, manager, run, tc.l1_phase.steps + tc.gan_phase.steps,
                                                 best, guard, shadow))
    steps = int(model.step.numpy())
    manager.save(checkpoint_number=steps)
    best.prune(steps)
    return TrainResult(run.run_dir, _export(run, model, steps, best, guard, shadow), steps, resumed)


def _build(run: Run, best: BestWeights, guard: CollapseGuard) -> tuple[TransferGAN, tf.train.Checkpoint]:
    """The networks, the GAN with built optimizers and their checkpoint, in the strategy's scope.

    The checkpoint also holds the best-weights record and the collapse guard's state.
    """
    cfg, replicas = run.cfg, run.strategy.num_replicas_in_sync
    if cfg.data.batch_size % replicas:
        raise TrainingError(f"data.batch_size={cfg.data.batch_size} does not split over {replicas} replicas")
    with run.strategy.scope():
        generator = build_generator(cfg.model.num_blocks, cfg.model.features, cfg.model.growth, run.scale)
        discriminator = build_discriminator(run.manifest["patch_size"], features=cfg.model.d_features)
        try:
            vgg = build_feature_extractor(cfg.model.vgg_weights)
        except FeatureExtractorError as exc:
            raise TrainingError(str(exc)) from None
        model = TransferGAN(generator, discriminator, vgg, cfg.train, global_batch=cfg.data.batch_size)
        model.build_optimizers()
        model.compile()
        checkpoint = tf.train.Checkpoint(generator=generator, discriminator=discriminator,
                                         g_optimizer=model.g_optimizer, d_optimizer=model.d_optimizer,
                                         best_record=best.record, collapse_guard=guard.state)
    return model, checkpoint


def _start_from(run: Run, model: TransferGAN, checkpoint: tf.train.Checkpoint,
                manager: tf.train.CheckpointManager) -> int:
    """Restore the newest checkpoint, else warm-start from the parent export; returns the step resumed at."""
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        resumed = int(model.step.numpy())
        log.info("resuming %s from its checkpoint at step %d (%s)", run.run_dir, resumed, manager.latest_checkpoint)
        return resumed
    if run.parent is not None:
        count = export.warm_start(model.generator, model.discriminator, run.parent)
        log.info("warm start from %s: %d variables of generator and discriminator", run.parent, count)
    else:
        log.info("no warm start: training %s from scratch", run.stage)
    return 0


def _run_phases(run: Run, model: TransferGAN, manager: tf.train.CheckpointManager,
                watcher: StepWatcher) -> None:
    """The L1 phase, then the GAN phase, each from where the model's step stands to its last step;
    none after a collapse stopped training (`train.stop_on_collapse`)."""
    tc = run.cfg.train
    total = tc.l1_phase.steps + tc.gan_phase.steps
    workers, worker = worker_position(run.strategy)
    per_step = pipeline.patches_per_step(workers, run.cfg.data.batch_size)
    for phase, (gan_phase, begin, end) in enumerate(((False, 0, tc.l1_phase.steps),
                                                     (True, tc.l1_phase.steps, total))):
        start = int(model.step.numpy())
        if watcher.guard.stopped_at:
            log.info("a collapse stopped training at step %d (train.stop_on_collapse)", watcher.guard.stopped_at)
            return
        if start >= end:
            continue
        if start == begin:
            watcher.guard.new_phase()
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
        dataset = pipeline.train_dataset(run.data_dir, run.stage, run.cfg, seed=stream_seed(tc.seed, phase),
                                         start=skip, workers=workers, worker=worker)
        chunk = max(1, min(tc.log_every, end - start))
        model.fit(dataset, steps_per_epoch=chunk, epochs=math.ceil((end - start) / chunk),
                  verbose=0, shuffle=False, callbacks=[watcher])
        if watcher.error:
            raise TrainingError(watcher.error)


def _chosen_weights(run: Run, model: TransferGAN, steps: int, best: BestWeights, guard: CollapseGuard,
                    shadow) -> tuple[keras.Model, keras.Model, dict]:
    """Generator, discriminator and metadata of the weights to export (`selection`; after a collapse
    stop: the best); metadata: `exported_weights`, `exported_step`, `exported_validation`."""
    tc = run.cfg.train
    choice = "best" if guard.stopped_at else tc.weights_to_export
    generator, discriminator, step = model.generator, model.discriminator, steps
    if choice == "best":
        phase = 1 if steps > tc.l1_phase.steps else 0
        generator, discriminator = export.float32_clone(model.generator), export.float32_clone(model.discriminator)
        try:
            record = best.restore(phase, generator, discriminator)
        except FileNotFoundError as exc:
            raise TrainingError(f"run {run.run_dir}: {exc}") from None
        step = record.pop("step")
        figures = {**record, "slices": len(validation_slices(run))}
        log.info("exporting the best %s phase weights: step %d, validation PSNR %.2f dB, SSIM %.4f in the mask",
                 PHASES[phase], step, record["psnr_mask"], record["ssim_mask"])
    else:
        if choice == "ema":
            load_ema(shadow, model.generator, model.ema_variables())
            generator = shadow
        slices = validation_slices(run)
        psnr, ssim, _ = score(generator, slices, run.scale, panels=0) if slices else (None, None, None)
        figures = {"psnr_mask": psnr, "ssim_mask": ssim, "slices": len(slices)} if slices else None
        log.info("exporting the %s weights of step %d%s", "moving-average" if choice == "ema" else "last", step,
                 f": validation PSNR {psnr:.2f} dB, SSIM {ssim:.4f} in the mask" if slices else "")
    meta = {"exported_weights": choice, "exported_step": step, "exported_validation": figures,
            "ema_decay": tc.ema_decay, "stopped_by_collapse_at": guard.stopped_at or None}
    return generator, discriminator, meta


def _export(run: Run, model: TransferGAN, steps: int, best: BestWeights, guard: CollapseGuard, shadow) -> Path:
    """Export the chosen weights of the stage (the chief to `models_dir`, other workers to scratch); its folder."""
    generator, discriminator, chosen = _chosen_weights(run, model, steps, best, guard, shadow)
    parent_meta = export.read_metadata(run.parent) if run.parent else {}
    meta = {**chosen, "parent": parent_meta.get("stage"), "parent_version": parent_meta.get("version"),
            "parent_path": str(run.parent) if run.parent else None, "steps": steps, "modality": run.stage,
            "data_manifest_sha256": pipeline.manifest_sha256(run.manifest),
            "data_counts": run.manifest.get("counts"),  # numbers only (records, slices, patients, series)
            "config": run.cfg.to_dict()}
    if not is_chief(run.strategy):  # every worker must save; only the chief's export is kept
        scratch = run.run_dir / ".export-scratch"
        export.export_stage(generator, discriminator, scratch, run.stage, run.window, run.scale, meta)
        shutil.rmtree(scratch, ignore_errors=True)
        return run.models_dir / run.stage
    out = export.export_stage(generator, discriminator, run.models_dir, run.stage, run.window, run.scale, meta)
    log.info("exported %s", out)
    done = run.run_dir / "exported.json"
    earlier = _exports(json.loads(done.read_text())) if done.is_file() else []
    atomic_write_text(done, json.dumps({"exports": [*earlier, str(out.resolve())], "steps": steps}) + "\n")
    return out
