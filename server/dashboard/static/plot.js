// Small SVG plots for the Run page: a line plot and a bar plot, drawn from scratch each update.
// Every plot writes how many points (or bar groups) it shows in data-points, which tests read.

const NS = "http://www.w3.org/2000/svg";
const W = 600, H = 260, LEFT = 48, RIGHT = 14, TOP = 12, BOTTOM = 34;

function node(name, attrs = {}, text) {
  const el = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceStep(span, ticks) {
  const raw = span / Math.max(ticks, 1);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const unit = raw / power;
  return (unit <= 1 ? 1 : unit <= 2 ? 2 : unit <= 5 ? 5 : 10) * power;
}

// pad: room on either side of the first and last x, in x units (bars need half a slot).
function frame(svg, xs, yMin, yMax, unit, pad = 0) {
  svg.replaceChildren();
  const xMin = Math.min(...xs) - pad, xMax = Math.max(...xs) + pad;
  const sx = (x) => LEFT + (xMax === xMin ? 0.5 : (x - xMin) / (xMax - xMin)) * (W - LEFT - RIGHT);
  const sy = (y) => TOP + (1 - (y - yMin) / (yMax - yMin || 1)) * (H - TOP - BOTTOM);
  const yStep = niceStep(yMax - yMin || 1, 5);
  const digits = Math.max(0, -Math.floor(Math.log10(yStep) + 1e-9));  // as many as the step needs
  for (let y = Math.ceil(yMin / yStep) * yStep; y <= yMax + 1e-9; y += yStep) {
    svg.append(node("line", { class: "grid", x1: LEFT, x2: W - RIGHT, y1: sy(y), y2: sy(y) }));
    svg.append(node("text", { x: LEFT - 6, y: sy(y) + 4, "text-anchor": "end" }, y.toFixed(digits)));
  }
  const xStep = Math.max(1, Math.round(niceStep(xMax - xMin || 1, 8)));
  for (let x = Math.ceil((xMin + pad) / xStep - 1e-9) * xStep; x <= xMax - pad + 1e-9; x += xStep) {
    svg.append(node("text", { x: sx(x), y: H - BOTTOM + 16, "text-anchor": "middle" }, String(x)));
  }
  svg.append(node("line", { class: "axis", x1: LEFT, x2: W - RIGHT, y1: H - BOTTOM, y2: H - BOTTOM }));
  svg.append(node("line", { class: "axis", x1: LEFT, x2: LEFT, y1: TOP, y2: H - BOTTOM }));
  svg.append(node("text", { x: (LEFT + W - RIGHT) / 2, y: H - 4, "text-anchor": "middle" }, unit));
  return { sx, sy };
}

function empty(svg, message) {
  svg.replaceChildren(node("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, message));
  svg.dataset.points = "0";
}

// points: [{x, y}] (y may be null: skipped). options: yMin, yMax (else from the data), format,
// unit (the x axis), color, name (for the tooltips).
export function linePlot(svg, points, options = {}) {
  const shown = points.filter((p) => p.y !== null && p.y !== undefined && Number.isFinite(p.y));
  if (!shown.length) return empty(svg, "no rounds judged yet");
  const ys = shown.map((p) => p.y);
  let yMin = options.yMin ?? Math.min(...ys), yMax = options.yMax ?? Math.max(...ys);
  if (options.yMin === undefined) yMin = Math.max(0, yMin - (yMax - yMin) * 0.1 - 1e-6);
  if (options.yMax === undefined) yMax = yMax + (yMax - yMin) * 0.1 + 1e-6;
  const format = options.format ?? ((v) => v.toFixed(2));
  const { sx, sy } = frame(svg, shown.map((p) => p.x), yMin, yMax, options.unit ?? "round");
  const color = options.color ?? "#2f6fed";
  svg.append(node("polyline", {
    class: "line", stroke: color, points: shown.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" "),
  }));
  for (const p of shown) {
    const dot = node("circle", { class: "point", cx: sx(p.x), cy: sy(p.y), r: 3.5, fill: color, "data-x": p.x, "data-y": p.y });
    dot.append(node("title", {}, `${options.unit ?? "round"} ${p.x}: ${options.name ?? ""} ${format(p.y)}`));
    svg.append(dot);
  }
  svg.dataset.points = String(shown.length);
}

// groups: [{x, values: [..]}]; series: [{name, color}] in the order of values.
export function barPlot(svg, groups, series, options = {}) {
  if (!groups.length) return empty(svg, "no rounds yet");
  const all = groups.flatMap((g) => g.values.filter((v) => Number.isFinite(v)));
  const yMax = Math.max(1, ...all) * 1.1;
  const format = options.format ?? ((v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)));
  const xs = groups.map((g) => g.x);
  const { sx, sy } = frame(svg, xs, 0, yMax, options.unit ?? "round", 0.6);
  const slot = sx(xs[0] + 1) - sx(xs[0]);
  const width = Math.min(40, slot * 0.8) / series.length;
  for (const g of groups) {
    g.values.forEach((v, i) => {
      if (!Number.isFinite(v)) return;
      const x = sx(g.x) - (width * series.length) / 2 + i * width;
      const bar = node("rect", {
        x, y: sy(v), width: Math.max(width - 1, 1), height: Math.max(sy(0) - sy(v), 0),
        fill: series[i].color, rx: 1,
      });
      bar.append(node("title", {}, `${options.unit ?? "round"} ${g.x}: ${series[i].name} ${format(v)}`));
      svg.append(bar);
    });
  }
  svg.dataset.points = String(groups.length);
}
