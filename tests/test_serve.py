"""The model server through a real uvicorn process on loopback: the answers equal
``predict``'s on the same export, bad input gets a clear 4xx, the token guards the API,
no training framework is imported, and SIGTERM lets requests in flight finish."""

import base64
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, backend_env, cli_here
from PIL import Image
from test_dicom import NAME, PATIENT_ID, write_dicom

FRAMEWORKS = ("keras", "torch", "tensorflow", "jax")
IDS = ("1437", "1440", "1472")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python cli.py serve ARGS`` on a free port, waited for on /readyz."""

    def __init__(self, args, hide=FRAMEWORKS, token=None, env=None, report=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = ("import atexit, json, sys, runpy\n"
                "def report():\n"
                f"    open({str(report)!r}, 'w').write(json.dumps(sorted(\n"
                f"        m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))\n"
                + ("atexit.register(report)\n" if report else "")
                + f"sys.argv = ['cli.py', 'serve', *{[str(a) for a in args]!r},"
                f" '--port', '{self.port}']\n"
                f"runpy.run_path({str(REPO / 'cli.py')!r}, run_name='__main__')\n")
        environment = {**backend_env("torch", hide=hide), **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                                        env=environment, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, timeout=120, headers=headers)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.process.stderr.read()[-3000:]}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server not ready in 120 s")

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=30)
        self.client.close()
        return self.process.returncode, err


@pytest.fixture(scope="session")
def deploy(trained_run, tmp_path_factory):
    """The trained run, recalibrated on its calibration split and exported to ONNX
    (and .keras, for Grad-CAM)."""
    root = tmp_path_factory.mktemp("serve")
    run = root / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval*", "*.png",
                                                                   "report.html"))
    cli_here(["evaluate", run, "--recalibrate", "--out", root / "eval"])
    cli_here(["export", run, "--format", "onnx", "--format", "keras",
              "--out", root / "deploy"])
    return root / "deploy"


@pytest.fixture(scope="session")
def images(sample_dir, tmp_path_factory):
    """Real radiographs as PNG, JPEG and WebP files, and as 16-bit MONOCHROME2 and
    12-bit MONOCHROME1 DICOM files with a planted patient name and ID."""
    root = tmp_path_factory.mktemp("uploads")
    out = {k: [] for k in ("png", "jpeg", "webp", "m2", "m1")}
    for n, image_id in enumerate(IDS):
        gray = np.asarray(Image.open(sample_dir / "images" / f"{image_id}.png")
                          .convert("L").resize((400, 520), Image.BILINEAR))
        for kind, options in (("png", {}), ("jpeg", {"quality": 95}),
                              ("webp", {"lossless": True})):
            path = root / f"{image_id}.{kind}"
            Image.fromarray(gray).save(path, format=kind.upper(), **options)
            out[kind].append(path)
        v = gray.astype(np.int64)
        out["m2"].append(write_dicom(root / f"{image_id}-m2.dcm", v * 257, 16, sex="M",
                                     age=f"{10 + n:03d}Y"))
        out["m1"].append(write_dicom(root / f"{image_id}-m1.dcm", (255 - v) * 16, 12,
                                     "MONOCHROME1", sex="F",
                                     dates=("20100301", "20220315")))
    return out


@pytest.fixture(scope="session")
def server(deploy):
    """The export served on a machine without Keras or any backend, nor the JPEG
    decoders of compressed DICOM files (hidden)."""
    running = Server(["--model", deploy, "--max-upload-mb", "8"],
                     hide=(*FRAMEWORKS, "libjpeg", "pylibjpeg", "gdcm"))
    yield running
    running.stop()


def post(server, path, *, sex=None, age=None, **fields):
    data = {k: v for k, v in {"sex": sex, "chronological_age_months": age,
                              **fields}.items() if v is not None}
    with open(path, "rb") as f:
        return server.client.post("/v1/predict", files={"file": (Path(path).name, f)},
                                  data=data)


def test_months_and_intervals_equal_predict_for_every_format(server, deploy, images):
    paths = [p for kind in ("png", "jpeg", "webp", "m2", "m1") for p in images[kind]]
    expected = cli_here(["predict", "--model", deploy / "model.onnx", "--recalibrate",
                         "--output", deploy.parent / "expected.csv", *paths])
    assert expected.returncode == 0
    table = pd.read_csv(deploy.parent / "expected.csv")
    assert table["predicted"].std() > 1        # a trained model: the months differ
    for path, row in zip(paths, table.itertuples()):
        answer = post(server, path).json()
        assert answer["bone_age_months"] == pytest.approx(row.predicted, abs=0.01), path
        assert answer["interval"]["lower"] == pytest.approx(row.lower90, abs=0.01)
        assert answer["interval"]["upper"] == pytest.approx(row.upper90, abs=0.01)
        assert answer["interval"]["level"] == 0.9
        assert answer["uncorrected_months"] == pytest.approx(row.predicted_uncorrected,
                                                             abs=0.01)
    # the raw body with the fields as query parameters: the same answer
    raw = server.client.post("/v1/predict?chronological_age_months=100",
                             content=images["png"][0].read_bytes(),
                             headers={"content-type": "image/png"}).json()
    assert raw["bone_age_months"] == pytest.approx(table["predicted"][0], abs=0.01)
    assert raw["difference_months"] == pytest.approx(raw["bone_age_months"] - 100, abs=0.01)


def test_dicom_header_gives_sex_and_age_and_no_identifier_leaks(server, images):
    answer = post(server, images["m2"][1]).json()
    assert answer["sex"] == {"value": "M", "source": "dicom_header"}
    assert answer["chronological_age_months"] == {"value": 132.0, "source": "PatientAge"}
    assert "sex_from_header" in [w["code"] for w in answer["warnings"]]
    dated = post(server, images["m1"][0]).json()
    assert dated["chronological_age_months"]["source"] == "StudyDate - PatientBirthDate"
    assert dated["chronological_age_months"]["value"] == pytest.approx(144.5, abs=0.1)
    contradicted = post(server, images["m2"][0], sex="F")
    assert contradicted.status_code == 422
    assert contradicted.json()["code"] == "sex_contradicts_header"
    assert post(server, images["m2"][0], sex="F", sex_override="true").json()["sex"] == \
        {"value": "F", "source": "form"}
    for response in (answer, dated, contradicted.json()):
        text = json.dumps(response)
        assert NAME not in text and PATIENT_ID not in text and "Doe" not in text


def test_inverted_image_is_warned_and_predicted_as_the_original(server, images, tmp_path):
    gray = np.asarray(Image.open(images["png"][0]))
    negative = tmp_path / "negative.png"
    Image.fromarray(255 - gray).save(negative)
    original, inverted = post(server, images["png"][0]).json(), post(server, negative).json()
    assert "inverted_image" in [w["code"] for w in inverted["warnings"]]
    assert "inverted_image" not in [w["code"] for w in original["warnings"]]
    assert inverted["bone_age_months"] == pytest.approx(original["bone_age_months"], abs=0.01)


def test_bad_input_is_a_clear_4xx(server, images, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    png = images["png"][0].read_bytes()
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png[:len(png) // 2])
    cases = [
        (post(server, text), 415, "unsupported_format", "looks like plain text"),
        (post(server, truncated), 422, "unreadable_image", "cannot decode this PNG"),
        (post(server, images["png"][0], age="400"), 422, "bad_age", "outside 0-300"),
        (post(server, images["png"][0], age="ten"), 422, "bad_age", "not a number"),
        (post(server, images["png"][0], tta="9"), 422, "bad_tta", "choose 1"),
        (post(server, images["png"][0], sex="X"), 422, "bad_sex", "give M or F"),
        (post(server, images["png"][0], explain="heatmap"), 422, "bad_explain",
         "give none or gradcam"),
        (post(server, images["png"][0], explain="gradcam"), 501, "explain_unavailable",
         "needs Keras and its backend"),
        (server.client.post("/v1/predict", data={"sex": "M"}, files={"other": b"x"}), 422,
         "missing_file", "no `file` part"),
        (server.client.post("/v1/predict", content=b"x" * (9 * 2**20),
                            headers={"content-type": "image/png"}), 413, "too_large",
         "limit of 8 MB"),
        (server.client.get("/v1/nothing"), 404, "not_found", "Not Found"),
    ]
    for response, status, code, words in cases:
        body = response.json()
        assert (response.status_code, body["code"]) == (status, code), body
        assert words in body["error"] and "\n" not in body["error"]
    # DICOM files that are no single grayscale radiograph, or that cannot be decoded
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    small = np.zeros((8, 8), int)
    colour = write_dicom(tmp_path / "colour.dcm", small, 8)
    ds = pydicom.dcmread(colour)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
    ds.save_as(colour)
    lossless = write_dicom(tmp_path / "lossless.dcm", small, 12)
    ds = pydicom.dcmread(lossless)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(lossless)
    for path, words in (
            (write_dicom(tmp_path / "none.dcm", None, 16, pixels=False),
             "a DICOM file without pixel data"),
            (write_dicom(tmp_path / "frames.dcm", small, 16, frames=2),
             "a multi-frame DICOM (2 frames)"),
            (colour, "a colour DICOM (RGB)"),
            (lossless, "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)")):
        response = post(server, path)
        body = response.json()
        assert (response.status_code, body["code"]) == (422, "unreadable_image"), body
        assert words in body["error"] and NAME not in body["error"]
    # over the limit without a Content-Length (chunked): refused while it streams
    streamed = server.client.post("/v1/predict", content=(b"x" * 2**20 for _ in range(9)),
                                  headers={"content-type": "image/png"})
    assert streamed.status_code == 413 and "limit of 8 MB" in streamed.json()["error"]
    # 50 megapixels and more: refused from the header, before decoding
    big = io.BytesIO()
    Image.new("L", (8000, 6400)).save(big, format="PNG")
    response = server.client.post("/v1/predict", files={"file": ("big.png", big.getvalue())})
    assert response.status_code == 413 and response.json()["code"] == "too_many_pixels"


def test_batch_gives_one_result_or_error_per_file_in_order(server, images, tmp_path):
    text = tmp_path / "x.txt"
    text.write_text("hello")
    paths = [images["png"][0], text, images["m1"][1], images["jpeg"][2]]
    files = [("file", (p.name, p.read_bytes())) for p in paths]
    data = {"id": ["a", "b", "c", "d"]}
    results = server.client.post("/v1/predict/batch", files=files, data=data).json()["results"]
    assert [r["id"] for r in results] == ["a", "b", "c", "d"]
    assert results[1]["code"] == "unsupported_format" and results[1]["status"] == 415
    singles = [post(server, p).json() for p in (paths[0], paths[2], paths[3])]
    for got, single in zip((results[0], results[2], results[3]), singles):
        assert got["bone_age_months"] == pytest.approx(single["bone_age_months"], abs=0.01)
    too_many = [("file", (f"{n}.png", images["png"][0].read_bytes())) for n in range(33)]
    response = server.client.post("/v1/predict/batch", files=too_many)
    assert response.status_code == 422 and response.json()["code"] == "too_many_files"


def test_model_health_and_metrics_routes(server, deploy, images, tmp_path):
    negative = tmp_path / "negative.png"
    Image.fromarray(255 - np.asarray(Image.open(images["png"][1]))).save(negative)
    assert post(server, images["png"][0]).status_code == 200
    assert post(server, negative).status_code == 200          # warned: inverted
    card = server.client.get("/v1/model").json()
    assert card["notice"] == "research use only, not for diagnostic use"
    assert card["sha256"] == __import__("hashlib").sha256(
        (deploy / "model.onnx").read_bytes()).hexdigest()
    assert card["calibration"]["fitted_on"] == "calibration split"
    assert card["model_json"]["image_size"] == 64 and "onnxruntime" in card["versions"]
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert server.client.get(path).status_code == 200
    spec = server.client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model"} <= set(spec["paths"])
    docs = server.client.get("/docs")                   # the package's own API page
    assert docs.status_code == 200 and '<script src="/static/docs.js">' in docs.text
    links = re.findall(r'(?:src|href)="([^"]*)"', docs.text)
    assert links and all(u.startswith("/") and not u.startswith("//") for u in links)
    page = server.client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    script = server.client.get("/static/app.js").text      # no address elsewhere
    assert script.count("://") == script.count("http://www.w3.org/2000/svg") == 1
    assert "://" not in server.client.get("/static/docs.js").text
    metrics = server.client.get("/metrics").text
    assert 'boneage_requests_total{route="/v1/predict",status="200"}' in metrics
    assert 'boneage_stage_seconds_count{stage="decode"}' in metrics
    assert 'boneage_stage_seconds_count{stage="inference"}' in metrics
    assert "boneage_batch_images_bucket" in metrics
    assert 'boneage_warnings_total{kind="inverted_image"}' in metrics


def test_token_host_sigterm_and_no_framework_imported(deploy, images, tmp_path, request):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-the-test\n")
    refused = cli_here(["serve", "--model", deploy, "--host", "0.0.0.0"], check=False)
    assert refused.returncode == 2 and "--token-file" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    report = tmp_path / "modules.json"
    temp = tmp_path / "tmp"
    temp.mkdir()
    server = Server(["--model", deploy, "--token-file", token_file], hide=(),
                    token="s3cret-token-of-the-test", env={"TMPDIR": str(temp)},
                    report=report)
    request.addfinalizer(lambda: server.process.poll() is None and server.process.kill())
    anonymous = httpx.post(f"{server.url}/v1/predict", files={"file": b"x"})
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthorized"
    wrong = httpx.get(f"{server.url}/v1/model", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{server.url}/readyz").status_code == 200     # open to probes
    assert post(server, images["png"][0]).status_code == 200
    # a 7 MB DICOM is decoded in memory: nothing is written to the temporary folder
    # (which holds only what onnxruntime wrote at start-up, its .ses file)
    big = np.tile(np.asarray(Image.open(images["png"][0]), np.int64) * 257, (5, 5))
    dicom = write_dicom(tmp_path / "big.dcm", big[:1900, :1900], 16)
    assert dicom.stat().st_size > 7e6
    before = sorted(p.name for p in temp.iterdir())
    assert post(server, dicom).status_code == 200
    assert sorted(p.name for p in temp.iterdir()) == before
    # SIGTERM with a batch in flight: it finishes, then the server exits 0
    files = [("file", (f"{n}.png", images["png"][n % 3].read_bytes())) for n in range(24)]
    answers = {}

    def send():
        answers["batch"] = server.client.post("/v1/predict/batch", files=files)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    sender.join(timeout=30)
    code = server.process.wait(timeout=30)
    log = server.process.stderr.read()
    assert answers["batch"].status_code == 200
    assert len(answers["batch"].json()["results"]) == 24
    assert code == 0, log[-2000:]
    assert json.loads(report.read_text()) == []           # no training framework loaded
    assert "ready: http://127.0.0.1:" in log and "sha256" in log
    assert NAME not in log and PATIENT_ID not in log and "s3cret" not in log


@pytest.fixture(scope="session")
def sex_export(tmp_path_factory):
    """A quarter-width ResNet18 with the sex input, 64 px, untrained but with a random
    output layer (its zero initialisation would answer the mean for every image),
    exported to ONNX and as a Triton repository."""
    from boneage_keras.config import load_config
    from boneage_keras.model import build_model

    root = tmp_path_factory.mktemp("sexmodel")
    cfg = load_config(REPO / "configs" / "cpu-bench.yaml", ["data.image_size=64"])
    model = build_model(cfg, 120.0, 40.0)
    out = model.get_layer("head_out")
    kernel, bias = out.get_weights()
    out.set_weights([np.random.default_rng(0).normal(0, 0.3, kernel.shape), bias])
    model.save(root / "m.keras")
    cli_here(["export", root / "m.keras", "--format", "onnx", "--format", "triton",
              "--out", root / "deploy"])
    return root / "deploy"


def test_a_sex_model_needs_the_sex_and_an_ensemble_averages(sex_export, images):
    server = Server(["--model", sex_export, "--model", sex_export, "--tta", "2"])
    try:
        missing = post(server, images["png"][0])
        assert missing.status_code == 422 and missing.json()["code"] == "sex_required"
        male, female = (post(server, images["png"][0], sex=s).json() for s in "MF")
        assert male["members"]["months"][0] == male["members"]["months"][1]
        assert male["tta"]["views"] == ["identity", "flip"]
        assert male["bone_age_months"] != female["bone_age_months"]   # sex enters
        assert male["interval"] is None
        assert "calibration_missing" in [w["code"] for w in male["warnings"]]
        from_header = post(server, images["m1"][0]).json()             # PatientSex F
        assert from_header["bone_age_months"] == pytest.approx(
            post(server, images["m1"][0], sex="F").json()["bone_age_months"], abs=0.01)
    finally:
        server.stop()


def test_a_busy_server_answers_503_and_drops_a_stalled_upload(sex_export, images):
    """With the model slowed (an ensemble of 24 copies, one image per model run) and
    the queue limited to 2: a burst of 16 gets answers or 503 queue_full with
    Retry-After, never another status, and the server answers normally afterwards; an
    upload that stops sending is dropped with a 408 after the stall limit; with a wait
    limit shorter than a model run, the image is answered 503 timeout."""
    from concurrent.futures import ThreadPoolExecutor

    data = images["png"][0].read_bytes()

    def one(server):
        return server.client.post("/v1/predict?sex=M", content=data,
                                  headers={"content-type": "image/png"})

    server = Server(["--model", sex_export] * 24 + [
        "--max-batch", "1", "--queue-limit", "2", "--stall-limit-s", "1"])
    try:
        with ThreadPoolExecutor(16) as pool:
            burst = list(pool.map(lambda _: one(server), range(16)))
        codes = [r.json().get("code", "ok") if r.status_code != 200 else "ok"
                 for r in burst]
        assert {r.status_code for r in burst} <= {200, 503}, codes
        assert set(codes) == {"ok", "queue_full"}, codes
        busy = next(r for r in burst if r.status_code == 503)
        assert busy.headers["retry-after"] == "1"
        assert "busy (2 requests waiting)" in busy.json()["error"]
        assert one(server).status_code == 200                 # recovered
        assert 'boneage_rejections_total{reason="queue_full"}' in \
            server.client.get("/metrics").text

        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as raw:
            raw.sendall(b"POST /v1/predict?sex=M HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                        + data[:1000])
            started = time.monotonic()
            reply = b""
            while b"stalled_upload" not in reply:
                chunk = raw.recv(4096)
                if not chunk:
                    break
                reply += chunk
            waited = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"the upload stalled for 1 s" in reply and 0.9 < waited < 10
    finally:
        server.stop()

    server = Server(["--model", sex_export, "--wait-limit-s", "0.0001"])
    try:
        late = one(server)
    finally:
        server.stop()
    assert late.status_code == 503 and late.headers["retry-after"] == "5"
    assert late.json() == {"code": "timeout", "error": "the image waited 0.0001 s for the "
                           "model; retry later."}


def test_triton_repository_and_the_documented_kserve_request(sex_export, images):
    """config.pbtxt names the ONNX graph's tensors; the KServe V2 request of
    docs/tf-serving-triton.md, filled for this model, gives predict's months."""
    import onnxruntime

    config = (sex_export / "triton" / "boneage" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "dynamic_batching" in config
    assert (sex_export / "triton" / "boneage" / "1" / "model.onnx").read_bytes() == \
        (sex_export / "model.onnx").read_bytes()
    graph = onnxruntime.InferenceSession(str(sex_export / "model.onnx"))
    for tensor in [*graph.get_inputs(), *graph.get_outputs()]:
        dims = ", ".join(str(d) for d in tensor.shape[1:])
        assert f'name: "{tensor.name}"\n    data_type: TYPE_FP32\n    dims: [ {dims} ]' \
            in config
    page = (REPO / "docs" / "tf-serving-triton.md").read_text()
    request = json.loads(page.split("```json\n")[1].split("```")[0])
    inputs = {i.name: i for i in graph.get_inputs()}
    assert [t["name"] for t in request["inputs"]] == list(inputs)
    assert request["outputs"][0]["name"] == graph.get_outputs()[0].name
    meta = json.loads((sex_export / "model.json").read_text())
    from boneage_keras.images import load_image

    pixels = load_image(images["png"][0], meta["image_size"], meta["preprocessing"]["resize"])
    feeds = {}
    for tensor in request["inputs"]:
        assert tensor["datatype"] == "FP32" and len(tensor["shape"]) == \
            len(inputs[tensor["name"]].shape)
        data = pixels.astype(np.float32) if tensor["name"] == "image" else \
            np.asarray(tensor["data"], np.float32)
        shape = [1, *inputs[tensor["name"]].shape[1:]]
        feeds[tensor["name"]] = data.reshape(shape)
    months = float(graph.run(None, feeds)[0].ravel()[0])
    expected = cli_here(["predict", "--model", sex_export / "model.onnx", "--sex", "M",
                         images["png"][0]]).stdout
    assert months == pytest.approx(float(expected.splitlines()[1].split(",")[2]), abs=0.01)


def chromium() -> str:
    """The system's Chromium (browsers cannot be downloaded at install time)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium on this machine: apt-get install chromium (Playwright "
                "drives the system's browser through executable_path)")


def test_web_page_in_a_real_browser(server, images, tmp_path):
    """Upload real radiographs through the page in headless Chromium: the shown age is
    the API's, a DICOM fills the sex from its header, an inverted PNG shows its
    warning, a text file shows the 415 message; the API page sends a real request;
    every request stays on the origin."""
    from playwright.sync_api import sync_playwright

    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    negative = tmp_path / "negative.png"
    Image.fromarray(255 - np.asarray(Image.open(images["png"][1]))).save(negative)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                    args=["--no-sandbox"])
        page = browser.new_page()
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(server.url + "/")
        page.wait_for_selector("#card-list dt")
        assert "research use only" in page.text_content("#card-list").lower()

        def submit(path, sex=None, age=None):
            page.set_input_files("#file", str(path))
            page.check(f"input[name=sex][value='{sex or ''}']")
            page.fill("#age", "" if age is None else str(age))
            with page.expect_response("**/v1/predict"):
                page.click("#go")
            page.wait_for_function("!document.getElementById('go').disabled")

        submit(images["png"][0], "F", 120)
        api = post(server, images["png"][0], sex="F", age="120").json()
        assert float(page.text_content("#months")) == round(api["bone_age_months"], 1)
        assert f"{api['interval']['lower']:.1f} to {api['interval']['upper']:.1f}" in \
            page.text_content("#interval")
        assert "difference" in page.text_content("#chrono")
        assert page.get_attribute("#seen", "src").startswith("data:image/png;base64,")
        page.screenshot(path=str(artifacts / "web-page.png"), full_page=True)
        submit(images["m2"][0])
        assert "DICOM header" in page.text_content("#sex-source")
        assert page.is_checked("input[name=sex][value=M]")
        submit(negative)
        assert "inverted" in page.text_content("#warnings")
        submit(text)
        assert "not a PNG, JPEG, WebP or DICOM file" in page.text_content("#error")
        # the interactive API documentation, built from /openapi.json by the package's
        # own script: every route listed, and a form that sends a real request
        page.goto(server.url + "/docs")
        page.wait_for_selector("details.route")
        routes = set(page.locator("details.route summary code").all_text_contents())
        assert {"GET /v1/model", "POST /v1/predict", "POST /v1/predict/batch",
                "GET /readyz", "GET /metrics"} <= routes, routes
        form = page.locator("details[id='post-/v1/predict']")
        form.locator("summary").click()
        form.locator("input[name=file]").set_input_files(str(images["png"][0]))
        form.locator("select[name=sex]").select_option("F")
        form.locator("input[name=chronological_age_months]").fill("120")
        with page.expect_response("**/v1/predict"):
            form.locator("button").click()
        page.wait_for_function("document.querySelector(\"details[id='post-/v1/predict'] "
                               "pre\").textContent.includes('200 OK')")
        shown = form.locator("pre").text_content()
        answer = json.loads(shown[shown.index("{"):])
        assert answer["bone_age_months"] == pytest.approx(api["bone_age_months"], abs=0.01)
        browser.close()
    origin = server.url + "/"
    assert requested and all(u.startswith((origin, "data:"))
                             for u in requested), requested


CHECKS = ("not_a_server_error,response_schema_conformance,status_code_conformance,"
          "content_type_conformance")


def test_schema_fuzzing_finds_no_server_error(server, tmp_path):
    """schemathesis on /openapi.json (at most 300 cases): no 5xx, every response
    matches its declared schema and status codes."""
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run",
         f"{server.url}/openapi.json", "--max-examples", "40", "--seed", "1",
         "--checks", CHECKS,
         "--request-timeout", "30", "--report", "junit",
         "--report-junit-path", str(tmp_path / "junit.xml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    import xml.etree.ElementTree as ET

    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 8 and int(suite.get("failures")) == 0


def test_load_benchmark_smoke(deploy, images, tmp_path):
    """benchmarks/serve_load.py, bounded: concurrency 1 and 8 on real radiographs, no
    errors, the server's stage times read from /metrics."""
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--model", str(deploy),
         "--images", str(images["png"][0].parent), "--concurrency", "1", "8",
         "--requests", "40", "--seconds", "30", "--no-baseline", "--out", str(out)],
        cwd=tmp_path, env=backend_env("torch", hide=FRAMEWORKS), capture_output=True,
        text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    levels = json.loads(out.read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 8]
    for level in levels:
        assert level["errors"] == {} and level["requests"] == 40
        assert level["requests_per_s"] > 0 and level["p50_ms"] <= level["p99_ms"]
        assert set(level["server_stage_ms"]) == {"decode", "queue", "inference"}


def test_gradcam_overlay_is_the_models_map(deploy, images):
    """With Keras on the server, explain=gradcam adds the overlay; its red excess is
    the map grad_cam computes here from the export's model.keras."""
    from boneage_keras.explain import grad_cam
    from boneage_keras.images import load_image
    from boneage_keras.inference import open_model

    server = Server(["--model", deploy], hide=())
    try:
        assert server.client.get("/v1/model").json()["gradcam"] is True
        answer = post(server, images["png"][0], explain="gradcam").json()
    finally:
        server.stop()
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["gradcam_png"]))),
                         np.float64)
    assert overlay.shape == (64, 64, 3)
    heat, months = grad_cam(open_model(deploy / "model.keras"),
                            load_image(images["png"][0], 64, "stretch")[None])
    assert months[0] == pytest.approx(answer["uncorrected_months"], abs=0.05)
    shown = (overlay[..., 0] - overlay[..., 1]) / 255 / 0.6
    assert np.ptp(heat[0]) > 0.1
    np.testing.assert_allclose(shown, heat[0], atol=0.02)
