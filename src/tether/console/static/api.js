// Calls to the hub's REST API with the console session (cookie) and its CSRF token.
const API = '?api-version=2021-04-12';
let csrf = null;

export function setCsrf(token) { csrf = token; }

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export async function call(method, path, { body, headers = {}, raw = false } = {}) {
  const init = { method, headers: { ...headers }, credentials: 'same-origin', cache: 'no-store' };
  if (method !== 'GET' && csrf) init.headers['X-CSRF-Token'] = csrf;
  if (body !== undefined) {
    if (raw) { init.body = body; } else {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
  }
  const sep = path.includes('?') ? '&' : '?';
  const url = path.startsWith('/console/') ? path : path + sep + API.slice(1);
  const response = await fetch(url, init);
  const text = await response.text();
  let doc = null;
  try { doc = text ? JSON.parse(text) : null; } catch { doc = text; }
  if (!response.ok) throw new ApiError(response.status, doc);
  return { doc, headers: response.headers, status: response.status };
}

export const get = (path, opts) => call('GET', path, opts).then((r) => r.doc);
