// Building DOM without innerHTML (no markup injection from device data) and without inline handlers
// (the Content-Security-Policy forbids them).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'class') el.className = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function mount(root, ...children) {
  root.replaceChildren(...children.flat().filter((c) => c));
}

export function message(el, text, ok = false) {
  el.className = ok ? 'ok' : 'error';
  el.textContent = text;
}

export function fmtTime(value) {
  if (!value || value.startsWith('0001-')) return '—';
  return new Date(value).toLocaleString();
}
