// The page of `boneage serve`: same-origin requests only, no libraries.
"use strict";
const $ = (id) => document.getElementById(id);
let file = null;
let token = null;      // asked once, on the first 401, and kept in this page only
let gradcam = false;   // the model card says whether the server can draw Grad-CAM

async function call(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  let response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    token = window.prompt("This server needs its access token:");
    if (token) {
      headers["Authorization"] = "Bearer " + token;
      response = await fetch(path, Object.assign({}, options, { headers }));
    }
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: response.statusText, code: "http" }; }
  return { ok: response.ok, status: response.status, body };
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function choose(f) {
  file = f;
  $("filename").textContent = f ? f.name : "";
  $("go").disabled = !f;
  $("sex-source").textContent = "";
  showError("");
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => choose(e.target.files[0] || null));

function ageMonths() {
  const months = $("age").value;
  if (months !== "") return months;
  const birth = $("birth").value, study = $("study").value;
  if (birth && study) {
    const days = (new Date(study) - new Date(birth)) / 86400000;
    return (days / 30.4375).toFixed(2);
  }
  return "";
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!file) return;
  showError("");
  const form = new FormData();
  form.append("file", file, file.name);
  const sex = document.querySelector("input[name=sex]:checked").value;
  if (sex) form.append("sex", sex);
  const age = ageMonths();
  if (age !== "") form.append("chronological_age_months", age);
  form.append("return_image", "true");
  if (gradcam) form.append("explain", "gradcam");
  $("go").disabled = true;
  try {
    const r = await call("/v1/predict", { method: "POST", body: form });
    if (!r.ok) { $("result").hidden = true; showError(r.body.error || ("HTTP " + r.status)); return; }
    show(r.body);
  } catch (err) {
    showError("the server cannot be reached: " + err);
  } finally {
    $("go").disabled = false;
  }
});

function years(months) {
  const m = Math.max(0, Math.round(months));
  return Math.floor(m / 12) + " y " + (m % 12) + " m";
}

function show(a) {
  $("result").hidden = false;
  $("months").textContent = a.bone_age_months.toFixed(1);
  $("years").textContent = "(" + years(a.bone_age_months) + ")";
  $("seen").src = a.image_png ? "data:image/png;base64," + a.image_png : "";
  $("cam-box").hidden = !a.gradcam_png;
  if (a.gradcam_png) $("cam").src = "data:image/png;base64," + a.gradcam_png;
  $("interval").textContent = a.interval
    ? Math.round(a.interval.level * 100) + "% interval: " + a.interval.lower.toFixed(1) +
      " to " + a.interval.upper.toFixed(1) + " months (" + a.interval.method + ")"
    : "no interval for this model";
  if (a.sex && a.sex.source === "dicom_header") {
    document.querySelector("input[name=sex][value=" + a.sex.value + "]").checked = true;
    $("sex-source").textContent = "from the DICOM header";
  }
  const chrono = a.chronological_age_months;
  $("chrono").textContent = chrono
    ? "chronological age " + chrono.value.toFixed(1) + " months (" + chrono.source +
      "); difference " + (a.difference_months >= 0 ? "+" : "") + a.difference_months.toFixed(1) + " months"
    : "";
  const list = $("warnings");
  list.replaceChildren();
  for (const w of a.warnings) {
    const li = document.createElement("li");
    li.textContent = w.message;
    li.dataset.code = w.code;
    list.appendChild(li);
  }
  $("report").value = "Bone age " + a.bone_age_months.toFixed(1) + " months (" + years(a.bone_age_months) + ")" +
    (a.interval ? ", 90% interval " + a.interval.lower.toFixed(1) + "-" + a.interval.upper.toFixed(1) : "") +
    (chrono ? ", chronological age " + chrono.value.toFixed(1) + " months, difference " + a.difference_months.toFixed(1) : "") +
    "; model " + a.model.name + " " + a.model.sha256.slice(0, 12) + "; research use only.";
  chart(a);
}

function chart(a) {
  const svg = $("chart"), ns = "http://www.w3.org/2000/svg", max = 240, px = (m) => 30 + m * 270 / max;
  const py = (m) => 290 - m * 270 / max;
  svg.replaceChildren();
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const k in attrs) el.setAttribute(k, attrs[k]);
    if (text) el.textContent = text;
    svg.appendChild(el);
    return el;
  };
  add("rect", { x: 30, y: 20, width: 270, height: 270, fill: "none", stroke: "#999" });
  add("line", { x1: px(0), y1: py(0), x2: px(max), y2: py(max), stroke: "#bbb", "stroke-dasharray": "4 3" });
  for (const t of [0, 60, 120, 180, 240]) {
    add("text", { x: px(t), y: 305, "font-size": 10, "text-anchor": "middle" }, String(t));
    add("text", { x: 25, y: py(t) + 3, "font-size": 10, "text-anchor": "end" }, String(t));
  }
  add("text", { x: 165, y: 318, "font-size": 11, "text-anchor": "middle" }, "chronological age (months)");
  add("text", { x: 10, y: 12, "font-size": 11 }, "bone age (months)");
  const chrono = a.chronological_age_months;
  if (!chrono) return;
  const x = px(Math.min(chrono.value, max));
  if (a.interval) {
    add("line", { x1: x, y1: py(Math.min(a.interval.lower, max)), x2: x, y2: py(Math.min(a.interval.upper, max)),
                  stroke: "#3a6fd8", "stroke-width": 6, "stroke-opacity": 0.4 });
  }
  add("circle", { cx: x, cy: py(Math.min(a.bone_age_months, max)), r: 5, fill: "#3a6fd8" });
}

async function card() {
  const r = await call("/v1/model");
  if (!r.ok) return;
  const m = r.body;
  gradcam = m.gradcam === true;
  const rows = [["model", m.name], ["sha256", m.sha256],
    ["test MAE", m.test_metrics && m.test_metrics.mae != null ? m.test_metrics.mae.toFixed(2) + " months" : "not measured"],
    ["interval", m.calibration ? Math.round(m.calibration.level * 100) + "% (" + m.calibration.fitted_on + ")" : "none"],
    ["takes sex", m.use_sex ? "yes" : "no"], ["notice", m.notice]];
  const dl = $("card-list");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k; dd.textContent = v;
    dl.append(dt, dd);
  }
  $("notice").textContent = m.notice.charAt(0).toUpperCase() + m.notice.slice(1) + ".";
}
card();
