// The dashboard's pages: one shell, the page chosen by the path (/run, /fleet, /models, /try).
// Live data arrives as server-sent events (/api/events: run, rounds, fleet); the Fleet page
// also fetches the device list while it is shown. Text from the server is only ever set as
// textContent, never parsed as HTML.

import { el, fill, state, unitName } from "./common.js";
import { showTry } from "./draw.js";
import { showModels } from "./models.js";
import { barPlot, linePlot } from "./plot.js";

const fmt = (v, digits = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

// -- the Run page ----------------------------------------------------------------------------

function phaseText() {
  const run = state.run, fleet = state.fleet;
  if (!run) return "connecting";
  if (run.phase === "finished") return "finished";
  const planned = run.rounds_planned ?? run.config?.rounds;
  const committed = run.models.length;  // round 0, the initial model, included
  if (fleet && fleet.round_in_progress !== null && fleet.round_in_progress !== undefined) {
    return `${unitName()} ${fleet.round_in_progress} of ${planned ?? "?"}: ${fleet.training} training`;
  }
  if (fleet && committed <= 1 && fleet.connected < fleet.min_devices) {
    return `waiting for devices (${fleet.connected} of ${fleet.min_devices})`;
  }
  if (run.phase === "starting") return "starting";
  return committed ? `${unitName()} ${committed} of ${planned ?? "?"}` : "starting";
}

function renderRun() {
  const run = state.run;
  const rounds = state.rounds;
  const unit = unitName();
  document.getElementById("run-state").textContent = phaseText();
  const planned = run?.rounds_planned ?? run?.config?.rounds;
  const judged = rounds.filter((r) => r.round > 0).length;
  document.getElementById("run-rounds-label").textContent = `${unit}s judged`;
  document.getElementById("run-rounds").textContent = planned ? `${judged} of ${planned}` : String(judged);
  const last = rounds[rounds.length - 1];
  document.getElementById("run-accuracy").textContent = last ? fmt(last.test_accuracy) : "–";
  const fleet = state.fleet;
  document.getElementById("run-devices").textContent = fleet ? `${fleet.connected} (min ${fleet.min_devices})` : "–";

  const error = document.getElementById("run-error");
  error.hidden = !run?.error;
  error.textContent = run?.error ? `The run directory cannot be read: ${run.error}` : "";

  linePlot(document.getElementById("plot-accuracy"),
    rounds.map((r) => ({ x: r.round, y: r.test_accuracy })),
    { yMin: 0, yMax: 1, unit, name: "test accuracy", format: (v) => v.toFixed(4) });
  linePlot(document.getElementById("plot-loss"),
    rounds.map((r) => ({ x: r.round, y: r.test_loss })),
    { unit, name: "test loss", color: "#e8772e", format: (v) => v.toFixed(4) });
  const trained = rounds.filter((r) => r.round > 0);
  barPlot(document.getElementById("plot-devices"),
    trained.map((r) => ({ x: r.round, values: [r.devices_sampled, r.devices_reported, r.devices_failed] })),
    [{ name: "sampled", color: "#b9c8ea" }, { name: "reported", color: "#2f6fed" }, { name: "failed", color: "#d64545" }],
    { unit });
  barPlot(document.getElementById("plot-seconds"),
    trained.map((r) => ({ x: r.round, values: [r.seconds] })),
    [{ name: "seconds", color: "#7a86a8" }], { unit, format: (v) => v.toFixed(1) });

  document.querySelector("#rounds-table th.unit").textContent = unit;
  fill(document.querySelector("#rounds-table tbody"), rounds.slice().reverse().map((r) => el("tr", {},
    el("td", { text: String(r.round) }),
    el("td", { text: fmt(r.test_accuracy) }),
    el("td", { text: fmt(r.test_loss) }),
    el("td", { text: r.round ? String(r.devices_sampled ?? "–") : "–" }),
    el("td", { text: r.round ? String(r.devices_reported ?? "–") : "–" }),
    el("td", { text: r.round ? String(r.devices_failed ?? "–") : "–" }),
    el("td", { text: r.round ? Number(r.examples ?? 0).toLocaleString() : "–" }),
    el("td", { text: fmt(r.seconds, 1) }),
    el("td", { text: r.device_accuracy === null || r.device_accuracy === undefined ? "–" : fmt(r.device_accuracy) }),
  )));

  document.getElementById("run-dir").textContent = run ? `run directory: ${run.run_dir}` : "";
  const config = Object.entries(run?.config ?? {}).sort(([a], [b]) => a.localeCompare(b));
  fill(document.getElementById("config-list"), config.map(([key, value]) => el("div", { class: "pair" },
    el("span", { class: "key", text: key }),
    el("span", { class: "mono", text: typeof value === "string" ? value : JSON.stringify(value) }),
  )));
}

// -- the Fleet page --------------------------------------------------------------------------

function keyRows(counts) {
  const entries = Object.entries(counts ?? {});
  if (!entries.length) return [el("tr", {}, el("td", { text: "none" }), el("td", { text: "" }))];
  return entries.map(([key, count]) => el("tr", {}, el("td", { text: key }), el("td", { class: "num", text: String(count) })));
}

function renderFleet(fleet) {
  document.getElementById("fleet-absent").hidden = fleet !== null;
  if (!fleet) return;
  for (const key of ["registered", "connected", "training", "idle"]) {
    document.getElementById(`fleet-${key}`).textContent = String(fleet[key]);
  }
  document.getElementById("fleet-rate-limited").textContent = String(fleet.rate_limited);
  fill(document.querySelector("#fleet-refusals tbody"), keyRows(fleet.refusals));
  fill(document.querySelector("#fleet-platforms tbody"), keyRows(fleet.by_platform));
  fill(document.querySelector("#fleet-apps tbody"), keyRows(fleet.by_app_version));
  fill(document.querySelector("#fleet-tasks tbody"), fleet.tasks.length
    ? fleet.tasks.map((t) => el("tr", {}, el("td", { text: String(t.round) }), el("td", { text: t.kind }), el("td", { text: String(t.pending) })))
    : [el("tr", {}, el("td", { text: "none pending" }), el("td"), el("td"))]);
  if (fleet.devices) {
    fill(document.querySelector("#fleet-devices tbody"), fleet.devices.map((d) => el("tr", {},
      el("td", { class: "mono", text: d.device }),
      el("td", { class: `state-${d.state}`, text: d.state }),
      el("td", { text: d.platform }),
      el("td", { text: d.os_version }),
      el("td", { text: d.app_version }),
      el("td", { class: "num", text: `${d.last_seen_s.toFixed(1)} s ago` }),
    )));
    document.getElementById("fleet-devices-note").textContent = fleet.devices_not_listed
      ? `(the ${fleet.devices.length} seen last; ${fleet.devices_not_listed} more not listed)` : "";
  }
}

let fleetTimer = null;

async function pollFleet() {
  try {
    const response = await fetch("/api/fleet", { cache: "no-store" });
    renderFleet(response.status === 404 ? null : await response.json());
  } catch (error) {
    // the connection pill says the coordinator is gone; keep what is shown
  }
}

// -- pages and the event stream --------------------------------------------------------------

function currentPage() {
  const name = location.pathname.replace(/^\//, "");
  return ["run", "fleet", "models", "try"].includes(name) ? name : "run";
}

function show(page) {
  for (const section of document.querySelectorAll("section.page")) section.hidden = section.id !== `page-${page}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.page === page);
  document.title = `fedcoreml · ${document.querySelector(`nav a[data-page="${page}"]`).textContent}`;
  clearInterval(fleetTimer);
  fleetTimer = null;
  if (page === "fleet") {
    pollFleet();
    fleetTimer = setInterval(pollFleet, 2000);
  }
  if (page === "models") showModels();
  if (page === "try") showTry();
}

function changed() {
  renderRun();
  for (const listener of state.listeners) listener();
}

function connect() {
  const pill = document.getElementById("connection");
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => {
    pill.dataset.state = "live";
    pill.textContent = "live";
  });
  events.addEventListener("error", () => {
    pill.dataset.state = "lost";
    pill.textContent = "coordinator unreachable: showing the last data received";
  });
  events.addEventListener("run", (event) => {
    state.run = JSON.parse(event.data);
    changed();
  });
  events.addEventListener("rounds", (event) => {
    const update = JSON.parse(event.data);
    state.rounds = state.rounds.slice(0, update.from).concat(update.lines);
    changed();
  });
  events.addEventListener("fleet", (event) => {
    state.fleet = JSON.parse(event.data);
    if (currentPage() !== "fleet") renderFleet(state.fleet);
    changed();
  });
}

for (const link of document.querySelectorAll("nav a")) {
  link.addEventListener("click", (event) => {
    if (event.metaKey || event.ctrlKey || event.shiftKey) return;
    event.preventDefault();
    history.pushState({}, "", link.getAttribute("href"));
    show(currentPage());
  });
}
window.addEventListener("popstate", () => show(currentPage()));
renderRun();
show(currentPage());
connect();
