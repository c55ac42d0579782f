/*
 * dynwf-ray dashboard: one vanilla JS file (ES2020, no framework, no build step, no CDN).
 * Talks to the /v1 HTTP API with `Authorization: Bearer <token>` (token in sessionStorage)
 * and draws its charts as plain SVG. Everything that comes from the API is inserted as
 * text (textContent / createElement), never as HTML: tenant data is hostile.
 *
 * Routes (hash): #/ overview, #/instances list, #/instances/<tenant>/<id> one instance
 * (tenant and id URI-encoded).
 *
 * Stable selectors (used by the browser tests; keep the names):
 *   #token, #sign-in              sign-in form (input, submit button); #signin-message its message
 *   #signed-in-as, #sign-out      who is signed in ("admin" or "tenant <name>"), sign-out button
 *   #nav-overview, #nav-instances navigation links (aria-current="page" on the active one)
 *   #error-banner (#error-text)   visible API / validation errors: "<name>: <message>"
 *   #notice                       short-lived success messages ("pause requested", ...)
 *   #overview                     overview page; [data-testid=stat-<key>] tiles (instances,
 *                                 running, activations-rate, hosts, sandboxes, cold-starts);
 *                                 #chart-by-tenant, #chart-activations, #chart-hosts, #chart-cold-starts
 *   #instances                    instances page; filters #filter-tenant (admin only),
 *                                 #filter-status, #filter-after, #filter-before, #filter-limit,
 *                                 #apply-filters; paging #prev-page, #next-page, #page-number;
 *                                 #auto-refresh (checkbox), #refresh-instances
 *   tr[data-instance-id="<id>"][data-tenant="<tenant>"]  rows of #instances-table (click: open)
 *   #instance                     instance page (data-tenant, data-instance-id attributes)
 *   #instance-status              status badge (text and data-status = the status)
 *   #pause, #resume, #terminate, #restart   actions; terminate and restart ask window.confirm()
 *                                 (#terminate-rollback checkbox: terminate with rollback)
 *   #event-type, #event-payload, #send-event, #event-error   send-event form (payload: JSON or empty)
 *   #instance-params, #instance-output, #instance-error, #instance-condition, #instance-warning
 *   #trace-link                   <a> to the trace (plain text in #trace when no URL template)
 *   #step-timeline                timeline; one g[data-step][data-count][data-status] per step
 *   #logs                         log lines: div.log-line[data-log-id]; #logs-state stream state
 */
'use strict';

const TOKEN_KEY = 'dynwf.token';
const STATUSES = ['queued', 'running', 'waiting', 'waitingForPause', 'paused', 'complete', 'errored', 'terminated', 'unknown'];
const FINAL = new Set(['complete', 'errored', 'terminated']);
const POLL_MS = 2000;           // /v1/stats polling
const HISTORY_S = 300;          // overview charts keep ~5 minutes
const LIST_REFRESH_MS = 5000;   // instances auto-refresh
const INSTANCE_REFRESH_MS = 3000;
const MAX_LOG_LINES = 5000;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  who: null,                 // /v1/whoami
  config: { trace_url: null },
  stats: null, samples: [], statsTimer: null, statsBusy: false, statsFailed: false,
  onStats: null,             // the overview page's renderer while it is shown
  page: null,                // the current page: {stop()}
  list: { filters: { tenant: '', status: '', after: '', before: '', limit: '50' }, cursors: [null], auto: false },
  tenants: null,
};

/* ---------- DOM helpers ---------- */

const $ = (sel, root = document) => root.querySelector(sel);

function setProps(e, props) {
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.setAttribute('class', v);
    else if (k === 'text') e.textContent = String(v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
}
function appendKids(e, kids) {
  for (const k of kids.flat(Infinity)) {
    if (k === null || k === undefined || k === false) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
}
/** An HTML element: h('td', {class: 'x'}, 'text', child). Strings become text nodes. */
function h(tag, props, ...kids) { const e = document.createElement(tag); setProps(e, props); appendKids(e, kids); return e; }
/** An SVG element, same rules. */
function s(tag, attrs, ...kids) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag); setProps(e, attrs); appendKids(e, kids); return e;
}
const cls = (v) => String(v ?? 'unknown').replace(/[^A-Za-z0-9_-]/g, '');   // safe class-name part
const widthOf = (box) => Math.max(320, Math.floor(box.clientWidth || 600));   // charts are drawn at their pixel size
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/* ---------- formatting ---------- */

const pad = (n, w = 2) => String(n).padStart(w, '0');
function fmtTime(t) {
  if (t === null || t === undefined) return '—';
  const d = new Date(t * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}
function fmtClock(t) {
  const d = new Date(t * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}
function fmtDur(sec) {
  if (!isFinite(sec)) return '—';
  if (sec < 1) return `${Math.round(sec * 1000)}ms`;
  if (sec < 60) return `${+sec.toFixed(sec < 10 ? 1 : 0)}s`;
  if (sec < 3600) return `${Math.floor(sec / 60)}m${pad(Math.round(sec % 60))}s`;
  return `${Math.floor(sec / 3600)}h${pad(Math.floor((sec % 3600) / 60))}m`;
}
function fmtNum(v) {
  if (v === null || v === undefined) return '—';
  return Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(v < 10 ? 2 : 1);
}
const shortVersion = (v) => (v ? (String(v).startsWith('v-') ? String(v).slice(0, 10) : String(v).slice(0, 8)) : '—');
const pretty = (v) => JSON.stringify(v, null, 2);
const badge = (status, props = {}) => h('span', { class: `badge st-${cls(status)}`, 'data-status': status ?? '', ...props }, status ?? '—');
const nowS = () => Date.now() / 1000;

/* ---------- banners ---------- */

function showError(message) {
  $('#error-text').textContent = message;
  $('#error-banner').hidden = false;
}
function clearError() { $('#error-banner').hidden = true; $('#error-text').textContent = ''; }
let noticeTimer = null;
function notice(message) {
  const n = $('#notice');
  n.textContent = message; n.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { n.hidden = true; }, 4000);
}

/* ---------- API ---------- */

class ApiError extends Error {
  constructor(status, name, message) { super(message); this.status = status; this.name = name; }
}
async function errorOf(res) {
  try {
    const body = await res.json();
    if (body && body.error) return new ApiError(res.status, String(body.error.name ?? 'Error'), String(body.error.message ?? ''));
    if (body && body.detail) return new ApiError(res.status, `HTTP ${res.status}`, typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail));
  } catch (_) { /* not JSON */ }
  return new ApiError(res.status, `HTTP ${res.status}`, res.statusText || 'request failed');
}
function authHeaders(extra = {}) { return { Authorization: `Bearer ${state.token}`, ...extra }; }
function rejected(e) {
  signOut(state.who ? `Your token is no longer accepted (${e.message || 'unauthorized'}). Sign in again.`
    : `Token rejected: ${e.message || 'unauthorized'}`);
}

/** fetch a /v1 path; JSON in and out. Throws ApiError; a 401 also signs out. */
async function api(method, path, body) {
  const opts = { method, headers: authHeaders({ Accept: 'application/json' }), cache: 'no-store' };
  if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers['Content-Type'] = 'application/json'; }
  let res;
  try { res = await fetch(path, opts); } catch (e) { throw new ApiError(0, 'NetworkError', `cannot reach the server (${e.message})`); }
  if (res.status === 401) { const e = await errorOf(res); rejected(e); throw e; }
  if (!res.ok) throw await errorOf(res);
  if (res.status === 204) return null;
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}
/** Shows a failed call in the error banner (a 401 already went back to the sign-in). */
function report(e) {
  if (e instanceof ApiError && e.status === 401) return;
  showError(e instanceof ApiError ? `${e.name}: ${e.message}` : String(e && e.message ? e.message : e));
}
const enc = encodeURIComponent;
const qs = (params) => {
  const q = Object.entries(params).filter(([, v]) => v !== '' && v !== null && v !== undefined).map(([k, v]) => `${enc(k)}=${enc(v)}`);
  return q.length ? `?${q.join('&')}` : '';
};
const instPath = (tenant, id) => `/v1/tenants/${enc(tenant)}/instances/${enc(id)}`;
const instHash = (tenant, id) => `#/instances/${enc(tenant)}/${enc(id)}`;

/* ---------- sign in / out ---------- */

function showSignIn(message) {
  stopPage();
  $('#page').hidden = true; $('#page').replaceChildren();
  $('#nav').hidden = true; $('#who').hidden = true;
  $('#signin').hidden = false;
  $('#signin-message').textContent = message || '';
  const t = $('#token'); t.value = ''; t.focus();
}
function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null; state.who = null; state.stats = null; state.samples = []; state.tenants = null;
  state.list.cursors = [null]; state.list.filters.tenant = '';
  clearInterval(state.statsTimer); state.statsTimer = null;
  clearError();
  showSignIn(message);
}
async function enter() {
  const who = await api('GET', '/v1/whoami');
  state.who = who;
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $('#signed-in-as').textContent = who.admin ? `admin (token ${who.token_id ?? '?'})` : `tenant ${who.tenant} (token ${who.token_id ?? '?'})`;
  $('#signed-in-as').dataset.admin = String(!!who.admin);
  $('#signin').hidden = true; $('#nav').hidden = false; $('#who').hidden = false; $('#page').hidden = false;
  try { state.config = (await api('GET', '/v1/config')) || { trace_url: null }; } catch (e) { state.config = { trace_url: null }; }
  state.statsFailed = false;
  pollStats();
  state.statsTimer = setInterval(pollStats, POLL_MS);
  route();
}
async function signIn(ev) {
  ev.preventDefault();
  const token = $('#token').value.trim();
  if (!token) return;
  state.token = token;
  $('#sign-in').disabled = true;
  $('#signin-message').textContent = '';
  try { await enter(); } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) { state.token = null; $('#signin-message').textContent = `${e.name}: ${e.message}`; }
  } finally { $('#sign-in').disabled = false; }
}

/* ---------- router ---------- */

function stopPage() { if (state.page) { state.page.stop(); state.page = null; } state.onStats = null; }
function route() {
  if (!state.who) return;
  stopPage(); clearError();
  const parts = location.hash.replace(/^#\/?/, '').split('/');
  let name = 'overview';
  if (parts[0] === 'instances' && parts.length === 3 && parts[1] && parts[2]) {
    let tenant, id;
    try { tenant = decodeURIComponent(parts[1]); id = decodeURIComponent(parts[2]); } catch (_) { tenant = parts[1]; id = parts[2]; }
    name = 'instances'; state.page = instancePage(tenant, id);
  } else if (parts[0] === 'instances') {
    name = 'instances'; state.page = instancesPage();
  } else {
    state.page = overviewPage();
  }
  for (const a of document.querySelectorAll('#nav a')) a.removeAttribute('aria-current');
  $(`#nav-${name}`).setAttribute('aria-current', 'page');
}
function mount(node) { $('#page').replaceChildren(node); window.scrollTo(0, 0); }

/* ---------- stats polling (kept while signed in, so the history survives navigation) ---------- */

async function pollStats() {
  if (state.statsBusy || !state.token) return;
  state.statsBusy = true;
  try {
    const st = await api('GET', '/v1/stats');
    if (!state.token) return;
    state.stats = st; state.statsFailed = false;
    const t = typeof st.now === 'number' ? st.now : nowS();
    state.samples.push({ t, activations: st.activations, cold_starts: st.cold_starts, hosts: st.hosts, sandboxes: sandboxCount(st) });
    while (state.samples.length && state.samples[0].t < t - HISTORY_S - POLL_MS / 1000) state.samples.shift();
    if (state.onStats) state.onStats(st);
  } catch (e) {
    if (!state.statsFailed && state.onStats) report(e);   // once, and only where it matters
    state.statsFailed = true;
  } finally { state.statsBusy = false; }
}
/** Platform-wide sandboxes; for a tenant token (null there) the sum of its own sandboxes_by_tenant. */
function sandboxCount(st) {
  if (typeof st.sandboxes === 'number') return st.sandboxes;
  const own = Object.values(st.sandboxes_by_tenant || {}).filter((n) => typeof n === 'number');
  return own.length ? own.reduce((a, n) => a + n, 0) : null;
}
function series(key) { return state.samples.filter((p) => typeof p[key] === 'number').map((p) => [p.t, p[key]]); }
function rateSeries(key) {
  const out = []; let prev = null;
  for (const p of state.samples) {
    if (typeof p[key] !== 'number') { prev = null; continue; }
    if (prev && p.t > prev.t && p[key] >= prev[key]) out.push([p.t, (p[key] - prev[key]) / (p.t - prev.t)]);
    prev = p;
  }
  return out;
}

/* ---------- charts (SVG) ---------- */

function niceCeil(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
/** The top of an axis with 4 intervals; integer counts get integer ticks. */
const axisMax = (v, integer) => (integer ? 4 * Math.max(1, Math.ceil(niceCeil(v / 4))) : niceCeil(v));

/** A line chart over the last HISTORY_S seconds. lines: [{name, cls, points: [[t, v]]}]. */
function lineChart(lines, { end, width = 600, height = 170, label = '', integer = false } = {}) {
  const W = width, H = height, L = 44, R = 10, T = 10, B = 22;
  const t1 = end ?? nowS(), t0 = t1 - HISTORY_S;
  const all = lines.flatMap((l) => l.points.filter(([t]) => t >= t0).map(([, v]) => v));
  const ymax = axisMax(Math.max(0, ...all), integer);
  const x = (t) => L + ((t - t0) / HISTORY_S) * (W - L - R);
  const y = (v) => T + (1 - v / ymax) * (H - T - B);
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: 'chart', role: 'img', 'aria-label': label });
  for (let i = 0; i <= 4; i++) {
    const v = (ymax * i) / 4;
    svg.append(s('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'grid' }),
      s('text', { x: L - 6, y: y(v) + 4, class: 'tick', 'text-anchor': 'end' }, fmtNum(v)));
  }
  for (let m = 0; m <= HISTORY_S / 60; m++) {
    const t = t0 + m * 60;
    svg.append(s('text', { x: x(t), y: H - 6, class: 'tick', 'text-anchor': m === 0 ? 'start' : m === HISTORY_S / 60 ? 'end' : 'middle' },
      m === HISTORY_S / 60 ? 'now' : `-${HISTORY_S / 60 - m}m`));
  }
  if (!all.length) svg.append(s('text', { x: W / 2, y: H / 2, class: 'empty', 'text-anchor': 'middle' }, 'waiting for data…'));
  for (const l of lines) {
    const pts = l.points.filter(([t]) => t >= t0);
    if (!pts.length) continue;
    svg.append(s('polyline', { points: pts.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(' '), class: `line ${l.cls}` }));
    const [lt, lv] = pts[pts.length - 1];
    svg.append(s('circle', { cx: x(lt), cy: y(lv), r: 3, class: `dot ${l.cls}` }, s('title', {}, `${l.name}: ${fmtNum(lv)}`)));
  }
  return svg;
}
function legend(items) {
  return h('div', { class: 'legend' }, items.map(([name, c]) => h('span', { class: 'legend-item' }, h('i', { class: `swatch ${c}` }), name)));
}

/** Horizontal stacked bars: one row per tenant, one segment per status. */
function stackedBars(byTenant, width = 600) {
  const tenants = Object.keys(byTenant || {}).sort();
  const W = width, L = 150, R = 46, rowH = 24, T = 6, B = 22;
  const H = T + B + Math.max(1, tenants.length) * rowH;
  const total = (t) => Object.values(byTenant[t] || {}).reduce((a, n) => a + (Number(n) || 0), 0);
  const xmax = axisMax(Math.max(0, ...tenants.map(total)), true);
  const x = (v) => L + (v / xmax) * (W - L - R);
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: 'chart', role: 'img', 'aria-label': 'instances by status per tenant' });
  for (let i = 0; i <= 4; i++) {
    const v = (xmax * i) / 4;
    svg.append(s('line', { x1: x(v), x2: x(v), y1: T, y2: H - B, class: 'grid' }),
      s('text', { x: x(v), y: H - 6, class: 'tick', 'text-anchor': 'middle' }, fmtNum(v)));
  }
  if (!tenants.length) svg.append(s('text', { x: W / 2, y: T + rowH / 2 + 4, class: 'empty', 'text-anchor': 'middle' }, 'no instances'));
  tenants.forEach((tenant, i) => {
    const y = T + i * rowH;
    const name = tenant.length > 22 ? `${tenant.slice(0, 21)}…` : tenant;
    const g = s('g', { 'data-tenant': tenant }, s('text', { x: L - 8, y: y + rowH / 2 + 4, class: 'label', 'text-anchor': 'end' }, name, s('title', {}, tenant)));
    let acc = 0;
    const counts = byTenant[tenant] || {};
    const order = [...STATUSES, ...Object.keys(counts).filter((k) => !STATUSES.includes(k))];
    for (const st of order) {
      const n = Number(counts[st]) || 0;
      if (!n) continue;
      g.append(s('rect', { x: x(acc), y: y + 4, width: Math.max(1, x(acc + n) - x(acc)), height: rowH - 8, class: `fill st-${cls(st)}` },
        s('title', {}, `${tenant} · ${st}: ${n}`)));
      acc += n;
    }
    g.append(s('text', { x: x(acc) + 5, y: y + rowH / 2 + 4, class: 'tick' }, String(acc)));
    svg.append(g);
  });
  return svg;
}

/* ---------- overview page ---------- */

function overviewPage() {
  const tile = (key, label) => h('div', { class: 'tile', 'data-testid': `stat-${key}` }, h('div', { class: 'tile-value' }, '—'), h('div', { class: 'tile-label' }, label));
  const tiles = [['instances', 'instances'], ['running', 'running'], ['activations-rate', 'activations / s'],
    ['hosts', 'live hosts'], ['sandboxes', 'sandboxes'], ['cold-starts', 'cold starts']].map(([k, l]) => tile(k, l));
  const card = (id, title, ...kids) => h('section', { class: 'card', id }, h('h2', {}, title), ...kids);
  const byTenant = h('div', { class: 'chart-box' }), byTenantLegend = h('div'), tenantTable = h('div', { class: 'table-wrap' });
  const act = h('div', { class: 'chart-box' }), hosts = h('div', { class: 'chart-box' }), cold = h('div', { class: 'chart-box' });
  mount(h('div', { id: 'overview' },
    h('h1', {}, 'Overview'),
    h('div', { class: 'tiles' }, tiles),
    card('chart-by-tenant', 'Instances by status per tenant', byTenant, byTenantLegend, tenantTable),
    h('div', { class: 'grid3' },
      card('chart-activations', 'Activations per second', act),
      card('chart-hosts', 'Live hosts and sandboxes', hosts),
      card('chart-cold-starts', 'Cold starts (total)', cold))));
  const setTile = (i, v) => { tiles[i].firstChild.textContent = v; };
  const adminOnly = () => h('p', { class: 'muted na' }, '— (platform-wide numbers: admin only)');

  function render(st) {
    if (!st) return;
    const by = st.by_tenant || {};
    const sum = (pred) => Object.values(by).reduce((a, c) => a + Object.entries(c || {}).reduce((b, [k, n]) => b + (pred(k) ? Number(n) || 0 : 0), 0), 0);
    setTile(0, String(sum(() => true)));
    setTile(1, String(sum((k) => k === 'running')));
    const rates = rateSeries('activations');
    setTile(2, st.activations === null || st.activations === undefined ? '—' : rates.length ? fmtNum(rates[rates.length - 1][1]) : '…');
    setTile(3, fmtNum(st.hosts)); setTile(4, fmtNum(sandboxCount(st))); setTile(5, fmtNum(st.cold_starts));
    byTenant.replaceChildren(stackedBars(by, widthOf(byTenant)));
    const present = STATUSES.filter((k) => Object.values(by).some((c) => c && c[k]));
    byTenantLegend.replaceChildren(legend(present.map((k) => [k, `st-${k}`])));
    const sbt = st.sandboxes_by_tenant || {};
    const names = Object.keys(by).concat(Object.keys(sbt).filter((t) => !(t in by))).sort();
    tenantTable.replaceChildren(names.length ? h('table', { class: 'data compact' },
      h('thead', {}, h('tr', {}, h('th', {}, 'tenant'), present.map((k) => h('th', { class: 'num' }, k)), h('th', { class: 'num' }, 'total'), h('th', { class: 'num' }, 'sandboxes'))),
      h('tbody', {}, names.map((t) => h('tr', { 'data-tenant': t }, h('td', {}, t),
        present.map((k) => h('td', { class: 'num' }, String((by[t] && by[t][k]) || 0))),
        h('td', { class: 'num' }, String(Object.values(by[t] || {}).reduce((a, n) => a + (Number(n) || 0), 0))),
        h('td', { class: 'num' }, String(sbt[t] ?? 0)))))) : '');
    const end = typeof st.now === 'number' ? st.now : nowS();
    act.replaceChildren(st.activations === null || st.activations === undefined ? adminOnly()
      : lineChart([{ name: 'activations/s', cls: 'c-activations', points: rates }], { end, width: widthOf(act), label: 'activations per second' }));
    const hl = [];
    if (typeof st.hosts === 'number') hl.push({ name: 'hosts', cls: 'c-hosts', points: series('hosts') });
    if (sandboxCount(st) !== null) hl.push({ name: 'sandboxes', cls: 'c-sandboxes', points: series('sandboxes') });
    hosts.replaceChildren(...(hl.length ? [lineChart(hl, { end, width: widthOf(hosts), label: 'live hosts and sandboxes', integer: true }),
      legend(hl.map((l) => [l.name, l.cls]))] : [adminOnly()]));
    cold.replaceChildren(st.cold_starts === null || st.cold_starts === undefined ? adminOnly()
      : lineChart([{ name: 'cold starts', cls: 'c-cold', points: series('cold_starts') }], { end, width: widthOf(cold), label: 'cold starts', integer: true }));
  }
  render(state.stats);
  state.onStats = render;
  return { stop() { state.onStats = null; } };
}

/* ---------- instances page ---------- */

function toEpoch(local) { if (!local) return ''; const t = new Date(local).getTime(); return isNaN(t) ? '' : t / 1000; }

function instancesPage() {
  const L = state.list, f = L.filters, admin = !!state.who.admin;
  let alive = true, busy = false, timer = null, next = null;
  const input = (id, props) => h('input', { id, ...props, value: f[props.name] });
  const tenantInput = admin ? input('filter-tenant', { name: 'tenant', type: 'text', list: 'tenant-list', placeholder: 'all tenants', spellcheck: 'false' }) : null;
  const datalist = h('datalist', { id: 'tenant-list' });
  const statusSel = h('select', { id: 'filter-status', name: 'status' }, h('option', { value: '' }, 'any status'), STATUSES.map((st) => h('option', { value: st }, st)));
  statusSel.value = f.status;
  const after = input('filter-after', { name: 'after', type: 'datetime-local', step: 1 });
  const before = input('filter-before', { name: 'before', type: 'datetime-local', step: 1 });
  const limit = h('select', { id: 'filter-limit', name: 'limit' }, ['25', '50', '100', '200'].map((n) => h('option', { value: n }, n)));
  limit.value = f.limit;
  const field = (label, el) => h('label', { class: 'field' }, h('span', {}, label), el);
  const form = h('form', { class: 'filters', id: 'filters', onsubmit: (e) => { e.preventDefault(); apply(); } },
    admin ? field('Tenant', tenantInput) : null, datalist, field('Status', statusSel),
    field('Created after', after), field('Created before', before), field('Per page', limit),
    h('div', { class: 'field-buttons' },
      h('button', { type: 'submit', id: 'apply-filters' }, 'Apply'),
      h('button', { type: 'button', class: 'secondary', id: 'reset-filters', onclick: reset }, 'Reset')));
  const prev = h('button', { type: 'button', id: 'prev-page', class: 'secondary', onclick: () => { if (L.cursors.length > 1) { L.cursors.pop(); load(); } } }, '← Previous');
  const nextB = h('button', { type: 'button', id: 'next-page', class: 'secondary', onclick: () => { if (next) { L.cursors.push(next); load(); } } }, 'Next →');
  const pageNo = h('span', { id: 'page-number', class: 'muted' });
  const auto = h('input', { type: 'checkbox', id: 'auto-refresh', onchange: () => { L.auto = auto.checked; schedule(); } });
  auto.checked = L.auto;
  const tbody = h('tbody');
  const table = h('table', { class: 'data', id: 'instances-table' },
    h('thead', {}, h('tr', {}, ['tenant', 'id', 'status', 'version', 'created', 'updated'].map((c) => h('th', { scope: 'col' }, c)))), tbody);
  mount(h('div', { id: 'instances' }, h('h1', {}, 'Instances'), form,
    h('div', { class: 'toolbar' }, prev, pageNo, nextB, h('span', { class: 'spacer' }),
      h('label', { class: 'check' }, auto, ' auto-refresh'),
      h('button', { type: 'button', id: 'refresh-instances', class: 'secondary', onclick: () => load() }, 'Refresh')),
    h('div', { class: 'table-wrap' }, table)));

  function readForm() {
    f.tenant = admin ? tenantInput.value.trim() : ''; f.status = statusSel.value;
    f.after = after.value; f.before = before.value; f.limit = limit.value;
  }
  function apply() { readForm(); L.cursors = [null]; load(); }
  function reset() { form.reset(); for (const k of ['tenant', 'status', 'after', 'before']) f[k] = ''; statusSel.value = ''; limit.value = f.limit = '50'; apply(); }
  function schedule() { clearTimeout(timer); if (alive && L.auto) timer = setTimeout(async () => { await load(true); schedule(); }, LIST_REFRESH_MS); }
  function row(inst) {
    const go = () => { location.hash = instHash(inst.tenant, inst.id); };
    const st = badge(inst.status);
    if (inst.error) st.title = `${inst.error.name}: ${inst.error.message}`;
    return h('tr', { 'data-instance-id': inst.id, 'data-tenant': inst.tenant, tabindex: 0, class: 'clickable', onclick: go,
      onkeydown: (e) => { if (e.key === 'Enter') go(); } },
    h('td', { class: 'tenant' }, inst.tenant),
    h('td', { class: 'id' }, h('a', { href: instHash(inst.tenant, inst.id) }, inst.id)),
    h('td', {}, st),
    h('td', { class: 'mono', title: inst.version ?? '' }, shortVersion(inst.version)),
    h('td', { class: 'time' }, fmtTime(inst.created_at)),
    h('td', { class: 'time' }, fmtTime(inst.updated_at)));
  }
  async function load(quiet) {
    if (busy) return;
    busy = true;
    const cursor = L.cursors[L.cursors.length - 1];
    try {
      const res = await api('GET', `/v1/instances${qs({ tenant: f.tenant, status: f.status, created_after: toEpoch(f.after),
        created_before: toEpoch(f.before), limit: f.limit, cursor })}`);
      if (!alive) return;
      next = res.next_cursor || null;
      const items = res.instances || [];
      tbody.replaceChildren(...(items.length ? items.map(row)
        : [h('tr', { class: 'empty' }, h('td', { colspan: 6, class: 'muted' }, 'No instances match.'))]));
      if (!quiet) clearError();
    } catch (e) { if (alive) report(e); } finally {
      busy = false;
      prev.disabled = L.cursors.length <= 1; nextB.disabled = !next;
      pageNo.textContent = `page ${L.cursors.length}`;
    }
  }
  if (admin) {
    (state.tenants ? Promise.resolve(state.tenants) : api('GET', '/v1/tenants').then((r) => (state.tenants = (r.tenants || []).map((t) => t.tenant))))
      .then((ts) => { if (alive) datalist.replaceChildren(...ts.map((t) => h('option', { value: t }))); }).catch(() => {});
  }
  load(); schedule();
  return { stop() { alive = false; clearTimeout(timer); } };
}

/* ---------- instance page ---------- */

const STEP_CLASS = { complete: 'st-complete', failed: 'st-errored', errored: 'st-errored', retrying: 'st-waiting', waiting: 'st-waiting',
  sleeping: 'st-waiting', running: 'st-running', queued: 'st-queued', terminated: 'st-terminated' };

/** SVG timeline: one row per step (occurrence), a bar from started_at to finished_at (or now). */
function stepTimeline(steps, now, width = 760) {
  const W = width, L = 190, R = 56, rowH = 24, T = 22, B = 6;
  if (!steps.length) return h('p', { class: 'muted' }, 'No steps yet.');
  const t0 = Math.min(...steps.map((st) => st.started_at ?? now));
  const t1 = Math.max(t0 + 1, ...steps.map((st) => st.finished_at ?? (st.started_at !== null && st.started_at !== undefined ? now : t0)));
  const span = t1 - t0;
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  const H = T + B + steps.length * rowH;
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: 'chart timeline', role: 'img', 'aria-label': 'step timeline' });
  const step = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400].find((v) => v * 6 >= span) ?? 86400 * Math.ceil(span / 6 / 86400);
  for (let d = 0; d <= span; d += step) {
    const nearEnd = x(t0 + d) > W - R - 40;
    svg.append(s('line', { x1: x(t0 + d), x2: x(t0 + d), y1: T - 4, y2: H - B, class: 'grid' }),
      s('text', { x: x(t0 + d), y: 12, class: 'tick', 'text-anchor': d === 0 ? 'start' : nearEnd ? 'end' : 'middle' }, d === 0 ? fmtTime(t0).slice(11) : `+${fmtDur(d)}`));
  }
  steps.forEach((st, i) => {
    const y = T + i * rowH;
    const live = st.finished_at === null || st.finished_at === undefined;
    const start = st.started_at ?? now, end = live ? now : st.finished_at;
    let name = `${st.kind === 'rollback' ? '↶ ' : ''}${st.name}${st.count > 1 ? ` #${st.count}` : ''}`;
    if (name.length > 28) name = `${name.slice(0, 27)}…`;
    const tip = [`${st.name} #${st.count}`, `kind: ${st.kind}`, `status: ${st.status}`, `attempts: ${st.attempts}`,
      `started: ${fmtTime(st.started_at)}`, `finished: ${live ? '—' : fmtTime(st.finished_at)}`, `duration: ${fmtDur(end - start)}`,
      st.next_attempt_at ? `next attempt: ${fmtTime(st.next_attempt_at)}` : null,
      st.error ? `error: ${st.error.name}: ${st.error.message}` : null].filter(Boolean).join('\n');
    const bx = x(start), bw = Math.max(3, x(end) - bx);
    const g = s('g', { 'data-step': st.name, 'data-count': st.count, 'data-status': st.status, 'data-kind': st.kind, class: 'step-row' },
      s('title', {}, tip),
      s('text', { x: L - 8, y: y + rowH / 2 + 4, class: 'label', 'text-anchor': 'end' }, name),
      s('rect', { x: bx, y: y + 5, width: bw, height: rowH - 10, rx: 3, class: `fill ${STEP_CLASS[st.status] || 'st-unknown'}${live ? ' live' : ''}${st.kind === 'rollback' ? ' rollback' : ''}` }));
    if (st.attempts > 1) g.append(s('text', { x: bx + bw + 5, y: y + rowH / 2 + 4, class: 'tick attempts' }, `×${st.attempts}`));
    svg.append(g);
  });
  return svg;
}

function safeHref(url) {
  try { const u = new URL(url, location.href); return u.protocol === 'http:' || u.protocol === 'https:' ? u.href : null; } catch (_) { return null; }
}
function traceHref(d) {
  if (!d.trace_id) return null;
  if (d.trace_url) return safeHref(d.trace_url);
  const tpl = state.config && state.config.trace_url;
  return tpl ? safeHref(tpl.replaceAll('{trace_id}', enc(d.trace_id)).replaceAll('{tenant}', enc(d.tenant))) : null;
}

/** Reads a text/event-stream body; calls onEvent({event, id, data}) until it returns true (then
 * reads on to the end the server makes, without cancelling: no aborted request). True: it did. */
async function readSse(body, onEvent) {
  const reader = body.getReader(), decoder = new TextDecoder();
  let buf = '', ev = { event: '', id: null, data: [] }, finished = false;
  for (;;) {
    const { value, done } = await reader.read();
    buf += done ? decoder.decode() : decoder.decode(value, { stream: true });
    for (;;) {
      const m = /\r\n|\r|\n/.exec(buf);
      if (!m || (m[0] === '\r' && m.index === buf.length - 1 && !done)) break;   // a \r\n may be split
      const line = buf.slice(0, m.index);
      buf = buf.slice(m.index + m[0].length);
      if (line === '') {
        if (!finished && ev.data.length) finished = !!onEvent({ event: ev.event || 'message', id: ev.id, data: ev.data.join('\n') });
        ev = { event: '', id: null, data: [] }; continue;
      }
      if (line[0] === ':') continue;
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      let v = i < 0 ? '' : line.slice(i + 1);
      if (v[0] === ' ') v = v.slice(1);
      if (field === 'event') ev.event = v; else if (field === 'data') ev.data.push(v); else if (field === 'id') ev.id = v;
    }
    if (done) return finished;
  }
}

/** Follows GET .../logs/stream with fetch (EventSource cannot send Authorization), resuming after the last id. */
function logStream(base, after, { onLine, onEnd, onState }) {
  let lastId = after || 0, stopped = false, ctrl = null, delay = 1000;
  (async () => {
    while (!stopped) {
      ctrl = new AbortController();
      onState('connecting…');
      try {
        const headers = authHeaders({ Accept: 'text/event-stream' });
        if (lastId) headers['Last-Event-ID'] = String(lastId);
        const res = await fetch(`${base}/logs/stream?after=${lastId}`, { headers, signal: ctrl.signal, cache: 'no-store' });
        if (res.status === 401) { rejected(await errorOf(res)); return; }
        if (!res.ok) {
          const e = await errorOf(res);
          if (res.status < 500) { onState('stopped'); report(e); return; }
          throw e;
        }
        onState('live');
        const ended = await readSse(res.body, (ev) => {
          if (ev.event === 'log') {
            let line; try { line = JSON.parse(ev.data); } catch (_) { return false; }
            const id = Number(ev.id ?? line.id);
            if (id && id <= lastId) return false;   // already shown
            if (id) lastId = id;
            delay = 1000;
            onLine(line);
          } else if (ev.event === 'end') {
            let d = {}; try { d = JSON.parse(ev.data) || {}; } catch (_) { /* ignore */ }
            onEnd(d); return true;
          }
          return false;
        });
        if (ended || stopped) return;
      } catch (e) {
        if (stopped || (e && e.name === 'AbortError')) return;
      }
      onState('reconnecting…');
      await sleep(delay);
      delay = Math.min(delay * 2, 15000);
    }
  })();
  return { stop() { stopped = true; if (ctrl) ctrl.abort(); } };
}

function instancePage(tenant, id) {
  const base = instPath(tenant, id);
  let alive = true, timer = null, busy = false, gone = false, stream = null, streamEnded = false;
  const status = badge(null, { id: 'instance-status' });
  const btn = (bid, text, onclick, c = 'secondary') => h('button', { type: 'button', id: bid, class: c, onclick }, text);
  const rollback = h('input', { type: 'checkbox', id: 'terminate-rollback' });
  const pauseB = btn('pause', 'Pause', () => act('pause', {}));
  const resumeB = btn('resume', 'Resume', () => act('resume', {}));
  const termB = btn('terminate', 'Terminate', () => act('terminate', { rollback: rollback.checked },
    `Terminate instance ${id} of ${tenant}${rollback.checked ? ' and roll back its steps' : ''}?`), 'danger');
  const restartB = btn('restart', 'Restart', () => act('restart', { from_step: null }, `Restart instance ${id} of ${tenant} from the beginning?`), 'danger');
  const meta = h('dl', { class: 'meta', id: 'instance-meta' });
  const callouts = h('div');
  const blocks = h('div', { class: 'grid2' });
  const timeline = h('div', { id: 'step-timeline', class: 'chart-box' });
  const stepTable = h('div', { class: 'table-wrap' });
  const logs = h('div', { id: 'logs', class: 'logs', role: 'log', 'aria-live': 'off' });
  const logsState = h('span', { id: 'logs-state', class: 'muted' });
  const follow = h('input', { type: 'checkbox', id: 'logs-follow', checked: true });
  const evType = h('input', { id: 'event-type', type: 'text', placeholder: 'e.g. approval', spellcheck: 'false' });
  const evPayload = h('textarea', { id: 'event-payload', rows: 4, spellcheck: 'false', placeholder: '{"approved": true}  (JSON; empty = null)' });
  const evError = h('p', { id: 'event-error', class: 'message', role: 'alert' });
  const sendB = h('button', { type: 'submit', id: 'send-event' }, 'Send event');
  const evForm = h('form', { id: 'event-form', class: 'event-form', onsubmit: sendEvent },
    h('label', { class: 'field' }, h('span', {}, 'Type'), evType),
    h('label', { class: 'field' }, h('span', {}, 'Payload (JSON)'), evPayload), h('div', {}, sendB), evError);
  evPayload.addEventListener('input', () => { evPayload.removeAttribute('aria-invalid'); evError.textContent = ''; });

  mount(h('div', { id: 'instance', 'data-tenant': tenant, 'data-instance-id': id },
    h('p', { class: 'crumbs' }, h('a', { href: '#/instances' }, 'Instances'), ' › ', h('span', {}, tenant), ' › '),
    h('div', { class: 'title-row' }, h('h1', { class: 'id' }, id), status),
    h('div', { class: 'actions' }, pauseB, resumeB, h('span', { class: 'sep' }), termB,
      h('label', { class: 'check' }, rollback, ' with rollback'), restartB, h('span', { class: 'spacer' }),
      btn('refresh-instance', 'Refresh', () => refresh())),
    callouts,
    h('div', { class: 'grid2' },
      h('section', { class: 'card' }, h('h2', {}, 'Details'), meta),
      h('section', { class: 'card' }, h('h2', {}, 'Send event'), evForm)),
    blocks,
    h('section', { class: 'card' }, h('h2', {}, 'Steps'), timeline, stepTable),
    h('section', { class: 'card' }, h('div', { class: 'card-head' }, h('h2', {}, 'Logs'), logsState, h('span', { class: 'spacer' }),
      h('label', { class: 'check' }, follow, ' follow')), logs)));

  function renderDetail(d) {
    status.textContent = d.status; status.dataset.status = d.status; status.className = `badge st-${cls(d.status)}`;
    const href = traceHref(d);
    const trace = !d.trace_id ? '—' : href ? h('a', { id: 'trace-link', href, target: '_blank', rel: 'noopener noreferrer' }, d.trace_id)
      : h('span', { class: 'mono' }, d.trace_id);
    const rows = [['tenant', d.tenant], ['version', h('span', { class: 'mono', title: d.version ?? '' }, d.version ?? '—')],
      ['created', fmtTime(d.created_at)], ['updated', fmtTime(d.updated_at)], ['activations', d.activations ?? '—'],
      ['wake at', d.wake_at ? fmtTime(d.wake_at) : '—'], ['waiting for', d.waiting_for ? (typeof d.waiting_for === 'string' ? d.waiting_for : JSON.stringify(d.waiting_for)) : '—'],
      ['pause requested', d.pause_requested ? 'yes' : 'no'], ['trace', h('span', { id: 'trace' }, trace)]];
    meta.replaceChildren(...rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
    callouts.replaceChildren(
      d.condition ? h('div', { class: 'callout warn', id: 'instance-condition' }, h('strong', {}, 'Condition: '), typeof d.condition === 'string' ? d.condition : pretty(d.condition)) : '',
      d.warning ? h('div', { class: 'callout warn', id: 'instance-warning' }, h('strong', {}, 'Warning: '), typeof d.warning === 'string' ? d.warning : pretty(d.warning)) : '');
    const pre = (pid, title, v, c = '') => h('section', { class: `card ${c}` }, h('h2', {}, title), h('pre', { id: pid, class: 'json' }, pretty(v) ?? 'null'));
    blocks.replaceChildren(pre('instance-params', 'Params', d.params),
      d.error ? pre('instance-error', 'Error', d.error, 'bad') : pre('instance-output', 'Output', d.output),
      d.rollback && d.rollback.length ? pre('instance-rollback', 'Rollback', d.rollback) : '');
  }
  function renderSteps(steps) {
    timeline.replaceChildren(stepTimeline(steps, nowS(), widthOf(timeline)));
    stepTable.replaceChildren(steps.length ? h('table', { class: 'data compact' },
      h('thead', {}, h('tr', {}, ['step', '#', 'kind', 'status', 'attempts', 'started', 'duration', 'error'].map((c) => h('th', {}, c)))),
      h('tbody', {}, steps.map((st) => h('tr', {},
        h('td', {}, st.name), h('td', { class: 'num' }, String(st.count)), h('td', {}, st.kind),
        h('td', {}, h('span', { class: `badge ${STEP_CLASS[st.status] || 'st-unknown'}` }, st.status)),
        h('td', { class: 'num' }, String(st.attempts ?? '')), h('td', { class: 'time' }, fmtTime(st.started_at)),
        h('td', { class: 'num' }, st.started_at ? fmtDur((st.finished_at ?? nowS()) - st.started_at) : '—'),
        h('td', { class: 'err' }, st.error ? `${st.error.name}: ${st.error.message}` : ''))))) : '');
  }
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const [d, st] = await Promise.all([api('GET', base), api('GET', `${base}/steps`)]);
      if (!alive) return;
      gone = false; renderDetail(d); renderSteps(st.steps || []);
      if (streamEnded && !FINAL.has(d.status)) startLogs();   // restarted / resumed: follow again
    } catch (e) {
      if (alive) report(e);
      if (e instanceof ApiError && e.status === 404) gone = true;   // stop polling an unknown instance
    } finally { busy = false; }
  }
  function schedule() { clearTimeout(timer); if (alive && !gone) timer = setTimeout(async () => { await refresh(); schedule(); }, INSTANCE_REFRESH_MS); }

  let lastLogId = 0;
  function addLine(line) {
    const lid = Number(line.id) || 0;
    if (lid && lid <= lastLogId) return;
    if (lid) lastLogId = lid;
    const where = line.step ? `${line.step}${line.count > 1 ? `#${line.count}` : ''}${line.attempt ? `/${line.attempt}` : ''}` : 'run';
    logs.append(h('div', { class: `log-line ${line.stream === 'stderr' ? 'stderr' : ''}`, 'data-log-id': line.id ?? '', 'data-stream': line.stream ?? '' },
      h('span', { class: 'log-time' }, typeof line.at === 'number' ? fmtClock(line.at) : ''), ' ',
      h('span', { class: 'log-where' }, where), ' ',
      h('span', { class: 'log-msg' }, line.message ?? line.text ?? '')));
    while (logs.childElementCount > MAX_LOG_LINES) logs.firstElementChild.remove();
    if (follow.checked) logs.scrollTop = logs.scrollHeight;
  }
  function startLogs() {
    if (stream) stream.stop();
    streamEnded = false;
    stream = logStream(base, lastLogId, {
      onLine: addLine,
      onEnd: (d) => { streamEnded = true; logsState.textContent = `ended${d.status ? ` (${d.status})` : ''}`; },
      onState: (t) => { if (alive) logsState.textContent = t; },
    });
  }

  async function act(name, body, confirmText) {
    if (confirmText && !window.confirm(confirmText)) return;
    for (const b of [pauseB, resumeB, termB, restartB]) b.disabled = true;
    try {
      await api('POST', `${base}/${name}`, body);
      if (!alive) return;
      clearError(); notice(`${name} requested`);
    } catch (e) { if (alive) report(e); } finally {
      for (const b of [pauseB, resumeB, termB, restartB]) b.disabled = false;   // the server says what is allowed
      if (alive) await refresh();
    }
  }
  async function sendEvent(e) {
    e.preventDefault();
    evError.textContent = ''; evPayload.removeAttribute('aria-invalid');
    const type = evType.value.trim();
    const fail = (msg) => { evError.textContent = msg; showError(msg); };
    if (!type) { fail('Event type is required.'); return; }
    let payload = null;
    const text = evPayload.value.trim();
    if (text) {
      try { payload = JSON.parse(text); } catch (err) { evPayload.setAttribute('aria-invalid', 'true'); fail(`Payload is not valid JSON: ${err.message}`); return; }
    }
    sendB.disabled = true;
    try {
      await api('POST', `${base}/events`, { type, payload });
      if (!alive) return;
      clearError(); notice(`event "${type}" sent`);
      await refresh();
    } catch (err) { if (alive) report(err); } finally { sendB.disabled = false; }
  }

  refresh().then(schedule);
  startLogs();
  return { stop() { alive = false; clearTimeout(timer); if (stream) stream.stop(); } };
}

/* ---------- start ---------- */

document.addEventListener('DOMContentLoaded', () => {
  $('#signin-form').addEventListener('submit', signIn);
  $('#sign-out').addEventListener('click', () => signOut('Signed out.'));
  $('#error-close').addEventListener('click', clearError);
  window.addEventListener('hashchange', route);
  if (state.token) enter().catch((e) => { if (!(e instanceof ApiError && e.status === 401)) showSignIn(`${e.name}: ${e.message}`); });
  else showSignIn('');
});
