"""Serve exported models over HTTP: ``boneage serve --model EXPORT_DIR``.

One process: FastAPI on uvicorn over the export's ``model.onnx`` + ``model.json`` in
onnxruntime (a repeated ``--model`` is an ensemble). Nothing here imports Keras or a
training framework, so ``pip install "boneage-keras[serve]"`` is enough to serve.

    POST /v1/predict          one image (multipart ``file`` or a raw body) -> months
    POST /v1/predict/batch    up to 32 files -> one result or one error each, in order
    GET  /v1/model            model.json, sha256, versions, calibration, the notice
    GET  /healthz /readyz     alive / loaded and warmed up (also /v2/health/live|ready)
    GET  /metrics             Prometheus text
    GET  /                    the web page (static files of this package, no CDN)
    GET  /docs                interactive API documentation (read from /openapi.json)

Uploads are decoded in memory in a thread pool (never written to disk); a
micro-batcher gathers up to ``max_batch`` images or waits ``max_wait_ms`` and runs one
shared InferenceSession per model. Errors are ``{"error": "<one line>", "code": "<slug>"}``
with a 4xx status for anything the caller can fix.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .calibration import apply_calibration
from .errors import BoneAgeError, DataError
from .exported import (
    TTA_VIEWS,
    ModelFileError,
    OnnxPredictor,
    export_meta,
    tta_views,
)
from .images import (
    ImageError,
    TooManyPixels,
    UnsupportedFormat,
    gray_from_bytes,
    preprocess_array,
)
from .patient import SexContradiction, age_or_error, parse_sex, sex_with_header

log = logging.getLogger(__name__)
NOTICE = "research use only, not for diagnostic use"
MAX_BATCH_FILES = 32
MAX_PIXELS = 50_000_000
OPEN_PATHS = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/", "/docs",
              "/openapi.json")


class ServeError(BoneAgeError, ValueError):
    """A request the caller can fix: ``status`` (4xx) and ``code`` go to the response."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


@dataclass
class ServeOptions:
    """The limits and tuning of ``boneage serve`` (its flags)."""

    max_upload_mb: float = 32.0
    max_batch: int = 8
    max_wait_ms: float = 2.0
    threads: int = 1   # onnxruntime intra-op threads: one leaves the cores to decoding
    tta: int = 1
    decode_threads: int = 2
    queue_limit: int = 64         # images waiting for the model; more are refused (503)
    wait_limit_s: float = 30.0    # an image that waited longer for the model: 503
    stall_limit_s: float = 30.0   # an upload silent this long is dropped (408)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_onnx(path: str | Path) -> Path:
    """The model.onnx of an export folder (or the .onnx file given)."""
    path = Path(path)
    onnx = path / "model.onnx" if path.is_dir() else path
    if onnx.suffix != ".onnx" or not onnx.is_file():
        raise ModelFileError(f"--model {path}: no model.onnx there; export one with "
                             f"`boneage export RUN --format onnx --out {path}`.")
    return onnx


class ServedModel:
    """The ONNX members of one served model, their model.json and calibration."""

    def __init__(self, paths: Sequence[str | Path], threads: int | None = None) -> None:
        if not paths:
            raise ModelFileError("serve: no model given; pass --model EXPORT_DIR.")
        self.members: list[OnnxPredictor] = []
        self.files: list[Path] = []
        for path in paths:
            onnx = find_onnx(path)
            self.members.append(OnnxPredictor(onnx, export_meta(onnx), threads=threads))
            self.files.append(onnx)
        self.meta = export_meta(self.files[0])
        self.member_sha256 = [file_sha256(f) for f in self.files]
        self.sha256 = self.member_sha256[0] if len(self.files) == 1 else hashlib.sha256(
            "".join(self.member_sha256).encode()).hexdigest()
        self.name = "+".join(f.parent.name or f.stem for f in self.files)
        self.use_sex = any(m.preprocessing["use_sex"] for m in self.members)
        self.geometries = sorted({self.key(m) for m in self.members})

    @staticmethod
    def key(member: OnnxPredictor) -> tuple[int, str, bool]:
        pre = member.preprocessing
        return pre["image_size"], pre["geometry"], pre["random_crop"]

    def calibration_for(self, tta: int) -> dict[str, Any] | None:
        """The stored calibration, where it was fitted for this ensemble and TTA."""
        cal = self.meta.get("calibration")
        if (cal is None or cal.get("members", 1) != len(self.members)
                or cal.get("tta", 1) != tta or cal.get("mc_samples", 0) > 1):
            return None
        return cal

    def run(self, batch: list[PendingImage]) -> list[np.ndarray]:
        """Every item's views through every member: one (members, views) array each."""
        out = [np.zeros((len(self.members), item.views)) for item in batch]
        for index, member in enumerate(self.members):
            key = self.key(member)
            images = np.concatenate([item.arrays[key] for item in batch])
            male = None
            if member.preprocessing["use_sex"]:
                male = np.concatenate([np.full((item.views, 1), float(item.male), np.float32)
                                       for item in batch])
            months = member.predict_batch(images, male)
            start = 0
            for item, result in zip(batch, out):
                result[index] = months[start:start + item.views]
                start += item.views
        return out


@dataclass
class PendingImage:
    """One decoded request waiting for the model: its TTA views per geometry."""

    arrays: dict[tuple[int, str, bool], np.ndarray]
    views: int
    male: bool | None
    future: asyncio.Future = field(default=None)      # type: ignore[assignment]
    queued_at: float = 0.0


class MicroBatcher:
    """Gathers pending images into batches of up to ``max_batch`` images, waiting at
    most ``max_wait_ms`` after the first, and runs them on one inference thread."""

    def __init__(self, model: ServedModel, options: ServeOptions, metrics: Any) -> None:
        self.model, self.options, self.metrics = model, options, metrics
        self.queue: asyncio.Queue[PendingImage] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def submit(self, item: PendingImage) -> np.ndarray:
        limit = self.options.queue_limit
        if self.queue.qsize() >= limit:
            self.metrics.rejections.labels("queue_full").inc()
            raise ServeError(503, "queue_full", f"the server is busy ({limit} requests "
                             "waiting); retry in a second.", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        item.future, item.queued_at = loop.create_future(), time.perf_counter()
        self.queue.put_nowait(item)
        self.metrics.queue_depth.set(self.queue.qsize())
        try:
            return await asyncio.wait_for(asyncio.shield(item.future),
                                          self.options.wait_limit_s)
        except TimeoutError:
            item.future.cancel()
            self.metrics.rejections.labels("timeout").inc()
            raise ServeError(503, "timeout", f"the image waited {self.options.wait_limit_s:g} "
                             "s for the model; retry later.", {"Retry-After": "5"}) from None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.options.max_wait_ms / 1000.0
        while True:
            batch = [await self.queue.get()]
            size = batch[0].views
            deadline = loop.time() + wait
            while size < self.options.max_batch:
                try:
                    if wait <= 0 or loop.time() >= deadline:
                        item = self.queue.get_nowait()
                    else:
                        item = await asyncio.wait_for(self.queue.get(),
                                                      deadline - loop.time())
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                batch.append(item)
                size += item.views
            self.metrics.queue_depth.set(self.queue.qsize())
            batch = [item for item in batch if not item.future.done()]
            if not batch:
                continue
            started = time.perf_counter()
            for item in batch:
                self.metrics.stage.labels("queue").observe(started - item.queued_at)
            self.metrics.batch_size.observe(sum(item.views for item in batch))
            try:
                results = await loop.run_in_executor(self.pool, self.model.run, batch)
            except Exception as err:  # noqa: BLE001 (a model failure reaches every caller)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            self.metrics.stage.labels("inference").observe(time.perf_counter() - started)
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(result)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("boneage_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.stage = Histogram("boneage_stage_seconds", "Time per stage of a prediction",
                               ["stage"], registry=self.registry,
                               buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                        2.5, 5, 10, 30))
        self.batch_size = Histogram("boneage_batch_images", "Images per model run",
                                    registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue_depth = Gauge("boneage_queue_depth", "Images waiting for the model",
                                 registry=self.registry)
        self.rejections = Counter("boneage_rejections", "Requests refused for load",
                                  ["reason"], registry=self.registry)
        self.warnings = Counter("boneage_warnings", "Warnings in answers, by kind",
                                ["kind"], registry=self.registry)


# --- one image: fields, decoding, the answer ---------------------------------------


@dataclass
class ImageRequest:
    """One image and the fields sent with it (form fields or query parameters)."""

    data: bytes
    name: str = "upload"
    sex: str | None = None
    chronological_age_months: str | None = None
    id: str | None = None
    tta: str | None = None
    sex_override: str | None = None
    return_image: str | None = None
    explain: str | None = None


FIELDS = tuple(f.name for f in fields(ImageRequest) if f.name not in ("data", "name"))


def _flag(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


class Predictor:
    """Decoding, batching and the answer for one served model."""

    def __init__(self, model: ServedModel, options: ServeOptions) -> None:
        self.model, self.options = model, options
        self.metrics = Metrics()
        self.batcher = MicroBatcher(model, options, self.metrics)
        self.decoders = ThreadPoolExecutor(options.decode_threads,
                                           thread_name_prefix="decode")
        self.ready = False
        self.keras_model: Any = None       # for Grad-CAM, loaded on first use
        self.keras_lock = threading.Lock()

    def warm_up(self) -> None:
        """One decode (it imports what decoding needs) and one run per member on a blank
        image (first runs allocate and are slow)."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("L", (64, 80)).save(buffer, format="PNG")
        gray_from_bytes(buffer.getvalue(), "warm-up", MAX_PIXELS, [])
        item = PendingImage({key: np.zeros((1, key[0], key[0], 1), np.float32)
                             for key in self.model.geometries}, 1, False)
        self.model.run([item])
        self.ready = True

    def _tta(self, text: str | None) -> int:
        if text in (None, ""):
            return self.options.tta
        try:
            n = int(text)
        except ValueError:
            n = 0
        if not 1 <= n <= len(TTA_VIEWS):
            raise ServeError(422, "bad_tta", f"tta {text!r}: choose 1 (off) to "
                             f"{len(TTA_VIEWS)} views ({', '.join(TTA_VIEWS)}).")
        return n

    def decode(self, request: ImageRequest, tta: int) -> dict[str, Any]:
        """Bytes -> views per geometry, the patient fields and warnings (a thread)."""
        started = time.perf_counter()
        warnings: list[dict[str, str]] = []
        notes: list[str] = []
        try:
            gray, header = gray_from_bytes(request.data, request.name, MAX_PIXELS, notes)
        except UnsupportedFormat as err:
            raise ServeError(415, "unsupported_format", str(err)) from None
        except TooManyPixels as err:
            raise ServeError(413, "too_many_pixels", str(err)) from None
        except ImageError as err:
            raise ServeError(422, "unreadable_image", str(err)) from None
        if notes:
            warnings.append({"code": "inverted_image",
                             "message": f"the image {notes[0]}."})
        sex, sex_source = self._sex(request, header, warnings)
        age, age_source = self._age(request, header)
        arrays = {}
        for key in self.model.geometries:
            size, geometry, random_crop = key
            image = preprocess_array(gray, size, geometry, random_crop)[None]
            arrays[key] = np.concatenate(tta_views(image.astype(np.float32), tta))
        shown = None
        if _flag(request.return_image):
            from PIL import Image

            buffer = io.BytesIO()
            Image.fromarray(arrays[self.model.geometries[0]][0, :, :, 0].astype(np.uint8)
                            ).save(buffer, format="PNG")
            shown = base64.b64encode(buffer.getvalue()).decode("ascii")
        return {"arrays": arrays, "sex": sex, "sex_source": sex_source, "age": age,
                "age_source": age_source, "warnings": warnings, "image_png": shown,
                "decode_s": time.perf_counter() - started}

    def _sex(self, request: ImageRequest, header: Any, warnings: list[dict[str, str]]
             ) -> tuple[bool | None, str | None]:
        given = None
        if request.sex not in (None, ""):
            if str(request.sex).strip().upper() not in ("M", "F"):
                raise ServeError(422, "bad_sex", f"sex {request.sex!r}: give M or F.")
            given = parse_sex(request.sex)
        header_sex = header.sex_text if header is not None else ""
        try:
            male = sex_with_header(given, header_sex, request.name, "send sex_override=true",
                                   _flag(request.sex_override))
        except SexContradiction as err:
            raise ServeError(422, "sex_contradicts_header", str(err)) from None
        if given is not None:
            return given, "form"
        if male is not None:
            warnings.append({"code": "sex_from_header",
                             "message": "the sex was read from the DICOM header "
                                        f"(PatientSex {header_sex})."})
            return male, "dicom_header"
        if self.model.use_sex:
            raise ServeError(422, "sex_required", f"{request.name}: this model takes the "
                             "patient's sex; send sex=M or sex=F (or a DICOM file whose "
                             "PatientSex is M or F).")
        return None, None

    @staticmethod
    def _age(request: ImageRequest, header: Any) -> tuple[float | None, str | None]:
        if request.chronological_age_months not in (None, ""):
            try:
                return age_or_error(request.chronological_age_months,
                                    "chronological_age_months"), "form"
            except DataError as err:
                raise ServeError(422, "bad_age", str(err)) from None
        if header is not None and header.chronological_age is not None:
            return header.chronological_age, header.age_source
        return None, None

    async def predict(self, request: ImageRequest) -> dict[str, Any]:
        """The answer for one image (raises ServeError for the caller's mistakes)."""
        explain = request.explain not in (None, "", "none")
        if explain and request.explain != "gradcam":
            raise ServeError(422, "bad_explain", f"explain {request.explain!r}: give none "
                             "or gradcam.")
        unavailable = self.gradcam_unavailable() if explain else None
        if unavailable:
            raise ServeError(501, "explain_unavailable", f"explain=gradcam: {unavailable}.")
        tta = self._tta(request.tta)
        loop = asyncio.get_running_loop()
        decoded = await loop.run_in_executor(self.decoders, self.decode, request, tta)
        self.metrics.stage.labels("decode").observe(decoded["decode_s"])
        queued = time.perf_counter()
        item = PendingImage(decoded["arrays"], tta, decoded["sex"])
        per_member = await self.batcher.submit(item)
        waited = time.perf_counter() - queued
        answer = self._answer(request, decoded, per_member, tta)
        if explain:
            started = time.perf_counter()
            answer["gradcam_png"] = await loop.run_in_executor(
                self.decoders, self.gradcam_png, decoded["arrays"], decoded["sex"])
            self.metrics.stage.labels("gradcam").observe(time.perf_counter() - started)
        answer["timing_ms"] = {"decode": round(decoded["decode_s"] * 1000, 2),
                               "queue_and_inference": round(waited * 1000, 2)}
        for warning in answer["warnings"]:
            self.metrics.warnings.labels(warning["code"]).inc()
        return answer

    def _answer(self, request: ImageRequest, decoded: dict[str, Any],
                per_member: np.ndarray, tta: int) -> dict[str, Any]:
        views = per_member.mean(axis=0)            # the ensemble's months per view
        members = per_member.mean(axis=1)          # each member's months (views averaged)
        raw = float(members.mean())
        spread = float(np.std(members, ddof=1)) if len(members) > 1 else None
        warnings = list(decoded["warnings"])
        months, interval, uncorrected = raw, None, None
        cal = self.model.calibration_for(tta)
        if cal is not None and (cal["interval"] != "scaled" or spread is not None):
            std = None if spread is None else np.array([spread])
            corrected, lower, upper = apply_calibration(cal, np.array([raw]), std)
            months, uncorrected = float(corrected[0]), raw
            interval = {"level": cal["level"], "lower": round(float(lower[0]), 2),
                        "upper": round(float(upper[0]), 2),
                        "method": f"split-conformal ({cal['interval']})",
                        "fitted_on": f"{cal['fitted_on']} ({cal['n']} images)"}
        else:
            why = ("the export has no calibration" if self.model.meta.get("calibration")
                   is None else "the stored calibration was fitted for another "
                   "ensemble or TTA setting")
            warnings.append({"code": "calibration_missing",
                             "message": f"no interval: {why} (fit one with `boneage "
                                        "evaluate RUN --recalibrate`, then export)."})
        answer: dict[str, Any] = {
            "id": request.id or None,
            "bone_age_months": round(months, 2),
            "bone_age_years": _years(months),
            "interval": interval,
            "uncorrected_months": None if uncorrected is None else round(uncorrected, 2),
            "sex": None if decoded["sex"] is None else {
                "value": "M" if decoded["sex"] else "F", "source": decoded["sex_source"]},
            "chronological_age_months": None,
            "difference_months": None,
            "tta": None,
            "warnings": warnings,
            "model": {"name": self.model.name, "sha256": self.model.sha256},
            "notice": NOTICE,
        }
        if decoded["age"] is not None:
            answer["chronological_age_months"] = {"value": round(decoded["age"], 2),
                                                  "source": decoded["age_source"]}
            answer["difference_months"] = round(months - decoded["age"], 2)
        if tta > 1:
            answer["tta"] = {"views": list(TTA_VIEWS[:tta]),
                             "months": [round(float(v), 2) for v in views],
                             "spread_months": round(float(np.std(views)), 2)}
        if len(members) > 1:
            answer["members"] = {"months": [round(float(m), 2) for m in members],
                                 "spread_months": round(spread, 2)}
        if decoded["image_png"] is not None:
            answer["image_png"] = decoded["image_png"]
        return answer

    def gradcam_unavailable(self) -> str | None:
        """Why Grad-CAM cannot be served here, or None: it needs the export's
        model.keras and a Keras backend (loaded on first use, never at start-up)."""
        from .extras import BACKENDS, configured_backend, importable

        keras_file = self.model.files[0].parent / "model.keras"
        if not keras_file.is_file():
            return (f"it needs model.keras beside {self.model.files[0].name} (export with "
                    "--format keras --format onnx)")
        backend = configured_backend()
        if backend not in BACKENDS or not importable("keras", backend):
            return (f"it needs Keras and its backend {backend!r} on the server "
                    f"(pip install \"boneage-keras[{backend}]\")")
        return None

    def gradcam_png(self, arrays: dict[tuple[int, str, bool], np.ndarray],
                    male: bool | None) -> str:
        """Grad-CAM of the first model over the image it saw, as an overlay PNG
        (base64): the map in red over the gray image (a thread; Keras loads once)."""
        from PIL import Image

        with self.keras_lock:
            if self.keras_model is None:
                from .inference import open_model

                self.keras_model = open_model(self.model.files[0].parent / "model.keras")
            from .explain import grad_cam

            image = arrays[self.model.key(self.model.members[0])][:1]
            sex = None if male is None else np.array([[float(male)]], np.float32)
            heat, _ = grad_cam(self.keras_model, image, sex if
                               self.model.members[0].preprocessing["use_sex"] else None)
        gray = image[0, :, :, 0] / 255.0
        alpha = 0.6 * heat[0]
        rgb = np.stack([gray * (1 - alpha) + alpha, gray * (1 - alpha),
                        gray * (1 - alpha)], axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def model_card(self) -> dict[str, Any]:
        import onnxruntime

        cal = self.model.meta.get("calibration")
        return {"name": self.model.name, "sha256": self.model.sha256,
                "members": [{"file": str(f), "sha256": s} for f, s in
                            zip(self.model.files, self.model.member_sha256)],
                "model_json": self.model.meta,
                "versions": {"boneage_keras": __version__,
                             "onnxruntime": onnxruntime.__version__},
                "calibration": cal, "test_metrics": self.model.meta.get("metrics"),
                "tta": self.options.tta, "use_sex": self.model.use_sex,
                "gradcam": self.gradcam_unavailable() is None, "notice": NOTICE}


def _years(months: float) -> str:
    whole = max(0, round(months))
    return f"{whole // 12} y {whole % 12} m"
