// Shared by the dashboard's scripts: the live state and small DOM helpers. Text is only ever
// set as textContent, never parsed as HTML.

export const state = { run: null, rounds: [], fleet: null, listeners: [] };

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

export function bytes(n) {
  return n >= 1048576 ? `${(n / 1048576).toFixed(2)} MB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KB` : `${n} B`;
}

export function unitName() {
  const strategy = String(state.run?.config?.strategy ?? "");
  return /fedbuff|async/i.test(strategy) ? "version" : "round";
}
