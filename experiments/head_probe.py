"""Watch a model's head while it trains: does it learn, or collapse to the mean?

    python experiments/head_probe.py --config resnet18-improved --data-dir DIR \
        --images 3000 --steps 700 --every 50 [--set KEY=VALUE ...] [--out probe.json]

Trains the configured model (``model.build_model``, ``model.fit`` through the
configured loader and augmentation) on the first ``--images`` of a seeded sample, and
every ``--every`` steps measures it on 64 held-back images of the same sample:

* ``active_units``: hidden units (``model.head_units``) positive for at least one of
  them, and ``active_fraction`` (unit-image pairs positive), ``preactivation_mean``;
* ``prediction_std`` (months) over the 64 images and ``correlation`` with their true
  ages; the head's output computed from the features without dropout;
* ``feature_std``: the spread across images of the features the head reads (mean
  over features), ``w_out_norm``: the output layer's weight norm; ``model_gap``: the
  largest difference between this recomputed head and the model's own prediction.

The measurement that found why the ResNet18 study's improved model collapses from
scratch (experiments/2026-11-27-improved-model-collapse.md): its hidden ReLU units die under
Adam 1e-3 while heavy augmentation keeps the features uninformative, and once none is
left no gradient reaches the backbone. Prints one JSON object per probe and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE_IMAGES = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="resnet18-improved")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--images", type=int, default=3000,
                        help="images sampled; 64 of them are the probe, the rest train")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="write the probes here (JSON)")
    args = parser.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "torch")
    sys.path.insert(0, str(REPO))

    import keras
    import numpy as np

    from boneage_keras.config import load_config
    from boneage_keras.data import load_dataset
    from boneage_keras.files import write_json
    from boneage_keras.loaders import BoneAgeDataset, make_loader
    from boneage_keras.model import build_model
    from boneage_keras.train import compile_model

    cfg = load_config(args.config, [f"data.data_dir={args.data_dir}", *args.overrides])
    table = load_dataset(args.data_dir, check_images=False,
                         cache_dir=cfg.data.cache_dir)[0]
    sample = table.sample(n=min(args.images, len(table)), random_state=0)
    if len(sample) <= PROBE_IMAGES:
        parser.error(f"--images {args.images}: needs more than {PROBE_IMAGES} images")
    probe_df, train_df = sample.iloc[:PROBE_IMAGES], sample.iloc[PROBE_IMAGES:]
    keras.utils.set_random_seed(args.seed)
    ages = train_df["boneage"].to_numpy(np.float64)
    model = compile_model(build_model(cfg, float(ages.mean()), float(ages.std())), cfg)

    probe = BoneAgeDataset(probe_df, cfg, training=False)
    batches = [probe[k] for k in range(len(probe))]
    if isinstance(batches[0][0], dict):
        x = {key: np.concatenate([b[0][key] for b in batches]) for key in batches[0][0]}
    else:
        x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])

    head = cfg.model.head_units > 0
    out_layer = model.get_layer("head_out")
    reads = model.get_layer("head_dense").input if head else out_layer.input
    features_of = keras.Model(model.inputs, reads)
    scale = model.get_layer("boneage")
    rows: list[dict] = []

    def measure(step: int, loss: float | None) -> None:
        f = np.asarray(keras.ops.convert_to_numpy(features_of(x, training=False)),
                       np.float64)
        h = f
        row: dict = {"step": step, "loss": loss}
        if head:
            w, b = (keras.ops.convert_to_numpy(v) for v in
                    model.get_layer("head_dense").weights)
            z = f @ w + b
            h = keras.ops.convert_to_numpy(
                keras.activations.get(cfg.model.head_activation)(z))
            row.update(active_units=int((z > 0).any(axis=0).sum()),
                       active_fraction=round(float((z > 0).mean()), 4),
                       preactivation_mean=round(float(z.mean()), 3))
        w_out, b_out = (keras.ops.convert_to_numpy(v) for v in out_layer.weights)
        months = (h @ w_out + b_out)[:, 0] * scale.std + scale.mean
        spread = float(months.std())
        # the head recomputed here is the model's own (inference mode: no dropout)
        predicted = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))[:, 0]
        row["model_gap"] = float(np.abs(months - predicted).max())
        row.update(prediction_std=round(spread, 3),
                   correlation=round(float(np.corrcoef(months, y)[0, 1]), 3)
                   if spread > 1e-9 else 0.0,
                   feature_std=round(float(f.std(axis=0).mean()), 4),
                   w_out_norm=round(float(np.linalg.norm(w_out)), 4))
        rows.append(row)
        print(json.dumps(row), flush=True)

    class Probe(keras.callbacks.Callback):
        step = 0

        def on_train_batch_end(self, batch, logs=None):
            Probe.step += 1
            if Probe.step % args.every == 0:
                measure(Probe.step, round(float((logs or {}).get("loss", np.nan)), 2))

    data = make_loader(train_df, cfg, training=True)
    per_epoch = len(data)
    epochs = -(-args.steps // per_epoch)
    measure(0, None)
    started = time.perf_counter()
    model.fit(data, epochs=epochs, steps_per_epoch=min(args.steps, per_epoch),
              callbacks=[Probe()], verbose=0)
    seconds = time.perf_counter() - started
    print(f"\n{args.config} {' '.join(args.overrides)}: {Probe.step} steps in "
          f"{seconds:.0f} s")
    print(f"{'step':>6} {'active':>7} {'pre-act':>8} {'pred std':>9} {'corr':>6} "
          f"{'feat std':>9}")
    for r in rows:
        print(f"{r['step']:>6} {r.get('active_units', '-')!s:>7} "
              f"{r.get('preactivation_mean', '-')!s:>8} {r['prediction_std']:>9.2f} "
              f"{r['correlation']:>6.2f} {r['feature_std']:>9.3f}")
    if args.out:
        write_json(args.out, {"config": args.config, "overrides": args.overrides,
                              "steps": Probe.step, "seconds": seconds, "probes": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
