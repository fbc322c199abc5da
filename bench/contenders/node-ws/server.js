// The relay of the Node.js tutorials, as a benchmark contender: `ws` for
// the WebSockets, `ioredis` for Redis pub/sub, one Redis channel per
// subscribed channel, and each Redis message fanned out by iterating the
// channel's subscriber set. One process, one core. It speaks the subset of
// the ringcast.v1 JSON protocol the load generator uses (subscribe,
// publish, one request or an array), so one load generator drives it and
// ringcast alike: that vocabulary is the only thing borrowed from ringcast.
//
//   PORT=8090 REDIS_URL=redis://127.0.0.1:6379 node server.js
'use strict';

const { WebSocketServer } = require('ws');
const Redis = require('ioredis');

const port = Number(process.env.PORT || 8090);
const redisUrl = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const pub = new Redis(redisUrl);
const sub = new Redis(redisUrl);
const subscribers = new Map(); // channel -> Set of sockets

// The tutorial fan-out: the message as Redis delivered it, sent to every
// subscriber of the channel.
sub.on('message', (channel, message) => {
  const set = subscribers.get(channel);
  if (set) for (const ws of set) ws.send(message);
});

function reply(ws, event, id) {
  if (id !== undefined) event.id = id;
  ws.send(JSON.stringify(event));
}

async function handle(ws, req) {
  const { action, channel, id } = req || {};
  if (typeof channel !== 'string') {
    return reply(ws, { type: 'error', code: 'bad_request', message: 'missing channel' }, id);
  }
  if (action === 'subscribe') {
    let set = subscribers.get(channel);
    if (!set) {
      set = new Set();
      subscribers.set(channel, set);
      await sub.subscribe(channel);
    }
    set.add(ws);
    ws.channels.add(channel);
    return reply(ws, { type: 'subscribed', channel }, id);
  }
  if (action === 'publish') {
    const message = JSON.stringify({ type: 'message', channel, data: req.data });
    await pub.publish(channel, message);
    return reply(ws, { type: 'published', channel }, id);
  }
  return reply(ws, { type: 'error', code: 'unknown_action', message: 'only subscribe and publish' }, id);
}

const wss = new WebSocketServer({
  host: '127.0.0.1',
  port,
  path: '/ws',
  perMessageDeflate: false,
  handleProtocols: (protocols) => (protocols.has('ringcast.v1.json') ? 'ringcast.v1.json' : false),
});

wss.on('connection', (ws) => {
  ws.channels = new Set();
  ws.on('message', async (raw) => {
    let parsed;
    try {
      parsed = JSON.parse(raw);
    } catch {
      return reply(ws, { type: 'error', code: 'bad_request', message: 'invalid JSON' });
    }
    for (const req of Array.isArray(parsed) ? parsed : [parsed]) {
      try {
        await handle(ws, req);
      } catch (e) {
        reply(ws, { type: 'error', code: 'internal', message: String(e) }, req && req.id);
      }
    }
  });
  ws.on('close', () => {
    for (const channel of ws.channels) {
      const set = subscribers.get(channel);
      if (!set) continue;
      set.delete(ws);
      if (set.size === 0) {
        subscribers.delete(channel);
        sub.unsubscribe(channel).catch(() => {});
      }
    }
  });
});

wss.on('listening', () => console.log(`node-ws listening on 127.0.0.1:${port}`));
process.on('SIGTERM', () => process.exit(0));
