"""A command that needs a backend or an extra that is not installed stops with one
line naming the pip install command (exit code 2), run in child processes where the
package is hidden (tests/hide_modules)."""

from pathlib import Path

import pytest
from conftest import run_cli

from boneage_keras.extras import EXTRA_OF, install_hint


def one_line_refusal(proc, extra: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert f'pip install "boneage-keras[{extra}]"' in lines[0]
    return lines[0]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_missing_backend_names_its_extra(backend, bulk_dir):
    proc = run_cli(["train", "--config", "cpu-bench", "--data-dir", str(bulk_dir)],
                   backend=backend, hide=(backend,), check=False, timeout=120)
    line = one_line_refusal(proc, backend)
    assert f"KERAS_BACKEND={backend}" in line


def test_the_keras_cv_engine_without_tensorflow_names_the_tensorflow_extra(tmp_path,
                                                                          sample_dir):
    proc = run_cli(["train", "--config", "cpu-bench", "--data-dir", str(sample_dir),
                    "--set", "augment.engine=keras-cv", "--set", "data.image_size=32",
                    "--set", "train.epochs=1",
                    "--set", f"train.output_dir={tmp_path}"],
                   backend="torch", tensorflow=False, check=False, timeout=300)
    assert "augment.engine" in one_line_refusal(proc, "tensorflow")


def test_an_onnx_model_without_onnxruntime_names_the_export_extra(tmp_path, sample_dir):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: onnxruntime is missing first")
    (tmp_path / "model.json").write_text('{"image_size": 64, "channels": 1}')
    image = next((sample_dir / "images").glob("*.png"))
    proc = run_cli(["predict", "--model", str(model), str(image)], backend="torch",
                   hide=("onnxruntime",), check=False, timeout=300)
    assert str(model) in one_line_refusal(proc, "export")


def test_serve_without_its_packages_names_the_serve_extra(tmp_path):
    proc = run_cli(["serve", "--model", str(tmp_path)], backend="torch",
                   hide=("fastapi", "uvicorn"), check=False, timeout=120)
    assert "boneage serve" in one_line_refusal(proc, "serve")


def test_install_hint_groups_modules_by_extra():
    assert install_hint("onnx", "tf2onnx") == 'pip install "boneage-keras[export]"'
    assert install_hint("tensorflow", "tf2onnx") == 'pip install "boneage-keras[export,tensorflow]"'
    # every extra a hint can name is one setup.cfg defines
    import configparser

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert set(EXTRA_OF.values()) <= set(setup["options.extras_require"])
    assert install_hint("fastapi", "uvicorn") == 'pip install "boneage-keras[serve]"'
