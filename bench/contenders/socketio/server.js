// Socket.IO 4 with @socket.io/redis-adapter, as a benchmark contender:
// rooms are channels, a publication is `io.to(room).emit(...)`, and the
// Redis adapter carries it to every other server process, as the
// Socket.IO documentation sets it up. WebSocket transport only (no
// long-polling upgrade), no compression, one process, one core.
//
// Requests are Socket.IO events with acks: `subscribe` {channel} and
// `publish` {channel, data}; answers and deliveries are ringcast-style event
// objects, so the project's load generator (`--format socketio`) counts
// them the same way for every contender.
//
//   PORT=8092 REDIS_URL=redis://127.0.0.1:6379 node server.js
'use strict';

const { createServer } = require('http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const Redis = require('ioredis');

const port = Number(process.env.PORT || 8092);
const redisUrl = process.env.REDIS_URL || 'redis://127.0.0.1:6379';

const httpServer = createServer();
const io = new Server(httpServer, {
  transports: ['websocket'],
  perMessageDeflate: false,
  serveClient: false,
  // Longer than any benchmark run, so that heartbeats do not take part.
  pingInterval: 120000,
  pingTimeout: 60000,
});
const pubClient = new Redis(redisUrl);
const subClient = pubClient.duplicate();
io.adapter(createAdapter(pubClient, subClient));

io.on('connection', (socket) => {
  socket.on('subscribe', (req, ack) => {
    const channel = req && req.channel;
    if (typeof channel !== 'string') {
      if (typeof ack === 'function') ack({ type: 'error', code: 'bad_request', message: 'missing channel' });
      return;
    }
    socket.join(channel);
    if (typeof ack === 'function') ack({ type: 'subscribed', channel });
  });
  socket.on('publish', (req, ack) => {
    const channel = req && req.channel;
    if (typeof channel !== 'string') {
      if (typeof ack === 'function') ack({ type: 'error', code: 'bad_request', message: 'missing channel' });
      return;
    }
    io.to(channel).emit('message', { type: 'message', channel, data: req.data });
    if (typeof ack === 'function') ack({ type: 'published', channel });
  });
});

httpServer.listen(port, '127.0.0.1', () => console.log(`socketio listening on 127.0.0.1:${port}`));
process.on('SIGTERM', () => process.exit(0));
