// Bun as a benchmark contender: Bun.serve's WebSockets (uWebSockets inside)
// and Bun's own topic pub/sub (`ws.subscribe(C)`, `server.publish(C, ...)`),
// no backplane, one process, one core. It speaks the subset of the
// ringcast.v1 JSON protocol the load generator uses (subscribe, publish, one
// request or an array), as node-ws/server.js does; read that as the
// reference.
//
//   PORT=8099 bun server.js
'use strict';

const port = Number(process.env.PORT || 8099);
const SUBPROTOCOL = 'ringcast.v1.json';
const MiB = 1024 * 1024;

function reply(ws, event, id) {
  if (id !== undefined) event.id = id;
  ws.send(JSON.stringify(event));
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
    // server.publish reaches every subscriber, the publishing socket
    // included (ws.publish would skip it unless publishToSelf is set).
    server.publish(channel, JSON.stringify({ type: 'message', channel, data: req.data }));
    return reply(ws, { type: 'published', channel }, id);
  }
  return reply(ws, { type: 'error', code: 'unknown_action', message: 'only subscribe and publish' }, id);
}

const server = Bun.serve({
  hostname: '127.0.0.1',
  port,
  fetch(req, server) {
    if (new URL(req.url).pathname !== '/ws') {
      return new Response('not found', { status: 404 });
    }
    // Left alone, Bun echoes the client's whole Sec-WebSocket-Protocol
    // header, whatever it offered; answer with ringcast.v1.json when offered
    // and with no subprotocol otherwise (an empty value here sends none).
    const offered = (req.headers.get('sec-websocket-protocol') || '').split(',').map((p) => p.trim());
    const headers = { 'Sec-WebSocket-Protocol': offered.includes(SUBPROTOCOL) ? SUBPROTOCOL : '' };
    if (server.upgrade(req, { headers })) return undefined;
    return new Response('WebSocket upgrade expected', { status: 426 });
  },
  websocket: {
    perMessageDeflate: false,
    // Never close a connection for being idle, and send no pings of our own.
    idleTimeout: 0,
    sendPings: false,
    maxPayloadLength: 16 * MiB,
    backpressureLimit: 16 * MiB, // Bun's default, stated
    closeOnBackpressureLimit: false,
    message(ws, message) {
      let parsed;
      try {
        parsed = JSON.parse(typeof message === 'string' ? message : message.toString());
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
  },
});

console.log(`bun listening on 127.0.0.1:${server.port}`);
process.on('SIGTERM', () => process.exit(0));
