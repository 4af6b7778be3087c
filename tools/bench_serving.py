"""Benchmark TensorFlow Serving transports: gRPC (raw tensor bytes) against REST (JSON text).

    python tools/bench_serving.py [--networks tiny,paper] [--sizes 128,512] [--repeats 3]

For each network (`tiny`: 1 RRDB block, 8 features, so the transport dominates;
`paper`: 23 RRDB blocks, 64/32, random weights) an export is served by the
stand-in (`tfgan-ct serve standin`, REST and gRPC, in its own process), and one
LR slice of each size is super-resolved whole (no tiles), one slice per call:

- locally, the SavedModel loaded in this process (the baseline);
- over gRPC (`grpc_client.predict`) and over REST (`client.predict`).

Printed per case: seconds per slice (median of --repeats after a warm-up call),
payload bytes of request + answer (protobuf messages / JSON bodies, without
HTTP headers), and the transport overhead against local inference. TensorFlow
Serving itself cannot run here; the stand-in runs the same SavedModels with
plain TensorFlow, so the server-side compute is the same as local inference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def export(network: str, folder: Path) -> Path:
    """Export an untrained `network` generator as stage ncct under `folder`; returns `folder`."""
    from tfgan_ct.config import Window
    from tfgan_ct.deploy.export import export_stage
    from tfgan_ct.model.discriminator import build_discriminator
    from tfgan_ct.model.generator import build_generator

    generator = build_generator() if network == "paper" else build_generator(num_blocks=1, features=8, growth=4)
    export_stage(generator, build_discriminator(32, features=8), folder, "ncct", Window(40, 80), 4, {})
    return folder


def start_standin(models: Path) -> tuple[subprocess.Popen, str, str]:
    """`tfgan-ct serve standin` on free ports in its own process; (process, REST URL, gRPC URL)."""
    process = subprocess.Popen([sys.executable, "-m", "tfgan_ct.cli", "serve", "standin", "--models-dir",
                                str(models), "--port", "0", "--grpc-port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    rest, grpc_url = line.split(" at ")[1].split(": ")[0].split(" and ")
    return process, rest, grpc_url


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def payload_bytes(lr: np.ndarray, sr: np.ndarray) -> dict[str, int]:
    """Request + answer payloads of one call: the gRPC messages and the REST JSON bodies."""
    from tfgan_ct.deploy.serving import messages

    spec = messages.ModelSpec("ncct", None, "serving_default")
    grpc_bytes = len(messages.encode_predict_request(spec, {"lr": lr})) + \
        len(messages.encode_predict_response(spec, {"sr": sr}))
    rest_bytes = len(json.dumps({"signature_name": "serving_default", "inputs": {"lr": lr.tolist()}})) + \
        len(json.dumps({"outputs": sr.tolist()}))
    return {"grpc": grpc_bytes, "rest": rest_bytes}


def bench(network: str, sizes: list[int], repeats: int) -> list[dict]:
    from tfgan_ct.deploy import inference
    from tfgan_ct.deploy.serving import client, grpc_client

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = export(network, Path(tmp) / "models")
        local = inference.load("ncct", models)
        process, rest_url, grpc_url = start_standin(models)
        try:
            for size in sizes:
                lr = np.random.default_rng(size).random((1, size, size, 1)).astype(np.float32)
                n = 1 if network == "paper" and size >= 512 else repeats
                t_local = timed(lambda x=lr: local.predict(x), n)
                t_grpc = timed(lambda x=lr: grpc_client.predict(grpc_url, "ncct", x, timeout=3600), n)
                t_rest = timed(lambda x=lr: client.predict(rest_url, "ncct", x, timeout=3600), n)
                sizes_on_wire = payload_bytes(lr, local.predict(lr))
                rows.append({"network": network, "lr": size, "repeats": n, "local_s": t_local,
                             "grpc_s": t_grpc, "rest_s": t_rest, **{f"{k}_bytes": v for k, v in sizes_on_wire.items()}})
                print(_row(rows[-1]), flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)
    return rows


def _row(r: dict) -> str:
    over = lambda t: f"{(t - r['local_s']) / r['local_s'] * 100:+.1f} %"  # noqa: E731
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    return (f"| {r['network']} | {r['lr']} -> {4 * r['lr']} | {r['local_s']:.3f} | {r['grpc_s']:.3f} "
            f"({over(r['grpc_s'])}) | {r['rest_s']:.3f} ({over(r['rest_s'])}) | {mb(r['grpc_bytes'])} | "
            f"{mb(r['rest_bytes'])} | {r['rest_bytes'] / r['grpc_bytes']:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="tiny,paper")
    parser.add_argument("--sizes", default="128,512")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| network | LR -> SR | local s/slice | gRPC s/slice (overhead) | REST s/slice (overhead) | "
          "gRPC bytes | REST bytes | REST/gRPC bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for network in args.networks.split(","):
        bench(network, [int(s) for s in args.sizes.split(",")], args.repeats)


if __name__ == "__main__":
    main()
