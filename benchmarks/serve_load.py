"""Load test of ``boneage serve`` on loopback: requests/s and latency per concurrency.

    python benchmarks/serve_load.py --model deploy/NAME --images DIR \
        --concurrency 1 8 32 --requests 200 --seconds 60 --out serve-load.json

Starts the server on a free loopback port (or uses ``--url``, loopback only), sends
real images from ``--images`` (PNG, JPEG, WebP or DICOM; round robin) as multipart
``/v1/predict`` requests from ``concurrency`` concurrent clients, each level bounded by
``--requests`` and ``--seconds``. Prints one JSON line per level: requests/s, p50/p90/
p99 latency (ms), errors by status, the server's mean time per stage from /metrics, and
the in-process baseline (the same decoding, preprocessing and onnxruntime code without
HTTP: decoding on the server's decode threads, model runs of ``--max-batch`` images).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".dcm", ".dicom")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: list[str], port: int, extra: list[str]) -> subprocess.Popen:
    import httpx

    command = [sys.executable, str(REPO / "cli.py"), "serve", "--port", str(port)]
    for model in models:
        command += ["--model", model]
    # the server's log (a line per request) to a file: an unread pipe fills up and
    # blocks the server
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open while the server runs)
    process = subprocess.Popen(command + extra, stderr=log, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.terminate()
    raise SystemExit("the server was not ready within 120 s")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def stage_totals(metrics_text: str) -> dict[str, tuple[float, float]]:
    """(total seconds, count) per stage from the server's Prometheus histograms."""
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith(("boneage_stage_seconds_sum", "boneage_stage_seconds_count")):
            stage = line.split('stage="')[1].split('"')[0]
            value = float(line.rsplit(" ", 1)[1])
            total, count = out.get(stage, (0.0, 0.0))
            out[stage] = (total + value, count) if "_sum" in line else (total, count + value)
    return out


async def level(url: str, headers: dict[str, str], files: list[tuple[str, bytes]],
                fields: dict[str, str], concurrency: int, requests: int,
                seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    stop_at = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        before = stage_totals((await client.get("/metrics")).text)

        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < stop_at:
                name, data = files[sent % len(files)]
                sent += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/predict", files={"file": (name, data)},
                                                 data=fields)
                    status = str(response.status_code)
                except httpx.HTTPError as err:
                    status = type(err).__name__
                latencies.append((time.perf_counter() - started) * 1000)
                if status != "200":
                    errors[status] = errors.get(status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = stage_totals((await client.get("/metrics")).text)
    stages = {}
    for stage, (total, count) in after.items():
        old_total, old_count = before.get(stage, (0.0, 0.0))
        if count > old_count:
            stages[stage] = round(1000 * (total - old_total) / (count - old_count), 2)
    return {"concurrency": concurrency, "requests": len(latencies),
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90),
            "p99_ms": percentile(latencies, 99), "errors": errors,
            "server_stage_ms": stages}


def in_process(models: list[str], files: list[tuple[str, bytes]], fields: dict[str, str],
               requests: int, max_batch: int, decode_threads: int = 2) -> dict:
    """The same decode + preprocessing + onnxruntime code without HTTP (images/s)."""
    sys.path.insert(0, str(REPO))
    from boneage_keras.serve import (
        ImageRequest,
        PendingImage,
        Predictor,
        ServedModel,
        ServeOptions,
    )

    predictor = Predictor(ServedModel(models), ServeOptions(max_batch=max_batch))
    predictor.warm_up()
    items = [files[i % len(files)] for i in range(requests)]

    def decode(item):
        request = ImageRequest(item[1], item[0], sex=fields.get("sex"))
        return predictor.decode(request, 1)

    started = time.perf_counter()
    with ThreadPoolExecutor(decode_threads) as pool:
        decoded = list(pool.map(decode, items))
    for start in range(0, len(decoded), max_batch):
        chunk = decoded[start:start + max_batch]
        predictor.model.run([PendingImage(d["arrays"], 1, d["sex"]) for d in chunk])
    elapsed = time.perf_counter() - started
    return {"requests": requests, "requests_per_s": round(requests / elapsed, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[],
                        help="export folder to serve (repeat for an ensemble)")
    parser.add_argument("--url", help="an already running server on loopback instead")
    parser.add_argument("--token-file", help="the server's token file (with --url)")
    parser.add_argument("--images", required=True, help="folder of images to send")
    parser.add_argument("--limit-images", type=int, default=64)
    parser.add_argument("--sex", choices=["M", "F"], default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--server-args", default="", help="more flags for boneage serve")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args()
    if not args.model and not args.url:
        parser.error("give --model EXPORT_DIR (or --url of a running server)")
    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in SUFFIXES)
    if not paths:
        parser.error(f"--images {args.images}: no PNG, JPEG, WebP or DICOM files there")
    files = [(p.name, p.read_bytes()) for p in paths[:args.limit_images]]
    fields = {"sex": args.sex} if args.sex else {}
    headers = {}
    if args.token_file:
        headers["Authorization"] = "Bearer " + Path(args.token_file).read_text().split()[0]
    process = None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--url: load tests run on loopback only")
        url = args.url.rstrip("/")
    else:
        port = free_port()
        extra = ["--max-batch", str(args.max_batch), *args.server_args.split()]
        process = start_server(args.model, port, extra)
        url = f"http://127.0.0.1:{port}"
    results = []
    try:
        for concurrency in args.concurrency:
            result = asyncio.run(level(url, headers, files, fields, concurrency,
                                       args.requests, args.seconds))
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    summary = {"levels": results, "images": len(files), "max_batch": args.max_batch}
    if args.model and not args.no_baseline:
        summary["in_process"] = in_process(args.model, files, fields,
                                           min(args.requests, 200), args.max_batch)
        print(json.dumps({"in_process": summary["in_process"]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
