"""Grad-CAM on real radiographs: the map's shape and sanity, that it points at what the
model uses (masking the hottest region moves the prediction more than a random region),
and that both backends compute the same map through `cli.py explain`."""

import numpy as np
import pandas as pd
import pytest
from conftest import cli_here, run_cli

from boneage_keras.explain import _CamParts, grad_cam
from boneage_keras.images import load_image
from boneage_keras.inference import open_model


@pytest.fixture(scope="module")
def val_images(trained_run, bulk_dir):
    split = pd.read_csv(trained_run / "split.csv", dtype={"id": str})
    ids = split.loc[split["split"] == "val", "id"].head(24).tolist()
    paths = [str(bulk_dir / "images" / f"{i}.png") for i in ids]
    images = np.stack([load_image(p, 64, "stretch") for p in paths]).astype(np.float32)
    return paths, images


def _masked(images, corners, size):
    out = images.copy()
    for k, (r, c) in enumerate(corners):
        out[k, r:r + size, c:c + size, :] = 0.0
    return out


def test_grad_cam_maps_point_at_what_the_model_uses(trained_run, val_images):
    model = open_model(trained_run)
    _, images = val_images
    heat, months = grad_cam(model, images)
    assert heat.shape == (len(images), 64, 64)
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert (heat.std(axis=(1, 2)) > 1e-3).all(), "every map should be non-constant"
    np.testing.assert_allclose(months, model.predict(images, verbose=0).ravel(), atol=0.05)
    # regions: the cells of the conv feature map (2 x 2 at 64 px), the map's own
    # resolution. Masking (black) the hottest cell vs a random cell: the expectation
    # over a uniformly random cell is the mean over all cells
    cells = _CamParts(model).features.output.shape[1]
    size = 64 // cells
    per_cell = heat.reshape(len(heat), cells, size, cells, size).mean(axis=(2, 4))
    change = np.zeros((len(images), cells, cells))
    for i in range(cells):
        for j in range(cells):
            masked = _masked(images, [(i * size, j * size)] * len(images), size)
            change[:, i, j] = np.abs(model.predict(masked, verbose=0).ravel() - months)
    flat = per_cell.reshape(len(images), -1).argmax(axis=1)
    hot_change = change.reshape(len(images), -1)[np.arange(len(images)), flat]
    random_change = change.reshape(len(images), -1).mean(axis=1)
    print(f"mean |change| hottest {hot_change.mean():.2f} vs random "
          f"{random_change.mean():.2f} months")
    assert hot_change.mean() > random_change.mean()


def test_cli_explain_same_map_on_both_backends(trained_run, val_images, tmp_path):
    paths, images = val_images
    maps = {}
    for backend in ("torch", "tensorflow"):
        out = tmp_path / backend
        command = ["explain", str(trained_run), *paths[:4], "--out", str(out)]
        proc = cli_here(command) if backend == "torch" else run_cli(command, backend=backend)
        table = pd.read_csv(out / "explanations.csv", dtype={"id": str})
        assert len(table) == 4 and "gradcam_grid.png" in proc.stdout
        for figure in table["figure"]:
            assert (out / figure.split("/")[-1]).stat().st_size > 5_000
        assert (out / "gradcam_grid.png").is_file()
        stored = np.load(out / "heatmaps.npz")
        maps[backend] = np.stack([stored[i] for i in table["id"]]).astype(np.float32)
    assert maps["torch"].shape == (4, 64, 64)
    np.testing.assert_allclose(maps["torch"], maps["tensorflow"], atol=0.02)
    reference, _ = grad_cam(open_model(trained_run), images[:4])
    np.testing.assert_allclose(maps["torch"], reference, atol=0.01)
