// The Models page: every committed model (download, sha256, size) and the `fedcoreml model
// inspect` summary of the one chosen (GET /api/models/{version}).

import { bytes, el, fill, state, unitName } from "./common.js";

let selected = null;  // a version: a round number, or "final"
const summaries = new Map();  // sha256 -> summary

export function versions() {
  const run = state.run;
  if (!run) return [];
  const list = run.models.map((m) => ({ version: m.version, sha256: m.sha256, size_bytes: m.size_bytes }));
  if (run.final) list.push({ version: "final", sha256: run.final.sha256, size_bytes: run.final.size_bytes });
  return list;
}

export function latestVersion() {
  const list = versions();
  return list.length ? list[list.length - 1].version : null;
}

function row(model) {
  const name = model.version === "final" ? "final" : String(model.version);
  const tr = el("tr", { class: "clickable", "data-version": name },
    el("td", { text: name }),
    el("td", { class: "mono", title: model.sha256, text: `${model.sha256.slice(0, 16)}…` }),
    el("td", { class: "num", text: bytes(model.size_bytes) }),
    el("td", {}, el("a", { class: "button", href: `/models/${name}.mlmodel`, download: "", text: "download" })),
  );
  tr.classList.toggle("selected", String(selected) === name);
  tr.addEventListener("click", (event) => {
    if (event.target.tagName === "A") return;
    choose(model.version);
  });
  return tr;
}

function renderTable() {
  document.querySelector("#models-table th.unit").textContent = unitName();
  const list = versions().slice().reverse();
  fill(document.querySelector("#models-table tbody"), list.length ? list.map(row)
    : [el("tr", {}, el("td", { text: "no model committed yet" }), el("td"), el("td"), el("td"))]);
}

function features(list) {
  return list.map((f) => `${f.name} ${f.dtype ?? f.type} ${f.shape ? `[${f.shape.join(", ")}]` : ""}`).join("; ") || "–";
}

function range(value) {
  if (!value) return "–";
  if (value.allowed) return `${value.default} (allowed ${value.allowed.join(", ")})`;
  return `${value.default} (allowed ${value.min} … ${value.max})`;
}

function renderSummary(info) {
  const panel = document.getElementById("model-summary");
  const pairs = [
    ["model", info.filename],
    ["sha256", info.sha256],
    ["size", bytes(info.size_bytes)],
    ["type", `${info.model_type}, specification version ${info.specification_version}`],
    ["updatable", info.updatable ? "yes" : "no"],
    ["inputs", features(info.inputs)],
    ["outputs", features(info.outputs)],
    ["training inputs", features(info.training_inputs)],
    ["parameters", `${info.total_parameters.toLocaleString()} (updatable ${info.trainable_parameters.toLocaleString()})`],
  ];
  if (info.loss) {
    pairs.push(["loss", `${info.loss.type} on '${info.loss.input}', target '${info.loss.target}'`]);
    const optimizer = Object.entries(info.optimizer).filter(([k]) => k !== "type").map(([k, v]) => `${k} ${range(v)}`);
    pairs.push(["optimizer", `${info.optimizer.type}: ${optimizer.join("; ")}`]);
    pairs.push(["epochs", `${range(info.epochs)}; shuffle ${info.shuffle}`]);
  }
  const list = el("dl");
  for (const [key, value] of pairs) list.append(el("dt", { text: key }), el("dd", { text: String(value) }));
  const verdict = info.trainable
    ? el("p", { class: "ok", text: "fedcoreml can train this model" })
    : el("p", { class: "no", text: `fedcoreml cannot train this model: ${info.problem}` });
  const digit = info.digit_input
    ? el("p", { class: "muted", text: "Takes a 28×28 image: try it on the Try it page." })
    : el("p", { class: "muted", text: `Not a 28×28 digit model: ${info.digit_problem}` });
  const layers = el("table", { class: "layers" },
    el("thead", {}, el("tr", {}, ...["layer", "type", "output", "parameters", "updatable"].map((h) => el("th", { text: h })))),
    el("tbody", {}, ...info.layers.map((layer) => el("tr", {},
      el("td", { text: layer.name }),
      el("td", { text: layer.type }),
      el("td", { class: "mono", text: layer.output_shape ? `[${layer.output_shape.join(", ")}]` : "?" }),
      el("td", { class: "num", text: layer.parameters.toLocaleString() }),
      el("td", { text: layer.updatable ? "yes" : "" }),
    ))));
  panel.replaceChildren(el("h2", { text: `Summary: ${info.version === "final" ? "final model" : `${unitName()} ${info.version}`}` }),
    list, verdict, digit, el("div", { class: "scroll" }, layers));
  panel.dataset.version = String(info.version);
}

async function choose(version) {
  selected = version;
  renderTable();
  const model = versions().find((m) => String(m.version) === String(version));
  if (!model) return;
  let info = summaries.get(model.sha256);
  if (!info) {
    const response = await fetch(`/api/models/${version}`);
    const body = await response.json();
    if (!response.ok) {
      document.getElementById("model-summary").replaceChildren(el("p", { class: "banner error", text: body.error }));
      return;
    }
    info = body;
    summaries.set(model.sha256, info);
  }
  if (String(selected) === String(version)) renderSummary({ ...info, version });
}

let listening = false;

export function showModels() {
  if (!listening) {
    listening = true;
    state.listeners.push(() => {
      renderTable();
      if (selected === null && latestVersion() !== null && currentlyShown()) choose(latestVersion());
    });
  }
  renderTable();
  if (selected === null && latestVersion() !== null) choose(latestVersion());
}

function currentlyShown() {
  return !document.getElementById("page-models").hidden;
}
