"""Training on CPU with tiny networks: phases, distribution, resume, export, warm start."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from tfgan_ct.config import load_config
from tfgan_ct.deploy import export
from tfgan_ct.model.discriminator import build_discriminator
from tfgan_ct.model.gan import TransferGAN
from tfgan_ct.model.generator import build_generator
from tfgan_ct.model.vgg import build_feature_extractor
from tfgan_ct.training.train import TrainingError, train_stage

from helpers import REPO, SMALL_CONFIG

TINY = {
    "model": {"num_blocks": 1, "features": 8, "growth": 4, "d_features": 8, "vgg_weights": "none"},
    "train": {"l1_phase": {"steps": 4, "learning_rate": 2e-4, "milestones": [2]},
              "gan_phase": {"steps": 4, "learning_rate": 1e-4, "milestones": [2]},
              "log_every": 2, "checkpoint_every": 2, "eval_every": 4, "eval_slices": 2},
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    base = yaml.safe_load(SMALL_CONFIG.read_text())
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump({**base, **TINY}))
    return path


def run_cli(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`tfgan-ct ...` in a fresh process (as a user would run it)."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tfgan_ct.cli", *args], capture_output=True, text=True,
                          env=environment, timeout=600, **kwargs)


PLAIN_TF = """
import sys
import numpy as np
import tensorflow as tf
export_dir, x_file, y_file = sys.argv[1:4]
model = tf.saved_model.load(export_dir)
serve = model.signatures["serving_default"]
y = serve(lr=tf.constant(np.load(x_file)))["sr"]
assert y.dtype == tf.float32, y.dtype
np.save(y_file, y.numpy())
# Every op of the serving signature, in its graph and in the functions it calls.
graph = serve.graph.as_graph_def()
nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
half = tf.float16.as_datatype_enum
print("ops", len(nodes))
for node in nodes:
    if any(a.type == half or half in a.list.type for a in node.attr.values()):
        print("float16 op", node.op, node.name)
assert not [k for k in sys.modules if k.startswith("tfgan_ct")]
"""


def run_plain_tensorflow(export_dir: Path, x: np.ndarray, work: Path) -> tuple[np.ndarray, list[str]]:
    """Run an export's serving_default on `x` in a new process that has only TensorFlow
    (no tfgan_ct on the path), as TensorFlow Serving would. Returns (sr, its float16 ops)."""
    np.save(work / "x.npy", x)
    result = subprocess.run([sys.executable, "-c", PLAIN_TF, str(export_dir), str(work / "x.npy"),
                             str(work / "y.npy")], capture_output=True, text=True, cwd=work, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ops " in result.stdout
    return np.load(work / "y.npy"), [line for line in result.stdout.splitlines() if line.startswith("float16 op")]


def tiny_gan(settings_overrides=()):
    cfg = load_config(SMALL_CONFIG, settings_overrides)
    g = build_generator(1, 8, 4)
    d = build_discriminator(32, features=8)
    model = TransferGAN(g, d, build_feature_extractor("none"), cfg.train, global_batch=4)
    model.build_optimizers()
    model.compile()
    return model


def fixed_batch():
    rng = np.random.default_rng(0)
    hr = rng.random((4, 32, 32, 1)).astype("float32")
    lr = hr.reshape(4, 8, 4, 8, 4, 1).mean(axis=(2, 4))
    return {"lr": tf.constant(lr), "hr": tf.constant(hr)}


def test_learning_rate_switches_at_the_first_update_of_a_phase_and_after_milestones():
    from tfgan_ct.config import PhaseSettings
    from tfgan_ct.model.gan import halving_schedule

    l1 = PhaseSettings(steps=4, learning_rate=2e-4, milestones=[2])
    gan = PhaseSettings(steps=4, learning_rate=1e-4, milestones=[1, 3])
    schedule = halving_schedule([(0, l1), (4, gan)])
    rates = [float(schedule(i)) for i in range(8)]  # at the optimizer's iterations 0..7 = steps 1..8
    np.testing.assert_allclose(rates, [2e-4, 2e-4, 1e-4, 1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5], rtol=1e-6)


@pytest.mark.slow
def test_each_phase_lowers_its_loss_on_a_fixed_batch():
    keras.utils.set_random_seed(1)
    model = tiny_gan(["train.l1_phase.learning_rate=1e-3", "train.gan_phase.learning_rate=1e-3"])
    batch = fixed_batch()

    def run(steps):
        step = tf.function(model.train_step)
        history = []
        for _ in range(steps):
            [m.reset_state() for m in model.metrics]
            history.append({k: float(v[0]) for k, v in step(batch).items()})
        return history

    l1 = run(25)
    assert l1[-1]["l1"] < 0.7 * l1[0]["l1"]
    model.gan_phase = True
    gan = run(30)
    # G's content terms and D's relativistic loss both fall; G's adversarial term is a
    # game against a D that is learning, so it is not expected to fall on its own.
    content = [h["g_loss"] - 5e-3 * h["g_adversarial"] for h in gan]
    assert np.mean(content[-5:]) < np.mean(content[:5])
    assert np.mean([h["d_loss"] for h in gan[-5:]]) < np.mean([h["d_loss"] for h in gan[:5]])


@pytest.mark.slow
def test_train_export_and_plain_tensorflow_reload(converted, tiny_config, tmp_path):
    out, _ = converted
    cfg = load_config(tiny_config)
    result = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "models",
                         runs_dir=tmp_path / "runs")
    assert result.steps == 8 and result.export_dir == tmp_path / "models/ncct/1"
    meta = export.read_metadata(result.export_dir)
    assert meta["stage"] == "ncct" and meta["parent"] is None and meta["window"] == {"center": 40.0, "width": 80.0}
    assert list((tmp_path / "runs").glob("ncct-*/tensorboard/events.out.tfevents.*"))

    # In memory: load the generator weights back and compare with plain TensorFlow in a new process.
    g = build_generator(1, 8, 4)
    export.warm_start(g, build_discriminator(32, features=8), result.export_dir)
    x = np.random.default_rng(1).random((2, 12, 10, 1)).astype("float32")
    y, half = run_plain_tensorflow(result.export_dir, x, tmp_path)
    assert y.shape == (2, 48, 40, 1) and not half
    np.testing.assert_allclose(y, np.clip(g(x).numpy(), 0, 1), atol=1e-6)

    # The same run again into another models folder (the README's Scratch baseline with
    # --warm-start none) exports its final checkpoint there without training; then both are known.
    other = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "scratch_models",
                        runs_dir=tmp_path / "runs")
    assert other.export_dir == tmp_path / "scratch_models/ncct/1" and other.resumed_from == 8
    assert other.run_dir == result.run_dir
    for models in ("models", "scratch_models"):
        done = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / models,
                           runs_dir=tmp_path / "runs")
        assert done.export_dir == tmp_path / models / "ncct/1"
    assert export.versions(tmp_path / "models/ncct") == [1]
    # Without its final checkpoint a finished run cannot be exported elsewhere: it says so, no retraining.
    for checkpoint in (result.run_dir / "checkpoints").glob("ckpt-8.*"):
        checkpoint.unlink()
    with pytest.raises(TrainingError, match="use --restart"):
        train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "third", runs_dir=tmp_path / "runs")


@pytest.mark.slow
def test_warm_start_reproduces_parent_and_refuses_mismatch(converted, tiny_config, tmp_path):
    out, _ = converted
    models = tmp_path / "models"
    cfg = load_config(tiny_config)
    parent = train_stage("ncct", out, cfg, warm_start="none", models_dir=models, runs_dir=tmp_path / "runs")
    # One L1 update with a tiny learning rate: D is not touched in the L1 phase, and Adam's first
    # update moves each weight of G by about the learning rate, so the child is the parent.
    one = load_config(tiny_config, ["train.l1_phase.steps=1", "train.l1_phase.milestones=[]",
                                    "train.gan_phase.steps=0", "train.gan_phase.milestones=[]",
                                    "train.l1_phase.learning_rate=1e-7"])
    child = train_stage("ctp", out, one, warm_start="ncct", models_dir=models, runs_dir=tmp_path / "runs")
    assert export.read_metadata(child.export_dir)["parent"] == "ncct"
    a = tf.saved_model.load(str(parent.export_dir))
    b = tf.saved_model.load(str(child.export_dir))
    for va, vb in zip(a.discriminator_variables, b.discriminator_variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    for va, vb in zip(a.generator_variables, b.generator_variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=0, atol=2e-7)
    wider = load_config(tiny_config, ["model.features=16"])
    with pytest.raises(export.ExportError, match="variable 'conv_first/kernel' has shape"):
        train_stage("cta", out, wider, warm_start="ncct", models_dir=models, runs_dir=tmp_path / "runs")


def test_missing_parent_says_which_command_makes_it(converted, tiny_config, tmp_path):
    out, _ = converted
    with pytest.raises(TrainingError, match="tfgan-ct train --stage ncct"):
        train_stage("ctp", out, load_config(tiny_config), models_dir=tmp_path / "none")


@pytest.mark.slow
def test_mirrored_strategy_matches_single_device(tmp_path):
    """One L1 step on two logical CPUs gives the same weights as on one device."""
    script = f"""
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import sys; sys.path.insert(0, {str(REPO / 'tests')!r})
from test_train import tiny_gan, fixed_batch
import keras
batch = fixed_batch()
keras.utils.set_random_seed(0)
single = tiny_gan()
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = tiny_gan()
assert strategy.num_replicas_in_sync == 2
single.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=3, verbose=0)
ds = tf.data.Dataset.from_tensors(batch).unbatch().batch(4).repeat()
mirrored.fit(ds, steps_per_epoch=3, verbose=0)
diff = max(float(np.abs(a - b).max()) for a, b in zip(single.generator.get_weights(), mirrored.generator.get_weights()))
moved = max(float(np.abs(a).max()) for a in single.generator.get_weights())
print("max weight difference", diff)
assert diff < 1e-5, diff
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_training_on_loopback(converted, tiny_config, tmp_path):
    out, _ = converted
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tfgan_ct.cli", "train", "--stage", "ncct", "--data", str(out),
             "--warm-start", "none", "--config", str(tiny_config), "--models-dir", str(tmp_path / f"models{index}"),
             "--runs-dir", str(tmp_path / f"runs{index}")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CONFIG": json.dumps(tf_config)}))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    assert "MultiWorkerMirroredStrategy" in outputs[0]
    assert (tmp_path / "models0/ncct/1/saved_model.pb").is_file()


STREAM_CHECK = """
import sys
import numpy as np
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()  # first: before any other TensorFlow op
from tfgan_ct.data import pipeline
from tfgan_ct.config import load_config
from tfgan_ct.training.distribute import worker_position

cfg = load_config(sys.argv[2])
workers, worker = worker_position(strategy)
assert (workers, worker) == (2, int(sys.argv[3])), (workers, worker)
# ncct in 2 shard files (split by file), cta in 1 file (split by record)
for modality, data_dir in (("ncct", sys.argv[4]), ("cta", sys.argv[1])):
    n_files = len(pipeline.shard_files(data_dir, "train", modality))
    per_step = pipeline.patches_per_step(2, cfg.data.batch_size)

    def steps(start, n):
        ds = pipeline.train_dataset(data_dir, modality, cfg, seed=5, start=start, workers=2, worker=worker)
        it = iter(strategy.experimental_distribute_dataset(ds))
        return [strategy.experimental_local_results(next(it))[0]["hr"].numpy() for _ in range(n)]

    whole, resumed = steps(0, 4), steps(2 * per_step, 2)
    assert whole[0].shape[0] == cfg.data.batch_size // 2
    for a, b in zip(whole[2:], resumed):
        np.testing.assert_array_equal(a, b)
    print(modality, n_files, "file(s): continued exactly", flush=True)
    print(modality, "first batch sum", float(whole[0].sum()), flush=True)
"""


@pytest.mark.slow
def test_multi_worker_input_streams_continue_where_they_stopped(converted, phantom_dir, tmp_path):
    """Under MultiWorkerMirroredStrategy, skipping `patches_per_step` per step continues each worker's stream."""
    from click.testing import CliRunner

    from tfgan_ct.cli import main

    out, _ = converted  # one training shard file per modality
    small_shards = tmp_path / "small-shards"  # the phantom's 16 NCCT training patches in two files
    result = CliRunner().invoke(main, ["convert", str(phantom_dir), "--out", str(small_shards), "--config",
                                       str(SMALL_CONFIG), "--set", "convert.shard_size=8", "--no-progress"])
    assert result.exit_code == 0, result.output
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-c", STREAM_CHECK, str(out), str(SMALL_CONFIG), str(i), str(small_shards)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
             "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})})
        for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
        assert "ncct 2 file(s): continued exactly" in text and "cta 1 file(s): continued exactly" in text
    for modality in ("ncct", "cta"):  # the two workers read different patches
        sums = [next(line for line in text.splitlines() if line.startswith(f"{modality} first batch sum"))
                for text in outputs]
        assert sums[0] != sums[1], sums


@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint(converted, tiny_config, tmp_path):
    out, _ = converted
    args = ["train", "--stage", "ncct", "--data", str(out), "--warm-start", "none", "--config", str(tiny_config),
            "--set", "train.l1_phase.steps=400", "--set", "train.checkpoint_every=5",
            "--set", "train.log_every=5", "--models-dir", str(tmp_path / "models"),
            "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.Popen([sys.executable, "-m", "tfgan_ct.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("runs/ncct-*/checkpoints/ckpt-1[05].index")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob("runs/ncct-*/checkpoints/ckpt-*.index")), "no checkpoint before the kill"
    assert not (tmp_path / "models/ncct").exists() or not export.versions(tmp_path / "models/ncct")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr and "from its checkpoint at step" in result.stderr
    assert "ncct: 404 steps" in result.stdout and "(ema weights of step 404)" in result.stdout
    assert export.versions(tmp_path / "models/ncct") == [1]


def _rewind(run: Path, step: int) -> None:
    """Make a finished run's folder look like a run killed just after checkpoint `step`."""
    (run / "exported.json").unlink()
    ckpt = run / "checkpoints"
    for f in ckpt.glob("ckpt-*"):
        if int(f.name.split(".")[0].split("-")[1]) > step:
            f.unlink()
    (ckpt / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-{step}"\n'
                                     f'all_model_checkpoint_paths: "ckpt-{step}"\n')


@pytest.mark.slow
def test_resumed_run_sees_the_batches_of_an_uninterrupted_run(converted, tiny_config, tmp_path):
    """Resumed inside the L1 and inside the GAN phase, a run ends with the uninterrupted run's weights."""
    out, _ = converted
    cfg = load_config(tiny_config, ["train.checkpoint_every=1", "train.keep_checkpoints=20"])
    whole = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "models",
                        runs_dir=tmp_path / "runs")
    final = tf.train.load_checkpoint(str(whole.run_dir / "checkpoints/ckpt-8"))
    names = [n for n in final.get_variable_to_shape_map() if "OBJECT_GRAPH" not in n]
    assert len([n for n in names if n.startswith("g_optimizer/_trainable_variables/")]) > 20  # G's weights
    # The moving average of G (optimizer variables next to Adam's slots) and the best-weights record are
    # in the checkpoint too, so they resume exactly with everything else.
    assert len([n for n in names if n.startswith("g_optimizer/_variables/")]) > 3 * 20
    assert {"best_record/psnr/.ATTRIBUTES/VARIABLE_VALUE",
            "collapse_guard/falls/.ATTRIBUTES/VARIABLE_VALUE"} <= set(names)
    for step in (3, 6):  # L1 phase: steps 1-4; GAN phase: 5-8
        runs = tmp_path / f"runs-from-{step}"
        shutil.copytree(tmp_path / "runs", runs)
        _rewind(runs / whole.run_dir.name, step)
        resumed = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / f"models-{step}",
                              runs_dir=runs)
        assert resumed.resumed_from == step and resumed.steps == 8
        again = tf.train.load_checkpoint(str(resumed.run_dir / "checkpoints/ckpt-8"))
        for name in names:
            np.testing.assert_allclose(again.get_tensor(name), final.get_tensor(name), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name} after resuming at step {step}")


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_message(converted, tiny_config, tmp_path, monkeypatch):
    from tfgan_ct.training import train as train_mod

    out, _ = converted
    real = train_mod.pipeline.train_dataset

    def poisoned(*args, **kwargs):  # finite for 3 steps, then NaN
        ds = real(*args, **kwargs)
        bad = ds.map(lambda b: {"lr": b["lr"] * float("nan"), "hr": b["hr"]})
        return ds.take(3).concatenate(bad)

    monkeypatch.setattr(train_mod.pipeline, "train_dataset", poisoned)
    cfg = load_config(tiny_config, ["train.checkpoint_every=2", "train.log_every=1"])
    with pytest.raises(TrainingError, match=r"non-finite .* at step 4; stopped. The last good checkpoint is .*ckpt-2"):
        train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "models", runs_dir=tmp_path / "runs")
    assert not (tmp_path / "models/ncct").exists() or not export.versions(tmp_path / "models/ncct")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_steps(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = tiny_gan([f"train.mixed_precision={policy}"])
        if policy == "mixed_float16":
            assert isinstance(model.g_optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.generator.layers[1].compute_dtype == policy.split("_")[1]
        batch = fixed_batch()
        step = tf.function(model.train_step)
        for gan in (False, True):
            model.gan_phase = gan
            out = {k: float(v[0]) for k, v in step(batch).items()}
            assert all(np.isfinite(v) for v in out.values()), out
        assert model.generator.weights[0].dtype == "float32"  # variables stay float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.slow
def test_bad_vgg_weights_stop_before_a_run_folder_is_made(converted, tiny_config, tmp_path):
    out, _ = converted
    result = run_cli("train", "--stage", "ncct", "--data", str(out), "--warm-start", "none", "--config",
                     str(tiny_config), "--set", "model.vgg_weights=imagnet", "--runs-dir", str(tmp_path / "runs"),
                     "--models-dir", str(tmp_path / "models"))
    assert result.returncode != 0 and "model.vgg_weights='imagnet'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage", ["truncated-variables", "binary-metadata", "metadata-array"])
def test_warm_start_from_a_damaged_export_is_one_line(converted, tiny_config, tiny_export, tmp_path, damage):
    from click.testing import CliRunner
    from test_export import DAMAGE_MESSAGES, damaged_copy

    from tfgan_ct.cli import main

    out, _ = converted
    bad = damaged_copy(tiny_export / "ncct/1", tmp_path / "parent", damage)
    result = CliRunner().invoke(main, ["train", "--stage", "ctp", "--data", str(out), "--warm-start", str(bad),
                                       "--config", str(tiny_config), "--models-dir", str(tmp_path / "models"),
                                       "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()  # log lines (device, random VGG), then the error
    assert [line for line in lines if "Error" in line] == lines[-1:], lines
    assert re.fullmatch(r"Error: " + re.escape(str(bad)) + ": " + DAMAGE_MESSAGES[damage] + r".*", lines[-1]), lines
    assert not (tmp_path / "models").exists()


def test_a_run_without_any_update_is_refused(converted, tiny_config, tmp_path):
    out, _ = converted
    cfg = load_config(tiny_config)
    cfg.train.l1_phase.steps = 0
    cfg.train.gan_phase.steps = 0
    with pytest.raises(TrainingError, match=r"l1_phase.steps=0 and train.gan_phase.steps=0: this run would "
                                            r"make no optimizer update"):
        train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "models", runs_dir=tmp_path / "runs")
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()


def _scalars(event_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of a scalar written with tf.summary.scalar, from the event files in `event_dir`."""
    values = {}
    for events in sorted(event_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


@pytest.mark.slow
def test_logged_learning_rate_is_the_one_the_step_used(converted, tiny_config, tmp_path):
    """Steps 1-4 (L1) use 2e-3; GAN steps 5-6 use 1e-4 for G and D, steps 7-8 5e-5 (milestone 2).
    The rate logged at a step is that step's, not the next one's."""
    out, _ = converted
    cfg = load_config(tiny_config, ["train.log_every=2", "train.eval_every=100"])
    cfg.train.l1_phase.learning_rate, cfg.train.l1_phase.milestones = 2e-3, []
    cfg.train.gan_phase.learning_rate, cfg.train.gan_phase.milestones = 1e-4, [2]
    result = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "models",
                         runs_dir=tmp_path / "runs")
    logged = {int(m[1]): (m[2], float(m[3])) for m in re.finditer(
        r"step (\d+)/8 (L1|GAN) \|.*\| lr (\S+) \|", (result.run_dir / "train.log").read_text())}
    assert logged == {2: ("L1", 2e-3), 4: ("L1", 2e-3), 6: ("GAN", 1e-4), 8: ("GAN", 5e-5)}
    tensorboard = result.run_dir / "tensorboard"
    np.testing.assert_allclose(list(_scalars(tensorboard, "learning_rate/generator").items()),
                               [(2, 2e-3), (4, 2e-3), (6, 1e-4), (8, 5e-5)], rtol=1e-6)
    np.testing.assert_allclose(list(_scalars(tensorboard, "learning_rate/discriminator").items()),
                               [(6, 1e-4), (8, 5e-5)], rtol=1e-6)


def test_validation_panel_follows_the_dataset_scale():
    from tfgan_ct.training.callbacks import validation_panel

    lr = np.arange(6, dtype=np.float32).reshape(2, 3)
    for scale in (2, 4):
        sr = np.zeros((2 * scale, 3 * scale), np.float32)
        panel = validation_panel(lr, sr, sr + 1, scale)
        assert panel.shape == (2 * scale, 9 * scale)
        np.testing.assert_array_equal(panel[::scale, :3 * scale:scale], lr)
        np.testing.assert_array_equal(panel[:, 6 * scale:], 1)


def _real_lr_slice(shared: Path) -> np.ndarray:
    """A real head CT slice in the NCCT window (40/80 HU), bicubic-downscaled x8: float32 [1, 64, 64, 1]."""
    import pydicom

    from tfgan_ct.data import resize

    ds = pydicom.dcmread(shared / "dicom/head-ncct/pydicom-data_693_UNCR.dcm")
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    unit = np.clip((hu - 0.0) / 80.0, 0.0, 1.0)
    small = resize.downscale(unit[:512, :512], 8)
    return np.clip(small, 0, 1).astype(np.float32)[None, :, :, None]


@pytest.mark.slow
def test_mixed_float16_run_exports_a_float32_model(converted, tiny_config, shared_data, tmp_path):
    out, _ = converted
    cfg = load_config(tiny_config, ["train.mixed_precision=mixed_float16", "train.l1_phase.steps=2",
                                    "train.l1_phase.milestones=[]", "train.gan_phase.steps=2",
                                    "train.gan_phase.milestones=[]", "train.eval_every=100"])
    result = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "models",
                         runs_dir=tmp_path / "runs")
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
    x = _real_lr_slice(shared_data)
    y, half = run_plain_tensorflow(result.export_dir, x, tmp_path)
    assert not half, half[:5]
    assert y.shape == (1, 256, 256, 1) and y.dtype == np.float32 and np.isfinite(y).all()
    # Variable paths are kept: the export warm-starts a float32 network by name.
    g, d = build_generator(1, 8, 4), build_discriminator(32, features=8)
    assert export.warm_start(g, d, result.export_dir) == len(g.variables) + len(d.variables)
    np.testing.assert_allclose(y, np.clip(g(x).numpy(), 0, 1), atol=1e-5)
