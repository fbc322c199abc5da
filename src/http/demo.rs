//! What the relay serves a browser: the live dashboard at `/` (built on
//! the browser client, with a raw publish/subscribe console as a second
//! tab) and the client itself at `/client.js` (`client/ringcast.js`).

/// The browser client, as `client/ringcast.js` holds it.
pub const CLIENT_JS: &str = include_str!("../../client/ringcast.js");

pub const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>ringcast</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#0f1419;color:#e6e6e6}
header{display:flex;flex-wrap:wrap;gap:1em;align-items:center;padding:.8em 1.2em;background:#1a2029;position:sticky;top:0}
header h1{font-size:1.1em;margin:0}
#state{padding:.15em .6em;border-radius:1em;background:#555}
#state.connected{background:#1f7a3a}#state.reconnecting{background:#a06a00}#state.recovered{background:#1f5f9a}#state.closed{background:#8a1f1f}
nav button,select,input,button{font:inherit}
nav button{background:none;border:0;color:#9ab;cursor:pointer;padding:.2em .5em}nav button.on{color:#fff;border-bottom:2px solid #4aa3ff}
main{padding:1em 1.2em}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(9.5em,1fr));gap:.5em}
.tile{background:#1a2029;border-radius:.4em;padding:.5em .7em;transition:background .3s}
.tile.up{background:#173d26}.tile.down{background:#4a1c1c}
.tile b{display:block;color:#9ab;font-size:.85em}.tile span{font-size:1.25em;font-variant-numeric:tabular-nums}
.tile i{display:block;font-style:normal;color:#789;font-size:.8em}
#hint code{background:#1a2029;padding:.1em .3em}
#log{white-space:pre-wrap;background:#1a2029;padding:1em;height:24em;overflow:auto}
</style></head><body>
<header>
 <h1>ringcast</h1>
 <span id="state">connecting</span>
 <span id="rates">0 msg/s received, 0 merged/s</span>
 <label>conflate <select id="conflate"><option value="0">off</option><option value="16">16 ms</option><option value="100" selected>100 ms</option><option value="1000">1000 ms</option></select></label>
 <nav><button data-tab="dashboard" class="on">Dashboard</button><button data-tab="console">Console</button></nav>
</header>
<main>
<section id="dashboard">
 <p id="hint">Waiting for data on channel <b id="channel"></b>. Publish keyed prices, e.g. with
 <code>cargo run --release -p ringcast-bench --bin demo-feed</code>.</p>
 <div id="grid"></div>
</section>
<section id="console" hidden>
 <p>Channel <input id="ch" value="demo"> <button id="sub">Subscribe</button>
  Data <input id="data" value='{"hello":"world"}'> <button id="pub">Publish</button></p>
 <div id="log"></div>
</section>
</main>
<script type="module">
import { RingcastClient } from '/client.js';
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// A relay that requires tokens takes one from this page's own URL:
// https://host/?token=JWT.
const token = params.get('token');
const channel = params.get('channel') || 'prices';
const wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
$('channel').textContent = channel;

for (const b of document.querySelectorAll('nav button')) {
  b.onclick = () => {
    for (const o of document.querySelectorAll('nav button')) o.classList.toggle('on', o === b);
    for (const s of document.querySelectorAll('main section')) s.hidden = s.id !== b.dataset.tab;
  };
}

// The dashboard: one tile per key, the latest value, its age.
const board = { received: 0, merged: 0, keys: 0, state: 'connecting', resumed: 0, recovered: null };
window.dashboard = board;
const tiles = new Map();
const dirty = new Set();
const client = new RingcastClient(wsUrl, token ? { getToken: () => token } : {});
const showState = (text, cls) => { const s = $('state'); s.textContent = text; s.className = cls; board.state = cls; };
client.on('state', (s) => {
  if (s.state === 'reconnecting') showState(`reconnecting (attempt ${s.attempt}, in ${s.delay} ms)`, 'reconnecting');
  else if (s.state === 'connected') showState(s.resumed ? 'reconnected' : 'connected', 'connected');
  else showState(s.state, s.state);
});
client.on('subscribed', (e) => {
  if (!e.resumed) return;
  board.resumed += 1;
  board.recovered = e.recovered;
  showState(e.recovered ? 'recovered' : 'resubscribed (state reloaded)', e.recovered ? 'recovered' : 'connected');
});
client.on('message', (e) => {
  if (e.channel !== channel) return;
  board.received += 1;
  board.merged += e.conflated || 0;
  const key = e.key ?? '(no key)';
  let t = tiles.get(key);
  if (!t) {
    const el = document.createElement('div');
    el.className = 'tile';
    el.innerHTML = '<b></b><span></span><i></i>';
    el.firstChild.textContent = key;
    t = { el, value: null, at: 0 };
    tiles.set(key, t);
    board.keys = tiles.size;
    $('hint').hidden = true;
  }
  const d = e.data;
  const value = d && typeof d === 'object' && 'bid' in d ? d.bid : d;
  t.trend = typeof value === 'number' && typeof t.value === 'number' ? Math.sign(value - t.value) : 0;
  t.value = value;
  t.at = d && typeof d === 'object' && typeof d.t === 'number' ? d.t : Date.now();
  dirty.add(t);
});
const render = () => {
  const grid = $('grid');
  for (const t of dirty) {
    if (!t.el.parentNode) grid.appendChild(t.el);
    t.el.children[1].textContent = typeof t.value === 'number' ? t.value.toFixed(2)
      : typeof t.value === 'object' ? JSON.stringify(t.value) : String(t.value);
    t.el.classList.toggle('up', t.trend > 0);
    t.el.classList.toggle('down', t.trend < 0);
  }
  dirty.clear();
  requestAnimationFrame(render);
};
requestAnimationFrame(render);
let last = { received: 0, merged: 0, at: performance.now() };
setInterval(() => {
  const now = performance.now(), secs = (now - last.at) / 1000;
  $('rates').textContent = `${Math.round((board.received - last.received) / secs)} msg/s received, ` +
    `${Math.round((board.merged - last.merged) / secs)} merged/s`;
  last = { received: board.received, merged: board.merged, at: now };
  const wall = Date.now();
  for (const t of tiles.values()) t.el.children[2].textContent = `age ${Math.max(0, wall - t.at)} ms`;
}, 500);
const subscribe = () => {
  const ms = Number($('conflate').value);
  return client.subscribe(channel, ms ? { snapshot: true, conflateMs: ms } : { snapshot: true });
};
$('conflate').onchange = () => subscribe();
client.connect();
subscribe();

// The console: a raw WebSocket of the JSON protocol.
const log = (t) => { const l = $('log'); l.textContent += t + '\n'; l.scrollTop = l.scrollHeight; };
const ws = new WebSocket(wsUrl + (token ? '?token=' + encodeURIComponent(token) : ''), 'ringcast.v1.json');
let id = 0;
ws.onopen = () => log('connected');
ws.onclose = (e) => log('closed ' + e.code + ' ' + e.reason);
ws.onmessage = (e) => { const m = JSON.parse(e.data); (Array.isArray(m) ? m : [m]).forEach(ev => log(JSON.stringify(ev))); };
$('sub').onclick = () => ws.send(JSON.stringify({action: 'subscribe', channel: $('ch').value, id: ++id}));
// Published as a backend does (WebSocket clients may not publish unless
// the relay allows it).
$('pub').onclick = async () => {
  let data; try { data = JSON.parse($('data').value); } catch (_) { data = $('data').value; }
  const r = await fetch('/publish/' + encodeURIComponent($('ch').value), {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(data)});
  log('POST /publish: ' + r.status + ' ' + await r.text());
};
</script></body></html>
"#;
