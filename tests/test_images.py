"""`tfgan-ct convert-images`: grey levels per image mode, broken files, splits, determinism,
Set5, the bundled sample images, and a tiny natural-stage training run with its export."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result
from PIL import Image

from tfgan_ct.cli import main
from tfgan_ct.config import load_config
from tfgan_ct.data import pipeline, resize
from tfgan_ct.data.images import convert_images
from tfgan_ct.data.shards import read_records
from tfgan_ct.data.splits import salted_hash
from tfgan_ct.demo.sample_images import write_sample_images
from tfgan_ct.deploy import export

from helpers import SMALL_CONFIG

SALT = "tfgan-ct:0"  # salt derived from the default seed
BT601 = np.array([0.299, 0.587, 0.114])


def all_records(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [r for split in manifest["shards"].values() for s in split for r in read_records(out / s["file"])]


def records_by_image(out: Path) -> dict[str, list[dict]]:
    """Records grouped by their image's (patient) hash."""
    grouped: dict[str, list[dict]] = {}
    for r in all_records(out):
        grouped.setdefault(r["patient"], []).append(r)
    return grouped


def run(*args) -> Result:
    return CliRunner().invoke(main, ["convert-images", *map(str, args), "--config", str(SMALL_CONFIG),
                                     "--no-progress"])


def make_images(folder: Path) -> dict[str, np.ndarray]:
    """Good images of several modes (68x70 pixels, cropped to 68x68) and their expected grey [0, 1].

    Pixels (0, 0..2) of the RGB-like images are pure red, green and blue.
    """
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    (folder / "sub").mkdir()
    rgb = rng.integers(0, 256, (68, 70, 3), dtype=np.uint8)
    rgb[0, :3] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    expected: dict[str, np.ndarray] = {}

    Image.fromarray(rgb).save(folder / "rgb.png")
    expected["rgb.png"] = rgb / 255.0 @ BT601

    palette = Image.fromarray(rgb).quantize(colors=64)
    palette.save(folder / "sub/palette.png")
    expected["sub/palette.png"] = np.asarray(palette.convert("RGB")) / 255.0 @ BT601

    alpha = rng.integers(0, 256, (68, 70), dtype=np.uint8)
    alpha[0, :3] = 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = (rgb / 255.0 @ BT601) * (alpha / 255.0)  # composited on black

    grey16 = rng.integers(0, 65536, (68, 70), dtype=np.uint16)
    image16 = Image.fromarray(grey16)
    assert image16.mode == "I;16"
    image16.save(folder / "grey16.png")
    expected["grey16.png"] = grey16 / 65535.0

    grey8 = rng.integers(0, 256, (68, 70), dtype=np.uint8)
    Image.fromarray(grey8).save(folder / "sub/grey8.jpg", quality=100)
    expected["sub/grey8.jpg"] = np.asarray(Image.open(folder / "sub/grey8.jpg")) / 255.0  # as decoded

    Image.fromarray(rgb).save(folder / "rgb.bmp")
    expected["rgb.bmp"] = rgb / 255.0 @ BT601

    Image.fromarray(np.dstack([grey8, alpha]), "LA").save(folder / "grey_alpha.png")
    expected["grey_alpha.png"] = grey8 / 255.0 * (alpha / 255.0)

    bilevel = grey8 > 127
    Image.fromarray(bilevel).save(folder / "bilevel.png")
    expected["bilevel.png"] = bilevel.astype(np.float64)

    grey32 = grey16.astype(np.int32)  # Pillow mode I holding 16-bit values
    Image.fromarray(grey32).save(folder / "grey32.tif")
    expected["grey32.tif"] = grey32 / 65535.0
    (folder / "notes.txt").write_text("not an image, ignored by suffix")
    return expected


def add_broken(folder: Path) -> dict[str, str]:
    """Broken inputs and the reason each one must be reported with."""
    rng = np.random.default_rng(1)
    good = folder / "rgb.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[:2000])
    (folder / "text.png").write_text("this is not a PNG\n")
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(rng.random((40, 40)).astype(np.float32)).save(folder / "float.tif")
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(folder / "full.jpg")
    jpeg = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "full.jpg").unlink()
    Image.fromarray(rng.integers(0, 256, (20, 40), dtype=np.uint8)).save(folder / "tiny.png")
    return {"truncated.png": "truncated or corrupt image", "text.png": "not an image file",
            "empty.png": "empty file", "float.tif": "unsupported image mode (F)",
            "truncated.jpg": "truncated or corrupt image", "tiny.png": "image too small"}


@pytest.fixture(scope="module")
def modes_dataset(tmp_path_factory):
    """Every good image stored whole (split 0:1:0), plus the broken files; with a process pool."""
    root = tmp_path_factory.mktemp("images")
    expected = make_images(root / "in")
    broken = add_broken(root / "in")
    out = root / "out"
    result = run(root / "in", "--out", out, "--split", "0:1:0", "--workers", 2)
    assert result.exit_code == 0, result.output
    return root, out, expected, broken, result


def test_grey_levels_per_mode_and_lr(modes_dataset):
    _, out, expected, _, _ = modes_dataset
    records = records_by_image(out)
    assert len(records) == len(expected)
    for key, grey in expected.items():
        (record,) = records[salted_hash("patient:" + key, SALT)]
        assert record["modality"] == "natural" and record["split"] == "validation"
        assert record["hr"].shape == (68, 68) and record["lr"].shape == (17, 17)  # width 70 cropped
        assert record["mask"].all() and record["hr"].dtype == np.int16
        np.testing.assert_array_less(np.abs(record["hr"] - grey[:, :68] * 1000), 0.5 + 1e-6, err_msg=key)
        np.testing.assert_allclose(record["lr"], resize.downscale(record["hr"].astype(np.float64), 4),
                                   atol=1e-4, err_msg=key)
    manifest = json.loads((out / "manifest.json").read_text())
    modes = {x["modality_reason"] for x in manifest["series"]}
    assert modes == {f"natural image ({m})" for m in ("1", "I", "I;16", "L", "LA", "P", "RGB", "RGBA")}
    for key in ("rgb.png", "rgba.png", "rgb.bmp"):  # pure red, green, blue: the BT.601 weights x 1000
        (record,) = records[salted_hash("patient:" + key, SALT)]
        assert record["hr"][0, :3].tolist() == [299, 587, 114], key


def test_broken_files_reported_by_name_and_counted(modes_dataset):
    root, out, expected, broken, result = modes_dataset
    lines = result.output.splitlines()
    log = (out / "convert.log").read_text()
    for name, reason in broken.items():
        named = [line for line in lines if f"skipped {name}:" in line]
        assert len(named) == 1 and reason in named[0], (name, named)
        assert f"skipped {name}:" in log
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"files": 6, "by_reason": {
        "empty-file": 1, "too-small": 1, "not-image": 1, "corrupt-image": 2, "unsupported-mode": 1}}
    assert manifest["counts"]["validation"]["slices"] == len(expected)
    assert "notes.txt" not in result.output or "ignored" in result.output


def test_no_file_names_in_shards_or_manifest(modes_dataset):
    _, out, expected, broken, _ = modes_dataset
    names = [Path(k).name.encode() for k in (*expected, *broken)] + [b"sub/", b"palette", b"grey16"]
    for path in out.iterdir():
        if path.name != "convert.log":
            content = path.read_bytes()
            assert not [n for n in names if n in content], path.name


def test_deterministic_refuses_then_overwrites_identically(modes_dataset):
    root, out, _, _, _ = modes_dataset
    files = sorted(p.name for p in out.iterdir())
    before = {name: (out / name).read_bytes() for name in files if name != "convert.log"}
    refused = run(root / "in", "--out", out, "--split", "0:1:0", "--workers", 1)
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    again = run(root / "in", "--out", out, "--split", "0:1:0", "--workers", 1, "--overwrite")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.iterdir()) == files
    assert {name: (out / name).read_bytes() for name in before} == before  # shards, manifest, config
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_nothing_usable_fails(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.png").write_text("no image")
    result = run(tmp_path / "in", "--out", tmp_path / "out", "--workers", 1)
    assert result.exit_code == 1 and "no usable images found" in result.output
    assert "skipped a.png: [not-image] not an image file" in result.output
    assert "1 file(s) skipped (not-image: 1)" in result.output
    assert not (tmp_path / "out").exists()


def make_set(folder: Path, n: int, size=(40, 72)) -> list[str]:
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return [f"img{i:02d}.png" for i in range(n)]


def test_split_by_image_patches_and_seed(tmp_path):
    keys = make_set(tmp_path / "in", 9)
    result = run(tmp_path / "in", "--out", tmp_path / "a", "--split", "1:1:1", "--workers", 1)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    assert [manifest["counts"][s]["patients"] for s in ("train", "validation", "test")] == [3, 3, 3]
    split_of = {x["patient"]: x["split"] for x in manifest["series"]}
    assert len(split_of) == 9 and set(split_of) == {salted_hash("patient:" + k, SALT) for k in keys}
    for r in all_records(tmp_path / "a"):
        assert r["split"] == split_of[r["patient"]]
        if r["split"] == "train":  # 40x72 -> one row of two 32-pixel patches
            assert r["hr"].shape == (32, 32) and (r["patch_y"], r["patch_x"]) in {(0, 0), (0, 32)}
        else:
            assert r["hr"].shape == (40, 72) and (r["patch_y"], r["patch_x"]) == (0, 0)
    assert manifest["counts"]["train"]["records"] == 6
    other = run(tmp_path / "in", "--out", tmp_path / "b", "--split", "1:1:1", "--seed", 5, "--workers", 1)
    assert other.exit_code == 0, other.output
    seed5 = json.loads((tmp_path / "b/manifest.json").read_text())
    assert {x["patient"] for x in seed5["series"]}.isdisjoint(split_of)  # new salt, new pseudonyms
    assert seed5["settings"]["seed"] == 5


def test_split_csv(tmp_path):
    make_set(tmp_path / "in", 4)
    csv = tmp_path / "split.csv"
    csv.write_text("patient,split\nimg00.png,train\nimg01.png,test\nimg02.png,val\n")  # img03 left out
    result = run(tmp_path / "in", "--out", tmp_path / "o", "--split-csv", csv, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "1 image(s) not in the split CSV" in result.output
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    assert [manifest["counts"][s]["patients"] for s in ("train", "validation", "test")] == [1, 1, 1]
    assert manifest["settings"]["split"] == "csv"


def test_set5(shared_data, tmp_path):
    set5 = shared_data / "natural" / "Set5"
    if not set5.is_dir():
        pytest.skip("Set5 not found")
    cfg = load_config(SMALL_CONFIG, ["convert.split=0:0:1"])
    summary = convert_images([set5], tmp_path / "o", cfg, workers=1, progress=False)
    assert sum(summary.slices.values()) == 5 and not summary.skipped
    records = records_by_image(tmp_path / "o")
    for path in sorted(set5.glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
        (record,) = records[salted_hash("patient:" + path.name, SALT)]
        h, w = record["hr"].shape
        assert (h, w) == (rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4)
        np.testing.assert_array_less(np.abs(record["hr"] - 1000 * (rgb[:h, :w] @ BT601)), 0.5 + 1e-6)
        np.testing.assert_allclose(record["lr"], resize.downscale(record["hr"].astype(np.float64), 4),
                                   atol=1e-3)


def test_sample_images_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    paths = write_sample_images(tmp_path / "samples")
    assert len(paths) >= 8 and {p.name for p in paths} >= {"astronaut.png", "camera.png", "coffee.png"}
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode in ("L", "RGB") and min(image.size) >= 128


TINY = {
    "model": {"num_blocks": 1, "features": 8, "growth": 4, "d_features": 8, "vgg_weights": "none"},
    "train": {"l1_phase": {"steps": 2, "learning_rate": 2e-4, "milestones": []},
              "gan_phase": {"steps": 2, "learning_rate": 1e-4, "milestones": []},
              "log_every": 2, "checkpoint_every": 2, "eval_every": 4, "eval_slices": 2},
}


@pytest.fixture(scope="module")
def natural_run(tmp_path_factory):
    """Sample images -> convert-images -> `tfgan-ct train --stage natural` with tiny networks.

    Returns (tiny config file, natural dataset, models folder, runs folder).
    """
    root = tmp_path_factory.mktemp("natural")
    write_sample_images(root / "samples")
    tiny = root / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({**yaml.safe_load(SMALL_CONFIG.read_text()), **TINY}))
    natural, models, runs = root / "natural", root / "models", root / "runs"
    result = CliRunner().invoke(main, ["convert-images", str(root / "samples"), "--out", str(natural),
                                       "--config", str(tiny), "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    trained = CliRunner().invoke(main, ["train", "--stage", "natural", "--data", str(natural), "--config",
                                        str(tiny), "--models-dir", str(models), "--runs-dir", str(runs)])
    assert trained.exit_code == 0, trained.output
    return tiny, natural, models, runs


@pytest.mark.slow
def test_natural_dataset_reads_and_the_stage_trains_and_exports(natural_run):
    tiny, natural, models, _ = natural_run
    cfg = load_config(tiny)
    batch = next(iter(pipeline.train_dataset(natural, "natural", cfg, seed=0)))
    assert batch["lr"].shape == (4, 8, 8, 1) and batch["hr"].shape == (4, 32, 32, 1)
    assert 0 <= float(batch["hr"].numpy().min()) and float(batch["hr"].numpy().max()) <= 1
    whole = next(iter(pipeline.eval_dataset(natural, "validation", "natural", cfg)))
    assert whole["hr"].shape[0] == 4 * whole["lr"].shape[0] and bool(whole["mask"].numpy().all())
    meta = export.read_metadata(models / "natural" / "1")
    assert meta["stage"] == "natural" and meta["steps"] == 4 and meta["modality"] == "natural"
    assert meta["parent"] is None and meta["window"] == {"center": 500.0, "width": 1000.0}


@pytest.mark.slow
def test_ncct_default_warm_start_is_the_natural_export(natural_run, converted):
    from tfgan_ct.training.train import train_stage

    tiny, _, models, runs = natural_run
    ct, _ = converted
    one = load_config(tiny, ["train.l1_phase.steps=1", "train.gan_phase.steps=0"])
    child = train_stage("ncct", ct, one, models_dir=models, runs_dir=runs)  # --warm-start default
    child_meta = export.read_metadata(child.export_dir)
    assert child_meta["parent"] == "natural" and child_meta["parent_version"] == 1


def test_help_lists_convert_images():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "convert-images" in result.output
    usage = CliRunner().invoke(main, ["convert-images", "--help"])
    assert usage.exit_code == 0 and "--split-csv" in usage.output and "BT.601" in usage.output


def test_list_images_keys_for_a_glob_match_the_folder_and_ignore_input_order(tmp_path):
    from tfgan_ct.data.images import list_images

    names = make_set(tmp_path / "DIV2K", 4)
    (tmp_path / "DIV2K/sub").mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "DIV2K/sub/deep.png")
    folder, _ = list_images([tmp_path / "DIV2K"])
    assert sorted(f.key for f in folder) == sorted([*names, "sub/deep.png"])
    glob = sorted((tmp_path / "DIV2K").glob("*.png"))
    keys = {Path(f.path).name: f.key for f in list_images(glob)[0]}
    assert keys == {n: n for n in names}  # no "0/", "1/" prefixes
    reordered = {Path(f.path).name: f.key for f in list_images(glob[::-1])[0]}
    assert reordered == keys
    fewer = {Path(f.path).name: f.key for f in list_images(glob[1:])[0]}
    assert fewer == {n: n for n in names[1:]}  # dropping a file changes no other key
    # a file also reached through its folder keeps the folder's key, in either order
    for order in ([tmp_path / "DIV2K", tmp_path / "DIV2K/sub/deep.png"],
                  [tmp_path / "DIV2K/sub/deep.png", tmp_path / "DIV2K"]):
        files, _ = list_images(order)
        assert sorted(f.key for f in files) == sorted([*names, "sub/deep.png"])


def test_list_images_collisions_prefixed_by_folder_or_refused(tmp_path):
    from tfgan_ct.data.convert import ConvertError
    from tfgan_ct.data.images import list_images

    make_set(tmp_path / "a", 2)  # img00.png, img01.png
    make_set(tmp_path / "b", 3)  # img00..02.png
    for inputs in ([tmp_path / "a", tmp_path / "b"], [tmp_path / "b", tmp_path / "a"]):
        files, _ = list_images(inputs)
        assert sorted(f.key for f in files) == ["a/img00.png", "a/img01.png", "b/img00.png",
                                                "b/img01.png", "img02.png"]
        assert all(Path(f.path).parent.name == f.key.split("/")[0] for f in files if "/" in f.key)
    # the same file names under folders of the same name cannot be told apart
    make_set(tmp_path / "x/data", 1)
    make_set(tmp_path / "y/data", 1)
    with pytest.raises(ConvertError, match=r"same key 'data/img00.png'.*x/data/img00.png.*y/data/img00.png"):
        list_images([tmp_path / "y/data", tmp_path / "x/data"])
    result = run(tmp_path / "x/data", tmp_path / "y/data", "--out", tmp_path / "o", "--workers", 1)
    assert result.exit_code == 1 and "same key" in result.output and not (tmp_path / "o").exists()


def test_split_csv_with_a_glob_of_files(tmp_path):
    make_set(tmp_path / "in", 4)
    csv = tmp_path / "split.csv"
    csv.write_text("patient,split\nimg00.png,train\nimg01.png,test\nimg02.png,val\nimg03.png,test\n")
    files = sorted((tmp_path / "in").glob("*.png"))
    result = run(*files[::-1], "--out", tmp_path / "o", "--split-csv", csv, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "not in the split CSV" not in result.output
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    assert [manifest["counts"][s]["patients"] for s in ("train", "validation", "test")] == [1, 1, 2]
    expected = {salted_hash("patient:" + n, SALT): s for n, s in
                [("img00.png", "train"), ("img01.png", "test"), ("img02.png", "validation"),
                 ("img03.png", "test")]}
    assert {x["patient"]: x["split"] for x in manifest["series"]} == expected
