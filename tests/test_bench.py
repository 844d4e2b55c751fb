"""`cli.py bench` prints the throughput figures as JSON, from originals and the cache."""

import json

from conftest import run_cli_batch


def test_bench_prints_pipeline_and_step_figures(sample_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    # the default config asks for ImageNet weights, which cannot be downloaded here:
    # bench builds the model without them (they do not change the timing)
    prepared, proc = run_cli_batch([
        ["prepare", "--data-dir", sample_dir, "--size", "64", "--cache-dir", cache_dir],
        ["bench", "--data-dir", sample_dir, "--images", "24", "--steps", "2",
         "--set", "model.backbone=resnet18", "--set", "model.weights=imagenet",
         "--set", "data.image_size=48", "--set", "train.batch_size=8",
         "--set", "model.use_sex=true",        # the step is timed on {image, male}
         "--set", f"data.cache_dir={cache_dir}"]])
    assert prepared.returncode == 0 and proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout)
    assert figures["backend"] == "torch" and figures["images"] == 24
    assert figures["image_size"] == 48 and figures["batch_size"] == 8
    pipelines = figures["pipeline_images_per_s"]
    expected = {f"{loader}/{source}/{mode}"
                for loader, modes in (("tfdata", ("plain", "keras-cv")),
                                      ("pydataset", ("plain", "keras-cv", "keras", "numpy")))
                for source in ("originals", "cache64") for mode in modes}
    assert set(pipelines) == expected
    # decoding 1600x2080 PNGs is the bottleneck the cache removes
    for loader in ("tfdata", "pydataset"):
        assert pipelines[f"{loader}/cache64/plain"] > 2 * pipelines[f"{loader}/originals/plain"]
    step = figures["train_step"]
    assert step["fit_input"] == "tf.data"
    assert 0.5 < step["fit_over_train_on_batch"] < 2
