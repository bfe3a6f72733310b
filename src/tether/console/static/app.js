// The console's shell: session, navigation (hash routes), sign-in, overview and security pages.
import { call, get, setCsrf, ApiError } from './api.js';
import { h, mount, message, fmtTime } from './dom.js';
import { barChart, color } from './chart.js';
import { devicesPage, devicePage } from './devices.js';

const app = document.getElementById('app');
let me = null;
let stop = [];  // cleanups of the current page (timers, event streams)

function cleanup() { stop.forEach((fn) => fn()); stop = []; }
export function onLeave(fn) { stop.push(fn); }
export function user() { return me; }

async function loadMe() {
  try {
    me = await get('/console/api/me');
    setCsrf(me.csrf || null);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    me = null;
  }
  const nav = document.getElementById('nav');
  nav.hidden = !me;
  document.getElementById('signout').hidden = !me;
  document.getElementById('who').textContent = me
    ? `${me.displayName || me.user} · ${me.roles.map((r) => r.role + (r.scope ? ` (${r.scope})` : '')).join(', ')}`
    : '';
}

async function signinPage() {
  const error = h('p', { id: 'signin-error', class: 'error' });
  const code = h('input', { id: 'code', placeholder: 'Authenticator code', autocomplete: 'one-time-code', hidden: true });
  const username = h('input', { id: 'username', placeholder: 'Operator name', autocomplete: 'username' });
  const password = h('input', { id: 'password', type: 'password', placeholder: 'Password', autocomplete: 'current-password' });
  const submit = async (event) => {
    event.preventDefault();
    try {
      const { doc } = await call('POST', '/console/auth/login', {
        body: { username: username.value, password: password.value, code: code.value || undefined } });
      setCsrf(doc.csrf);
      await loadMe();
      location.hash = '#/overview';
      route();
    } catch (err) {
      if (err.body && /totp-required/.test(err.body.message || '')) { code.hidden = false; code.focus(); }
      message(error, err.message);
    }
  };
  let providers = [];
  try { providers = (await get('/console/auth/providers')).providers; } catch { providers = []; }
  mount(app, h('div', { class: 'signin panel' },
    h('h1', {}, 'Sign in'),
    h('form', { id: 'signin-form', onsubmit: submit }, username, password, code,
      h('button', { id: 'signin-submit', type: 'submit' }, 'Sign in')),
    providers.length ? h('p', {}, 'Or with: ', providers.map((p) =>
      h('a', { href: `/console/auth/oidc/${encodeURIComponent(p)}/start`, class: 'provider', id: `provider-${p}` }, p, ' '))) : null,
    error));
}

async function overviewPage() {
  const cards = h('div', { class: 'cards' });
  const lag = h('tbody');
  let previous = null;
  const refresh = async () => {
    const o = await get('/console/api/overview');
    let rate = '—';
    if (previous && o.time > previous.time) rate = ((o.messagesTotal - previous.messagesTotal) / (o.time - previous.time)).toFixed(1);
    previous = o;
    const card = (id, label, value) => h('div', { class: 'card', id }, h('div', { class: 'value' }, value), h('div', { class: 'label' }, label));
    mount(cards, card('ov-connections', 'Connected devices', o.connections),
      card('ov-devices', 'Devices (enabled)', `${o.devices.totalDeviceCount} (${o.devices.enabledDeviceCount})`),
      card('ov-rate', 'Messages / s', rate), card('ov-total', 'Messages since start', o.messagesTotal));
    mount(lag, o.partitions.map((p) => h('tr', {}, h('td', {}, p.id), h('td', {}, p.next ?? '—'),
      h('td', {}, p.checkpoint ?? '—'), h('td', {}, p.lag ?? '—'))));
  };
  mount(app, h('h1', {}, 'Overview'), cards, h('h2', {}, 'Stream lag ($Default consumer group)'),
    h('table', { id: 'lag' }, h('thead', {}, h('tr', {}, ['Partition', 'Next sequence', 'Checkpoint', 'Lag'].map((t) => h('th', {}, t)))), lag));
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 3000);
  onLeave(() => clearInterval(timer));
}

async function securityPage() {
  const rows = h('tbody');
  const action = h('input', { id: 'f-action', placeholder: 'action prefix, e.g. auth.' });
  const outcome = h('select', { id: 'f-outcome' }, ['', 'allowed', 'refused', 'ok', 'failed'].map((o) => h('option', { value: o }, o || 'any outcome')));
  const principal = h('input', { id: 'f-principal', placeholder: 'principal, e.g. user:alice' });
  const error = h('p', { class: 'error' });
  const load = async (event) => {
    if (event) event.preventDefault();
    const q = new URLSearchParams({ limit: '200' });
    if (action.value) q.set('action', action.value);
    if (outcome.value) q.set('outcome', outcome.value);
    if (principal.value) q.set('principal', principal.value);
    try {
      const records = await get(`/tether/audit?${q}`);
      mount(rows, records.map((r) => h('tr', { class: `audit-row ${r.outcome}` }, h('td', {}, fmtTime(r.time)), h('td', {}, r.action),
        h('td', {}, r.outcome), h('td', {}, r.reason || ''), h('td', {}, r.principal || ''), h('td', {}, r.peer || ''),
        h('td', {}, r.target || ''), h('td', { class: 'muted' }, Object.keys(r.details || {}).length ? JSON.stringify(r.details) : ''))));
      error.textContent = '';
    } catch (err) { message(error, err.message); }
  };
  const canvas = h('canvas', { id: 'failures-chart' });
  const legend = h('div', { class: 'legend', id: 'failures-legend' });
  const status = h('div', { id: 'tls-status' });
  mount(app, h('h1', {}, 'Security'),
    h('div', { class: 'grid2' },
      h('div', { class: 'panel' }, h('h2', {}, 'Authentication failures by reason (24 h)'), canvas, legend),
      h('div', { class: 'panel' }, h('h2', {}, 'TLS and trust bundle'), status)),
    h('h2', {}, 'Audit log'),
    h('form', { class: 'inline', id: 'audit-filter', onsubmit: load }, action, outcome, principal, h('button', { type: 'submit' }, 'Filter')),
    error,
    h('table', { id: 'audit' }, h('thead', {}, h('tr', {}, ['Time', 'Action', 'Outcome', 'Reason', 'Principal', 'Peer', 'Target', 'Details'].map((t) => h('th', {}, t)))), rows));
  await load();
  try {
    const f = await get('/console/api/auth-failures?hours=24');
    const series = Object.entries(f.reasons).map(([name, values]) => ({ name, values }));
    barChart(canvas, f.buckets, series);
    mount(legend, series.map((s, i) => { const sw = h('i'); sw.style.background = color(i); return h('span', {}, sw, `${s.name} (${s.values.reduce((a, b) => a + b, 0)})`); }));
  } catch (err) { legend.textContent = err.message; }
  try {
    const s = await get('/console/api/security-status');
    const trust = s.trust || {};
    mount(status, h('table', {}, h('tbody', {},
      h('tr', {}, h('th', {}, 'Served certificate'), h('td', {}, s.tls ? s.tls.subject : 'no TLS listener in this process')),
      s.tls ? h('tr', {}, h('th', {}, 'Expires'), h('td', { id: 'tls-not-after' }, fmtTime(s.tls.notAfter))) : null,
      s.tls ? h('tr', {}, h('th', {}, 'Issuer'), h('td', {}, s.tls.issuer)) : null,
      h('tr', {}, h('th', {}, 'Trust bundle'), h('td', { id: 'trust-version' }, trust.version !== undefined ? `version ${trust.version}, phase ${trust.phase}` : (trust.error || '—'))),
      trust.currentRoot ? h('tr', {}, h('th', {}, 'Current root'), h('td', {}, `${trust.currentRoot.subject} (until ${fmtTime(trust.currentRoot.notAfter)})`)) : null,
      trust.nextRoot ? h('tr', {}, h('th', {}, 'Next root'), h('td', {}, trust.nextRoot.subject)) : null)));
  } catch (err) { status.textContent = err.message; }
}

export async function route() {
  cleanup();
  if (!me) { await signinPage(); return; }
  const hash = location.hash || '#/overview';
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', hash.startsWith(a.getAttribute('href')));
  try {
    if (hash.startsWith('#/devices')) await devicesPage(app);
    else if (hash.startsWith('#/device/')) await devicePage(app, decodeURIComponent(hash.slice('#/device/'.length)));
    else if (hash.startsWith('#/security')) await securityPage();
    else await overviewPage();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) { me = null; await loadMe(); await signinPage(); return; }
    mount(app, h('p', { class: 'error', id: 'page-error' }, err.message));
  }
}

document.getElementById('signout').addEventListener('click', async () => {
  try { await call('POST', '/console/auth/logout'); } catch { /* signed out anyway */ }
  me = null;
  setCsrf(null);
  await loadMe();
  location.hash = '';
  route();
});
window.addEventListener('hashchange', route);
await loadMe();
await route();
