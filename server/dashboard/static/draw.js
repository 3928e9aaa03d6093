// The Try it page: draw a digit on a canvas (mouse, pen or touch: pointer events), send it as
// a PNG to /api/predict/{version}, and show what came back: the 28x28 input as the model saw
// it (made by the server, the same code as `fedcoreml predict`), the predicted class and every
// class's probability, computed by the reference interpreter on the model's exact bytes.

import { el, fill, state, unitName } from "./common.js";
import { latestVersion, versions } from "./models.js";

const STROKE = 18;  // px on the 280x280 canvas: about a pen's width on a 28x28 digit
let canvas, context, select;
let drawn = false, drawing = false, last = null, pending = null, predictions = 0;
let chosen = null;  // the version the user picked; null: follow the latest
const digitModels = new Map();  // sha256 -> problem ("" when the model takes a digit)

function clear() {
  context.fillStyle = "#000";
  context.fillRect(0, 0, canvas.width, canvas.height);
  drawn = false;
}

function point(event) {
  const box = canvas.getBoundingClientRect();
  return { x: ((event.clientX - box.left) * canvas.width) / box.width, y: ((event.clientY - box.top) * canvas.height) / box.height };
}

function stroke(from, to) {
  context.strokeStyle = "#fff";
  context.fillStyle = "#fff";
  context.lineWidth = STROKE;
  context.lineCap = "round";
  context.lineJoin = "round";
  context.beginPath();
  context.moveTo(from.x, from.y);
  context.lineTo(to.x, to.y);
  context.stroke();
}

function setUp() {
  canvas = document.getElementById("try-canvas");
  context = canvas.getContext("2d", { willReadFrequently: true });
  select = document.getElementById("try-version");
  clear();
  canvas.addEventListener("pointerdown", (event) => {
    if (canvas.classList.contains("disabled")) return;
    canvas.setPointerCapture(event.pointerId);
    drawing = true;
    last = point(event);
    stroke(last, last);
    drawn = true;
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  const end = () => {
    if (!drawing) return;
    drawing = false;
    schedule();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  document.getElementById("try-clear").addEventListener("click", () => {
    clear();
    showResult(null);
  });
  select.addEventListener("change", () => {
    chosen = select.value;
    checkModel();
  });
}

function schedule() {
  clearTimeout(pending);
  pending = setTimeout(predict, 60);
}

function version() {
  return select.value || null;
}

function fillVersions() {
  const list = versions().slice().reverse();
  const keep = chosen ?? String(latestVersion());
  const names = list.map((m) => String(m.version)).join(",");
  if (select.dataset.names === names) {  // unchanged: leave an open list alone
    if (select.value !== keep && names.split(",").includes(keep)) select.value = keep;
    return;
  }
  select.dataset.names = names;
  select.replaceChildren(...list.map((m) => el("option", {
    value: String(m.version),
    text: m.version === "final" ? "final model" : `${unitName()} ${m.version}`,
  })));
  if (list.some((m) => String(m.version) === keep)) select.value = keep;
}

function sha256Of(v) {
  return versions().find((m) => String(m.version) === String(v))?.sha256;
}

async function checkModel() {
  const v = version();
  const problem = document.getElementById("try-problem");
  if (v === null) {
    problem.hidden = false;
    problem.textContent = "No model committed yet: the run has not started.";
    canvas.classList.add("disabled");
    return;
  }
  const sha = sha256Of(v);
  if (!digitModels.has(sha)) {
    const response = await fetch(`/api/models/${v}`);
    const info = await response.json();
    digitModels.set(sha, response.ok ? (info.digit_input ? "" : info.digit_problem) : info.error);
  }
  const why = digitModels.get(sha);
  problem.hidden = !why;
  problem.textContent = why ? `This model does not take a 28×28 image, so there is nothing to draw for it: ${why}` : "";
  canvas.classList.toggle("disabled", Boolean(why));
  if (!why && drawn) schedule();
}

function showResult(result) {
  const label = document.getElementById("try-label");
  const input = document.getElementById("try-input");
  const ctx = input.getContext("2d");
  if (!result) {
    label.textContent = "–";
    for (const key of ["label", "version", "probabilities"]) delete label.dataset[key];
    delete input.dataset.image;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, 28, 28);
    fill(document.querySelector("#try-probabilities tbody"), []);
    document.getElementById("try-model").textContent = "";
    return;
  }
  const pixels = ctx.createImageData(28, 28);
  result.image.forEach((row, y) => row.forEach((v, x) => {
    const i = (y * 28 + x) * 4, grey = Math.round(v * 255);
    pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = grey;
    pixels.data[i + 3] = 255;
  }));
  ctx.putImageData(pixels, 0, 0);
  input.dataset.image = JSON.stringify(result.image);
  label.textContent = result.label;
  label.dataset.label = result.label;
  label.dataset.version = String(result.version);
  label.dataset.probabilities = JSON.stringify(result.probabilities);
  predictions += 1;
  label.dataset.predictions = String(predictions);
  const name = result.version === "final" ? "the final model" : `${unitName()} ${result.version}'s model`;
  document.getElementById("try-model").textContent = `${name}, sha256 ${result.sha256.slice(0, 12)}…`;
  fill(document.querySelector("#try-probabilities tbody"), Object.entries(result.probabilities).map(([cls, p]) => {
    const bar = el("div", { class: "bar" });
    bar.style.width = `${(p * 100).toFixed(1)}%`;
    return el("tr", { class: cls === result.label ? "best" : "" },
      el("td", { text: cls }), el("td", {}, bar), el("td", { class: "p", text: p.toFixed(4) }));
  }));
}

async function predict() {
  const v = version();
  if (!drawn || v === null || canvas.classList.contains("disabled")) return;
  const error = document.getElementById("try-error");
  const image = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  const response = await fetch(`/api/predict/${v}`, { method: "POST", body: image, headers: { "content-type": "image/png" } });
  const body = await response.json();
  error.hidden = response.ok;
  error.textContent = response.ok ? "" : body.error;
  if (response.ok && version() === v) showResult(body);
}

let ready = false;

export function showTry() {
  if (!ready) {
    ready = true;
    setUp();
    state.listeners.push(() => {
      const before = select.value;
      fillVersions();
      if (select.value !== before) checkModel();
    });
  }
  fillVersions();
  checkModel();
}
