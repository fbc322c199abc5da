//! The demo page served at `/`: a browser client of the JSON protocol, for
//! the 30-second try in the README.

pub const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>ringcast</title>
<style>body{font:14px system-ui;margin:2em;max-width:50em}#log{white-space:pre-wrap;background:#f4f4f4;padding:1em;height:20em;overflow:auto}</style>
</head><body>
<h1>ringcast</h1>
<p>Channel <input id="ch" value="demo"> <button id="sub">Subscribe</button>
 Data <input id="data" value='{"hello":"world"}'> <button id="pub">Publish</button></p>
<div id="log"></div>
<script>
const log = (t) => { const l = document.getElementById('log'); l.textContent += t + '\n'; l.scrollTop = l.scrollHeight; };
// A relay that requires tokens takes one from this page's own URL:
// https://host/?token=JWT.
const token = new URLSearchParams(location.search).get('token');
const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws' +
  (token ? '?token=' + encodeURIComponent(token) : ''), 'ringcast.v1.json');
let id = 0;
ws.onopen = () => log('connected');
ws.onclose = (e) => log('closed ' + e.code + ' ' + e.reason);
ws.onmessage = (e) => { const m = JSON.parse(e.data); (Array.isArray(m) ? m : [m]).forEach(ev => log(JSON.stringify(ev))); };
document.getElementById('sub').onclick = () =>
  ws.send(JSON.stringify({action: 'subscribe', channel: document.getElementById('ch').value, id: ++id}));
// Published as a backend does (WebSocket clients may not publish unless
// the relay allows it).
document.getElementById('pub').onclick = async () => {
  let data; try { data = JSON.parse(document.getElementById('data').value); } catch (_) { data = document.getElementById('data').value; }
  const channel = encodeURIComponent(document.getElementById('ch').value);
  const r = await fetch('/publish/' + channel, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(data)});
  log('POST /publish: ' + r.status + ' ' + await r.text());
};
</script></body></html>
"#;
