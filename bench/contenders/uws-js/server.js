// uWebSockets.js as a benchmark contender: uWebSockets' own topic pub/sub
// (`ws.subscribe(C)`, `app.publish(C, ...)`), no backplane, one process,
// one core. It speaks the subset of the ringcast.v1 JSON protocol the load
// generator uses (subscribe, publish, one request or an array), as
// node-ws/server.js does; read that as the reference.
//
//   PORT=8098 node server.js
//
// The npm build used here (@trufflesuite/uws-js-unofficial) silently falls
// back to a pure-Node implementation on `ws` when its native addon does not
// load (e.g. a Node.js whose ABI it has no binary for). A benchmark of that
// fallback would be a benchmark of `ws`, so the addon is required directly
// and the server refuses to start without it.
'use strict';

const addon =
  '@trufflesuite/uws-js-unofficial/binaries/uws_' +
  `${process.platform}_${process.arch}_${process.versions.modules}.node`;
let uWS;
try {
  uWS = require(addon);
} catch (e) {
  console.error(`uws: the native uWebSockets.js addon does not load on node ${process.version}: ${e.message}`);
  process.exit(1);
}

const port = Number(process.env.PORT || 8098);
const SUBPROTOCOL = 'ringcast.v1.json';
const MiB = 1024 * 1024;
const decoder = new TextDecoder();

function reply(ws, event, id) {
  if (id !== undefined) event.id = id;
  ws.send(JSON.stringify(event), false);
}

function handle(ws, req) {
  const { action, channel, id } = req || {};
  if (typeof channel !== 'string') {
    return reply(ws, { type: 'error', code: 'bad_request', message: 'missing channel' }, id);
  }
  if (action === 'subscribe') {
    ws.subscribe(channel);
    return reply(ws, { type: 'subscribed', channel }, id);
  }
  if (action === 'publish') {
    // app.publish reaches every subscriber, the publishing socket included
    // (ws.publish would skip it).
    app.publish(channel, JSON.stringify({ type: 'message', channel, data: req.data }), false);
    return reply(ws, { type: 'published', channel }, id);
  }
  return reply(ws, { type: 'error', code: 'unknown_action', message: 'only subscribe and publish' }, id);
}

const app = uWS.App();

app.ws('/ws', {
  compression: uWS.DISABLED,
  // Never close a connection for being idle, and send no pings of our own.
  idleTimeout: 0,
  sendPingsAutomatically: false,
  maxPayloadLength: 16 * MiB,
  // uWebSockets' default (64 KiB) skips publications to a subscriber with
  // more buffered; 16 MiB matches Bun's default, so a slow consumer is
  // buffered for, not silently skipped, within a run.
  maxBackpressure: 16 * MiB,
  closeOnBackpressureLimit: false,

  upgrade: (res, req, context) => {
    const offered = req.getHeader('sec-websocket-protocol');
    const protocol = offered.split(',').some((p) => p.trim() === SUBPROTOCOL) ? SUBPROTOCOL : '';
    res.upgrade(
      {},
      req.getHeader('sec-websocket-key'),
      protocol,
      req.getHeader('sec-websocket-extensions'),
      context,
    );
  },

  message: (ws, message, isBinary) => {
    // `message` is an ArrayBuffer valid only during this call: decode now.
    let parsed;
    try {
      parsed = JSON.parse(decoder.decode(message));
    } catch {
      return reply(ws, { type: 'error', code: 'bad_request', message: 'invalid JSON' });
    }
    for (const req of Array.isArray(parsed) ? parsed : [parsed]) {
      try {
        handle(ws, req);
      } catch (e) {
        reply(ws, { type: 'error', code: 'internal', message: String(e) }, req && req.id);
      }
    }
  },
  // Subscriptions end with the socket; nothing to clean up.
});

app.any('/*', (res) => {
  res.writeStatus('404 Not Found').end('not found');
});

app.listen('127.0.0.1', port, (token) => {
  if (!token) {
    console.error(`uws: cannot listen on 127.0.0.1:${port}`);
    process.exit(1);
  }
  console.log(`uws listening on 127.0.0.1:${port}`);
});

process.on('SIGTERM', () => process.exit(0));
