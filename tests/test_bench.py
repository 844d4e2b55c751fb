"""`cli.py bench` prints the throughput figures as JSON, from originals and the cache."""

import json

from conftest import run_cli


def test_bench_prints_pipeline_and_step_figures(sample_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    run_cli(["prepare", "--data-dir", str(sample_dir), "--size", "64", "--cache-dir",
             str(cache_dir)])
    proc = run_cli(["bench", "--data-dir", str(sample_dir), "--images", "24", "--steps", "2",
                    "--set", "model.backbone=resnet18", "--set", "model.weights=none",
                    "--set", "data.image_size=48", "--set", "train.batch_size=8",
                    "--set", f"data.cache_dir={cache_dir}"])
    figures = json.loads(proc.stdout)
    assert figures["backend"] == "torch" and figures["images"] == 24
    assert figures["image_size"] == 48 and figures["batch_size"] == 8
    pipelines = figures["pipeline_images_per_s"]
    expected = {f"{loader}/{source}/{mode}" for loader in ("tfdata", "pydataset")
                for source in ("originals", "cache64") for mode in ("plain", "augmented")}
    assert set(pipelines) == expected
    assert all(v > 0 for v in pipelines.values())
    # decoding 1500x2000 PNGs is the bottleneck the cache removes
    assert pipelines["tfdata/cache64/plain"] > pipelines["tfdata/originals/plain"]
    assert figures["decode_per_image_images_per_s"] > 0
    step = figures["train_step"]
    assert step["train_on_batch_ms"] > 0 and step["fit_ms"] > 0
    assert step["images_per_s"] > 0 and 0.2 < step["fit_over_train_on_batch"] < 5
    assert figures["peak_rss_mb"] > 100
