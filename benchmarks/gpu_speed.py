"""GPU training speed, side by side in one run on one machine.

    python benchmarks/gpu_speed.py --out gpu-speed.json                  # on a GPU
    python benchmarks/gpu_speed.py --size 32 --batches 2 --steps 2 --quick  # on a CPU

Each contender runs in its own process (a Keras backend is fixed per process):

* ``native``: the anchor, plain PyTorch: ResNet50 in torchvision's layout (v1.5) with
  our Dense(256)-ReLU-Dropout(0.3)-Dense(1) head, channels-last memory, bf16 autocast
  (and fp32/TF32 for reference), fused Adam, MAE loss.
* ``keras-torch``: our model (``model.build_model``, ResNet50, no pretrained weights)
  through ``model.fit`` on the torch backend: eager fp32, eager bf16 mixed precision,
  and torch.compile (``jit_compile``) bf16.
* ``keras-jax``: the same on JAX (jit), fp32 and bf16.
* ``pipeline``: our input pipeline from a prepared cache at the model's size with the
  study's default augmentation, each engine (and the Keras engine on the accelerator),
  in images/s on this machine's cores.

It prints one table (images/s, peak accelerator memory, ratio to native at the same
batch size and precision) and writes every figure to ``--out``. ``--profile`` adds a
torch profiler summary of one Keras-torch step (where the time goes). Targets (issue
"GPU training at the speed of the hardware"): the fastest backend >= 0.8x native, the
pipeline >= 1.2x that training rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAD_UNITS, DROPOUT = 256, 0.3


# --- the native anchor ---------------------------------------------------------------


def native_resnet50():
    """torchvision-layout ResNet50 (stride in the 3x3 conv, v1.5) + our head, gray in."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or inplanes != planes * 4:
                self.down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride,
                                                    bias=False), nn.BatchNorm2d(planes * 4))

        def forward(self, x):
            identity = x if self.down is None else self.down(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
            inplanes = 64
            for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2),
                                           (512, 3, 2)):
                for b in range(blocks):
                    layers.append(Bottleneck(inplanes, planes, stride if b == 0 else 1))
                    inplanes = planes * 4
            self.body = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.Linear(2048, HEAD_UNITS), nn.ReLU(inplace=True),
                                      nn.Dropout(DROPOUT), nn.Linear(HEAD_UNITS, 1))

        def forward(self, gray):
            x = (gray / 255.0 - 0.45) / 0.225
            x = self.body(x.expand(-1, 3, -1, -1))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return Net()


def run_native(size: int, batches: list[int], steps: int, warmup: int,
               precisions: list[str]) -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    for precision in precisions:
        for batch in batches:
            model = native_resnet50().to(device).to(memory_format=torch.channels_last)
            optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, fused=cuda)
            x = torch.rand(batch, 1, size, size) * 255
            y = torch.rand(batch, 1) * 230
            if cuda:
                x, y = x.pin_memory(), y.pin_memory()
                torch.cuda.reset_peak_memory_stats()

            step = _native_step(model, optimizer, x, y, precision, device)
            seconds = _timed(step, steps, warmup, cuda)
            rows.append({"contender": "native", "variant": "eager", "precision": precision,
                         "batch": batch, "images_per_s": batch * steps / seconds,
                         "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30
                         if cuda else None,
                         "parameters": sum(p.numel() for p in model.parameters())})
    return rows


def _native_step(model, optimizer, x, y, precision: str, device):
    import torch

    def step():
        xb = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        yb = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (model(xb).float() - yb).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _timed(step, steps: int, warmup: int, cuda: bool) -> float:
    import torch

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


# --- our model through Keras -----------------------------------------------------------


def run_keras(size: int, batches: list[int], steps: int, warmup: int,
              variants: list[str], profile_dir: str | None) -> list[dict]:
    import keras
    import numpy as np

    from boneage_keras.backend import gpu_available, mixed_precision_policy
    from boneage_keras.config import load_config
    from boneage_keras.model import build_model
    from boneage_keras.train import compile_model

    class Batches(keras.utils.PyDataset):
        """The same batch ``n`` times (no workers): fit's own loop, no input cost."""

        def __init__(self, x, y, n):
            super().__init__()
            self.x, self.y, self.n = x, y, n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return self.x, self.y

    backend = keras.backend.backend()
    rows = []
    for variant in variants:
        mode, precision = variant.split("-")
        for batch in batches:
            cfg = load_config(REPO / "configs" / "default.yaml", [
                "model.weights=none", f"data.image_size={size}", f"train.batch_size={batch}",
                f"train.jit_compile={'true' if mode in ('compiled', 'jit') else 'false'}"])
            if precision == "bf16":
                keras.mixed_precision.set_global_policy(mixed_precision_policy())
            model = compile_model(build_model(cfg), cfg)
            rng = np.random.default_rng(0)
            x = rng.uniform(0, 255, (batch, size, size, 1)).astype("float32")
            y = rng.uniform(0, 230, (batch,)).astype("float32")
            data = Batches(x, y, steps)
            model.fit(Batches(x, y, warmup), epochs=1, verbose=0)
            _reset_peak(backend)
            start = time.perf_counter()
            model.fit(data, epochs=1, verbose=0)
            _sync(backend)
            seconds = time.perf_counter() - start
            rows.append({"contender": f"keras-{backend}", "variant": mode,
                         "precision": precision, "batch": batch,
                         "images_per_s": batch * steps / seconds,
                         "peak_gpu_gb": _peak_gb(backend), "gpu": gpu_available(),
                         "parameters": int(sum(np.prod(v.shape)
                                               for v in model.trainable_weights))})
            if profile_dir and backend == "torch" and batch == batches[-1]:
                _profile_torch(model, x, y, Path(profile_dir) / f"profile-{variant}.txt")
            keras.mixed_precision.set_global_policy("float32")
            del model
    return rows


def _sync(backend: str) -> None:
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _reset_peak(backend: str) -> None:
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def _peak_gb(backend: str) -> float | None:
    if backend == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() \
            else None
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else peak / 2**30
    return None


def _profile_torch(model, x, y, target: Path) -> None:
    """Where one Keras-torch training step spends its time (top ops, CPU and GPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(3):
            model.train_on_batch(x, y)
        _sync("torch")
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(prof.key_averages().table(sort_by=key, row_limit=40))


# --- the input pipeline ----------------------------------------------------------------


def run_pipeline(size: int, batch: int, data_dir: str, images: int, workers: int) -> list[dict]:
    """The input pipeline's rates, from a cache made for the run and removed after it."""
    with tempfile.TemporaryDirectory(prefix="gpu-speed-cache-") as cache_dir:
        return _run_pipeline(size, batch, data_dir, images, workers, cache_dir)


def _run_pipeline(size: int, batch: int, data_dir: str, images: int, workers: int,
                  cache_dir: str) -> list[dict]:
    import keras

    from boneage_keras.augment import build_augmenter, tensorflow_available
    from boneage_keras.bench import _repeat_table, iterate
    from boneage_keras.cache import find_cache, prepare_cache
    from boneage_keras.config import load_config
    from boneage_keras.data import load_dataset
    from boneage_keras.loaders import BoneAgeDataset, make_tf_dataset

    cache_size = max(256, size)
    prepare_cache(data_dir, cache_size, "pad", cache_dir, progress=False)
    table = _repeat_table(load_dataset(data_dir, check_images=False)[0], images)
    cache = find_cache(table, data_dir, size, "pad", cache_dir)
    cfg = load_config(REPO / "configs" / "default.yaml", [
        f"data.image_size={size}", f"train.batch_size={batch}", f"data.workers={workers}"])
    rows = []
    engines = ["keras", "keras-accelerator"] + (["keras-cv"] if tensorflow_available() else [])
    for engine in engines:
        augmenter = build_augmenter(cfg.augment, size, seed=0,
                                    engine=engine.replace("-accelerator", ""))
        if engine == "keras-accelerator":
            augmenter.device = None         # the backend's default device: the GPU
        data = BoneAgeDataset(table, cfg, True, augmenter, reader=cache.load)
        start = time.perf_counter()
        count = sum(len(batch[1]) for batch in iterate(data))
        rows.append({"contender": "pipeline", "variant": f"pydataset/{engine}",
                     "batch": batch, "images_per_s": count / (time.perf_counter() - start),
                     "workers": workers, "backend": keras.backend.backend()})
    if tensorflow_available():
        augmenter = build_augmenter(cfg.augment, size, seed=0, engine="keras-cv")
        data = make_tf_dataset(table, cfg, True, augmenter, reader=cache.load)
        start = time.perf_counter()
        count = sum(len(batch[1]) for batch in iterate(data))
        rows.append({"contender": "pipeline", "variant": "tfdata/keras-cv", "batch": batch,
                     "images_per_s": count / (time.perf_counter() - start),
                     "workers": os.cpu_count(), "backend": keras.backend.backend()})
    return rows


# --- the driver ----------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    if args.child == "native":
        rows = run_native(args.size, batches, args.steps, args.warmup,
                          ["fp32"] if args.quick else ["bf16", "fp32"])
    elif args.child == "keras":
        import keras

        if args.quick:        # a CPU smoke test: fp32 only (bf16 is slow on CPUs)
            variants = ["eager-fp32" if keras.backend.backend() == "torch" else "jit-fp32"]
        elif keras.backend.backend() == "torch":
            variants = ["eager-fp32", "eager-bf16", "compiled-bf16"]
        else:
            variants = ["jit-fp32", "jit-bf16"]
        rows = run_keras(args.size, batches, args.steps, args.warmup, variants,
                         args.profile_dir)
    else:
        rows = run_pipeline(args.size, max(batches), args.data_dir, args.images,
                            args.workers)
    print("ROWS " + json.dumps(rows))


def _spawn(mode: str, backend: str, args: argparse.Namespace, extra: list[str]) -> list[dict]:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--child", mode, "--size", str(args.size),
           "--batches", args.batches, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--data-dir", args.data_dir, "--images", str(args.images),
           "--workers", str(args.workers), *(["--quick"] if args.quick else []), *extra]
    print(f"... {mode} on {backend}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROWS ")]
    if proc.returncode != 0 or not lines:
        return [{"contender": mode, "backend": backend, "error": proc.stderr[-2000:]}]
    return json.loads(lines[-1][5:])


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each training row gains ``ratio_to_native``: its images/s over native's at the
    same batch size and precision (the pipeline's rows: over the fastest training)."""
    native = {(r["batch"], r["precision"]): r["images_per_s"] for r in rows
              if r.get("contender") == "native" and "images_per_s" in r}
    fastest = max((r["images_per_s"] for r in rows if "precision" in r
                   and r.get("contender", "").startswith("keras") and "images_per_s" in r),
                  default=None)
    for r in rows:
        if "precision" in r and (r["batch"], r["precision"]) in native:
            r["ratio_to_native"] = r["images_per_s"] / native[(r["batch"], r["precision"])]
        if r.get("contender") == "pipeline" and fastest and "images_per_s" in r:
            r["ratio_to_fastest_training"] = r["images_per_s"] / fastest
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| contender | variant | precision | batch | images/s | peak GPU GB | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['contender']} ({r['backend']}) | failed | | | | | |")
            continue
        ratio = r.get("ratio_to_native", r.get("ratio_to_fastest_training"))
        peak = r.get("peak_gpu_gb")
        lines.append(f"| {r['contender']} | {r['variant']} | {r.get('precision', '')} | "
                     f"{r['batch']} | {r['images_per_s']:.0f} | "
                     f"{'' if peak is None else f'{peak:.1f}'} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"
                                                  / "rsna-sample"))
    parser.add_argument("--images", type=int, default=2048,
                        help="images per pipeline pass (the data repeated)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--backends", default="torch,jax")
    parser.add_argument("--quick", action="store_true",
                        help="fp32 only, no torch.compile (a CPU smoke test)")
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--profile-dir", default=None,
                        help="write a torch profiler summary of one Keras-torch step here")
    parser.add_argument("--out", default=None, help="write all figures as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    sys.path.insert(0, str(REPO))
    from boneage_keras.files import write_json  # atomic: a cut run leaves whole JSON

    extra = ["--profile-dir", args.profile_dir] if args.profile_dir else []
    contenders = [("native", "torch", [])]
    contenders += [("keras", backend, extra) for backend in args.backends.split(",")]
    if not args.no_pipeline:
        contenders.append(("pipeline", args.backends.split(",")[0], []))
    rows: list[dict] = []
    for done, (mode, backend, flags) in enumerate(contenders, start=1):
        rows = with_ratios(rows + _spawn(mode, backend, args, flags))
        # the figures so far, after every contender: a run stopped by a time limit
        # keeps what it measured
        print(table(rows), flush=True)
        if args.out:
            write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "size": args.size,
                                  "rows": rows, "machine": _machine(),
                                  "complete": done == len(contenders)})


def _machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs"
    except ImportError:
        pass
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
