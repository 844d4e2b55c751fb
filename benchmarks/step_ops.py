"""The ops one training step dispatches: our model through Keras on torch against the
native PyTorch anchor, counted by kind with torch.profiler.

    KERAS_BACKEND=torch python benchmarks/step_ops.py --size 64 --batch 4 --out ops.json

On a GPU every dispatched op is at least one kernel launch, and the profiler records the
same dispatches on a CPU, so the counts say on any machine how far a Keras-torch step
is from native PyTorch's. Both networks are ResNet50 with the Dense(256)-Dropout-Dense(1)
head (``gpu_speed.native_resnet50``, channels-last, Adam; ``model.build_model`` from
``configs/default.yaml`` through ``train_on_batch``, the step ``fit`` runs). Each is
counted over one step after two warm-up steps. The counts barely depend on the image
size or the batch (a few percent with the thread count). ``--compile`` adds our step
under torch.compile (``train.jit_compile``) with its graph breaks and graphs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 2

# op names by kind; "aten ops" counts every aten:: dispatch, nested ones included
COPIES = ("aten::copy_",)
CONVERSIONS = ("aten::to", "aten::_to_copy", "aten::contiguous")
CONVOLUTIONS = ("aten::convolution", "aten::convolution_backward")
ELEMENTWISE_MUL = ("aten::mul", "aten::mul_")
HOST_SYNCS = ("aten::_local_scalar_dense", "aten::item")


def classify(counts: Counter) -> dict[str, int]:
    """Profiler op counts (name -> calls) -> counts by kind."""
    def total(names) -> int:
        return sum(counts.get(n, 0) for n in names)

    return {
        "aten_ops": sum(c for n, c in counts.items() if n.startswith("aten::")),
        "copies": total(COPIES),
        "conversions": total(CONVERSIONS),
        "batch_norm_ops": sum(c for n, c in counts.items()
                              if n.startswith("aten::") and "batch_norm" in n),
        "convolutions": total(CONVOLUTIONS),
        "elementwise_mul": total(ELEMENTWISE_MUL),
        "host_syncs": total(HOST_SYNCS),
    }


def count_ops(step) -> Counter:
    """Every op ``step()`` dispatches, by name (after ``WARMUP`` calls)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(WARMUP):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return Counter({e.key: e.count for e in prof.key_averages()})


def native_row(size: int, batch: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_speed import _native_step, native_resnet50

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = native_resnet50().to(device).to(memory_format=torch.channels_last)
    # fused Adam (one kernel for all parameters; torch has it on CPUs too)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, fused=True)
    x, y = torch.rand(batch, 1, size, size) * 255, torch.rand(batch, 1) * 230
    counts = count_ops(_native_step(model, optimizer, x, y, "fp32", device))
    return {"contender": "native", "variant": "eager, channels-last, fused Adam",
            **classify(counts), "top": counts.most_common(12)}


def keras_row(size: int, batch: int, compiled: bool) -> dict:
    import keras
    import numpy as np

    from boneage_keras.config import load_config
    from boneage_keras.model import build_model
    from boneage_keras.train import compile_model

    cfg = load_config(REPO / "configs" / "default.yaml", [
        "model.weights=none", f"data.image_size={size}", f"train.batch_size={batch}",
        f"train.jit_compile={'true' if compiled else 'false'}"])
    model = compile_model(build_model(cfg), cfg)
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.uniform(0, 255, (batch, size, size, 1)), "float32")
    y = keras.ops.convert_to_tensor(rng.uniform(0, 230, (batch,)), "float32")
    row = {"contender": "keras-torch", "variant": "compiled" if compiled else "eager"}
    if compiled:
        from torch._dynamo.utils import counters

        counters.clear()
    counts = count_ops(lambda: model.train_on_batch(x, y))
    row.update(classify(counts))
    if compiled:
        row["graph_breaks"] = sum(counters["graph_break"].values())
        reasons: Counter = Counter()
        for reason, n in counters["graph_break"].items():
            reasons[reason.splitlines()[0]] += n
        row["graph_break_reasons"] = dict(reasons.most_common())
        row["graphs"] = int(counters["stats"].get("unique_graphs", 0))
    row["top"] = counts.most_common(12)
    return row


KINDS = ("aten_ops", "copies", "conversions", "batch_norm_ops", "convolutions",
         "elementwise_mul", "host_syncs")


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row gains ``ratio_to_native`` per kind (where native's count is not 0)."""
    native = next(r for r in rows if r["contender"] == "native")
    for r in rows:
        r["ratio_to_native"] = {k: round(r[k] / native[k], 2) for k in KINDS if native[k]}
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| step | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for r in rows:
        cells = [f"{r[k]:,}" + (f" ({r['ratio_to_native'][k]:.1f}x)"
                                if r["contender"] != "native" and k in r["ratio_to_native"]
                                else "") for k in KINDS]
        lines.append(f"| {r['contender']} {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--compile", action="store_true",
                        help="also count our step under torch.compile (slow to compile)")
    parser.add_argument("--out", default=None, help="write the counts as JSON here")
    args = parser.parse_args(argv)
    backend = os.environ.setdefault("KERAS_BACKEND", "torch")
    if backend != "torch":
        parser.error(f"KERAS_BACKEND={backend}: the counter profiles the torch backend; "
                     "run it with KERAS_BACKEND=torch")
    sys.path.insert(0, str(REPO))
    import torch

    rows = [native_row(args.size, args.batch), keras_row(args.size, args.batch, False)]
    if args.compile:
        rows.append(keras_row(args.size, args.batch, True))
    rows = with_ratios(rows)
    print(table(rows))
    if args.out:
        from boneage_keras.files import write_json

        write_json(args.out, {
            "date": time.strftime("%Y-%m-%d"), "size": args.size, "batch": args.batch,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else f"{platform.machine()} CPU, {os.cpu_count()} CPUs",
            "threads": torch.get_num_threads(), "versions": {
                "torch": torch.__version__, "keras": __import__("keras").__version__},
            "rows": rows})


if __name__ == "__main__":
    main()
