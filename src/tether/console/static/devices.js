// Devices: search (the query language), create, enable/disable, keys; one device: twin, C2D, methods,
// live telemetry with a chart of its numeric fields.
import { call, get } from './api.js';
import { h, mount, message, fmtTime } from './dom.js';
import { lineChart, color } from './chart.js';
import { onLeave, user } from './app.js';

function randomKey() {
  const bytes = new Uint8Array(32);
  crypto.getRandomValues(bytes);
  return btoa(String.fromCharCode(...bytes));
}

export async function devicesPage(app) {
  const can = user().can;
  const rows = h('tbody');
  const search = h('input', { id: 'device-search', size: 50, placeholder: "condition, e.g. tags.site = 'plant-1' (empty: all)" });
  const error = h('p', { class: 'error', id: 'devices-error' });
  const load = async (event) => {
    if (event) event.preventDefault();
    try {
      const text = search.value.trim();
      let devices;
      if (!text) devices = await get('/devices?top=200');
      else {
        const query = /^select\s/i.test(text) ? text : `SELECT * FROM devices WHERE ${text}`;
        devices = (await call('POST', '/devices/query', { body: { query } })).doc;
      }
      mount(rows, devices.map((d) => deviceRow(d, can, load, error)));
      error.textContent = '';
    } catch (err) { message(error, err.message); }
  };
  const newId = h('input', { id: 'new-device-id', placeholder: 'new device id' });
  const create = async (event) => {
    event.preventDefault();
    try {
      await call('PUT', `/devices/${encodeURIComponent(newId.value)}`, { body: {
        deviceId: newId.value, authentication: { type: 'sas', symmetricKey: { primaryKey: randomKey(), secondaryKey: randomKey() } } } });
      message(error, `created ${newId.value}`, true);
      newId.value = '';
      await load();
    } catch (err) { message(error, err.message); }
  };
  mount(app, h('h1', {}, 'Devices'),
    h('form', { class: 'inline', id: 'search-form', onsubmit: load }, search, h('button', { type: 'submit', id: 'search-submit' }, 'Search')),
    can.registryWrite ? h('form', { class: 'inline', id: 'create-form', onsubmit: create }, newId, h('button', { type: 'submit', id: 'create-submit' }, 'Create device')) : null,
    error,
    h('table', { id: 'devices' }, h('thead', {}, h('tr', {}, ['Device', 'Status', 'Connection', 'Last activity', ''].map((t) => h('th', {}, t)))), rows));
  await load();
}

function deviceRow(d, can, reload, error) {
  const keys = h('span', { class: 'keys' });
  const toggle = async () => {
    try {
      await call('POST', `/tether/devices/${encodeURIComponent(d.deviceId)}/${d.status === 'enabled' ? 'disable' : 'enable'}`, { body: {} });
      await reload();
    } catch (err) { message(error, err.message); }
  };
  const reveal = async () => {
    try {
      const device = await get(`/devices/${encodeURIComponent(d.deviceId)}`);
      const sym = (device.authentication || {}).symmetricKey || {};
      keys.textContent = sym.primaryKey ? `primary ${sym.primaryKey}` : 'keys hidden for your role';
    } catch (err) { message(error, err.message); }
  };
  return h('tr', { 'data-device': d.deviceId },
    h('td', {}, h('a', { href: `#/device/${encodeURIComponent(d.deviceId)}`, class: 'device-link' }, d.deviceId)),
    h('td', {}, h('span', { class: `badge ${d.status}` }, d.status)),
    h('td', {}, h('span', { class: `badge ${d.connectionState}` }, d.connectionState || '')),
    h('td', {}, fmtTime(d.lastActivityTime)),
    h('td', {},
      can.registryWrite ? h('button', { class: 'secondary toggle-status', onclick: toggle }, d.status === 'enabled' ? 'Disable' : 'Enable') : null, ' ',
      can.keys ? h('button', { class: 'secondary show-keys', onclick: reveal }, 'Show keys') : null, ' ', keys));
}

export async function devicePage(app, id) {
  const can = user().can;
  const path = encodeURIComponent(id);
  const twinView = h('pre', { id: 'twin' });
  const status = h('p', { id: 'device-status' });
  let etag = null;
  const loadTwin = async () => {
    const { doc, headers } = await call('GET', `/twins/${path}`);
    etag = headers.get('ETag');
    twinView.textContent = JSON.stringify(doc, null, 2);
    return doc;
  };
  const twin = await loadTwin();
  const sections = [h('h1', {}, `Device ${id}`), status, h('h2', {}, 'Twin'), twinView];
  if (can.twinsWrite) {
    const patch = h('textarea', { id: 'twin-patch', rows: 5 });
    patch.value = JSON.stringify({ properties: { desired: twin.properties.desired ? stripMeta(twin.properties.desired) : {} } }, null, 2);
    const save = async (event) => {
      event.preventDefault();
      try {
        await call('PATCH', `/twins/${path}`, { body: JSON.parse(patch.value), headers: { 'If-Match': etag || '*' } });
        await loadTwin();
        message(status, 'twin updated', true);
      } catch (err) { message(status, err.status === 412 ? 'the twin changed meanwhile: reloaded, apply again' : err.message); await loadTwin(); }
    };
    sections.push(h('form', { id: 'twin-form', onsubmit: save }, h('p', { class: 'muted' }, 'Patch (tags and/or properties.desired; sent with the twin\'s etag):'),
      patch, h('button', { type: 'submit', id: 'twin-save' }, 'Update twin')));
  }
  if (can.service) {
    const c2d = h('input', { id: 'c2d-body', size: 40, placeholder: 'message body' });
    const sendC2d = async (event) => {
      event.preventDefault();
      try {
        const { doc } = await call('POST', `/devices/${path}/messages/deviceBound`, { body: c2d.value, raw: true, headers: { 'Content-Type': 'text/plain' } });
        message(status, `C2D message ${doc.messageId} queued`, true);
      } catch (err) { message(status, err.message); }
    };
    const name = h('input', { id: 'method-name', placeholder: 'method name' });
    const payload = h('input', { id: 'method-payload', size: 30, placeholder: 'payload (JSON)', value: '{}' });
    const result = h('pre', { id: 'method-result' });
    const invoke = async (event) => {
      event.preventDefault();
      try {
        const { doc } = await call('POST', `/twins/${path}/methods`, { body: { methodName: name.value, payload: JSON.parse(payload.value || 'null'), responseTimeoutInSeconds: 30, connectTimeoutInSeconds: 10 } });
        result.textContent = JSON.stringify(doc, null, 2);
      } catch (err) { result.textContent = err.message; }
    };
    sections.push(h('div', { class: 'grid2' },
      h('div', { class: 'panel' }, h('h2', {}, 'Cloud-to-device message'), h('form', { class: 'inline', id: 'c2d-form', onsubmit: sendC2d }, c2d, h('button', { type: 'submit', id: 'c2d-send' }, 'Send'))),
      h('div', { class: 'panel' }, h('h2', {}, 'Direct method'), h('form', { class: 'inline', id: 'method-form', onsubmit: invoke }, name, payload, h('button', { type: 'submit', id: 'method-invoke' }, 'Invoke')), result)));
  }
  if (can.telemetry) sections.push(...telemetry(id));
  mount(app, ...sections);
}

function stripMeta(doc) {
  return Object.fromEntries(Object.entries(doc).filter(([k]) => !k.startsWith('$')));
}

function numericFields(body, prefix = '', out = {}) {
  if (body && typeof body === 'object' && !Array.isArray(body)) {
    for (const [k, v] of Object.entries(body)) {
      if (typeof v === 'number' && Number.isFinite(v)) out[prefix + k] = v;
      else if (v && typeof v === 'object') numericFields(v, `${prefix}${k}.`, out);
    }
  }
  return out;
}

function telemetry(id) {
  const list = h('tbody', { id: 'telemetry-rows' });
  const canvas = h('canvas', { id: 'telemetry-chart' });
  const legend = h('div', { class: 'legend', id: 'telemetry-legend' });
  const state = h('span', { id: 'telemetry-state', class: 'muted' }, 'connecting…');
  const series = new Map();
  const source = new EventSource(`/tether/events/stream?api-version=2021-04-12&device=${encodeURIComponent(id)}&from=end&heartbeat=5`);
  source.addEventListener('open', () => { state.textContent = 'live'; });
  source.addEventListener('error', () => { state.textContent = 'reconnecting…'; });
  source.addEventListener('message', (event) => {
    const e = JSON.parse(event.data);
    let body = e.body;
    try { body = JSON.parse(e.body); } catch { /* not JSON */ }
    const time = Date.parse(e.enqueuedTime);
    list.prepend(h('tr', { class: 'telemetry-row' }, h('td', {}, new Date(time).toLocaleTimeString()), h('td', {}, e.sequenceNumber), h('td', {}, typeof body === 'string' ? body : JSON.stringify(body))));
    while (list.children.length > 50) list.lastChild.remove();
    for (const [name, value] of Object.entries(numericFields(body))) {
      if (!series.has(name)) series.set(name, []);
      const points = series.get(name);
      points.push([time, value]);
      if (points.length > 200) points.shift();
    }
    const data = [...series.entries()].map(([name, points]) => ({ name, points }));
    lineChart(canvas, data);
    mount(legend, data.map((s, i) => { const sw = h('i'); sw.style.background = color(i); return h('span', {}, sw, s.name); }));
  });
  onLeave(() => source.close());
  return [h('h2', {}, 'Live telemetry ', state), canvas, legend,
    h('table', { id: 'telemetry' }, h('thead', {}, h('tr', {}, ['Enqueued', 'Sequence', 'Body'].map((t) => h('th', {}, t)))), list)];
}
