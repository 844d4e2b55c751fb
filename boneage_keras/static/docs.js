// Interactive API documentation built from /openapi.json: same-origin, no libraries.
"use strict";

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

// a schema's fields: the multipart form's properties, or the query parameters
function formFields(operation) {
  const content = ((operation.requestBody || {}).content || {})["multipart/form-data"];
  if (content) {
    const properties = content.schema.properties || {};
    return Object.entries(properties).map(([name, schema]) => ({
      name, schema, where: "form",
      file: schema.format === "binary" || (schema.items || {}).format === "binary",
      many: schema.type === "array",
    }));
  }
  return (operation.parameters || []).map((p) => ({ name: p.name, schema: p.schema || {}, where: "query" }));
}

function describe(schema) {
  const words = [];
  if (schema.enum) words.push(schema.enum.join(" | "));
  else if (schema.type) words.push(schema.type);
  if (schema.minimum !== undefined) words.push(">= " + schema.minimum);
  if (schema.maximum !== undefined) words.push("<= " + schema.maximum);
  return words.join(", ") + (schema.description ? " - " + schema.description : "");
}

async function send(method, path, fields, form, out) {
  const headers = {};
  const token = document.getElementById("token").value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  let url = path, body;
  const query = new URLSearchParams();
  if (fields.some((f) => f.where === "form")) {
    body = new FormData();
    for (const f of fields) {
      const input = form.elements[f.name];
      if (f.file) for (const file of input.files) body.append(f.name, file, file.name);
      else if (input.value !== "") body.append(f.name, input.value);
    }
  } else {
    for (const f of fields) {
      const value = form.elements[f.name].value;
      if (value !== "") query.set(f.name, value);
    }
    if ([...query].length) url += "?" + query;
  }
  out.textContent = method + " " + url + " ...";
  const started = performance.now();
  const response = await fetch(url, { method, headers, body });
  const text = await response.text();
  let shown = text;
  try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* not JSON */ }
  out.textContent = `${method} ${url}\n${response.status} ${response.statusText} ` +
    `(${Math.round(performance.now() - started)} ms)\n\n${shown}`;
}

function route(path, method, operation) {
  const fields = formFields(operation);
  const form = element("form", { class: "try" });
  for (const f of fields) {
    const input = f.file
      ? element("input", { type: "file", name: f.name, ...(f.many ? { multiple: "" } : {}) })
      : f.schema.enum
        ? element("select", { name: f.name }, element("option", { value: "" }, ""),
          ...f.schema.enum.map((v) => element("option", { value: v }, v)))
        : element("input", { name: f.name, type: "text", size: "12" });
    form.append(element("label", {}, f.name + " ", input, element("span", { class: "source" }, describe(f.schema))));
  }
  const out = element("pre", { class: "answer" });
  const button = element("button", { type: "submit" }, "Send");
  form.append(button);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    button.disabled = true;
    try { await send(method.toUpperCase(), path, fields, form, out); }
    catch (err) { out.textContent = "request failed: " + err; }
    finally { button.disabled = false; }
  });
  const codes = Object.keys(operation.responses || {}).join(", ");
  return element("details", { class: "route", id: `${method}-${path}` },
    element("summary", {}, element("code", {}, method.toUpperCase() + " " + path), " ",
      operation.summary || ""),
    element("p", {}, operation.description || ""),
    element("p", { class: "source" }, "answers: " + codes),
    form, out);
}

async function main() {
  const holder = document.getElementById("routes");
  const spec = await (await fetch("/openapi.json")).json();
  holder.textContent = "";
  holder.append(element("p", {}, `${spec.info.title} ${spec.info.version}: ${spec.info.description || ""}`));
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, operation] of Object.entries(methods)) holder.append(route(path, method, operation));
  }
}

main().catch((err) => { document.getElementById("routes").textContent = "cannot read /openapi.json: " + err; });
