// The browser client against real relays (started by each test), under
// Node's test runner with the `ws` package as the WebSocket.

import { test } from 'node:test';
import { spawn } from 'node:child_process';
import assert from 'node:assert/strict';
import { encode, decode } from '@msgpack/msgpack';

import { RingcastClient, RingcastError, backoffDelay } from '../ringcast.js';
import { WebSocket, startRelay, ready, publish, token, next, collect, freePort, fixedPort } from './support.mjs';

const REDIS_URL = process.env.REDIS_URL;
const quick = { WebSocket, backoffBaseMs: 50, backoffMaxMs: 400, drainDelayMs: 100 };

test('backoff is full jitter, doubling up to its cap', () => {
  assert.equal(backoffDelay(0, 500, 20000, () => 0.999), 499);
  assert.equal(backoffDelay(3, 500, 20000, () => 0.5), 2000);
  assert.equal(backoffDelay(10, 500, 20000, () => 0.999), 19980);
  assert.equal(backoffDelay(5, 500, 20000, () => 0), 0);
});

test('subscribe with a snapshot, keyed messages in batches, publish and errors as promises', async (t) => {
  const relay = await startRelay(['--workers', '2', '--allow-client-publish', 'true', '--max-publish-rate', '0']);
  t.after(() => relay.stop());
  for (const [key, bid] of [['AAPL', 1], ['MSFT', 2], ['AAPL', 3]]) {
    await publish(relay, 'prices', { bid }, key);
  }
  const client = new RingcastClient(relay.url, quick);
  t.after(() => client.close());
  const snapshot = collect(client, 'prices', (m) => m.length === 2);
  await client.connect();
  const subscribed = await client.subscribe('prices', { snapshot: true });
  assert.equal(subscribed.seq, 3);
  assert.deepEqual((await snapshot).map((m) => [m.seq, m.key, m.data.bid]), [[2, 'MSFT', 2], [3, 'AAPL', 3]]);

  // Fifty at once come in batch frames; every one arrives, in order.
  const live = collect(client, 'prices', (m) => m.length === 50);
  await Promise.all(Array.from({ length: 50 }, (_, i) => client.publish('prices', i, { key: `K${i % 5}` })));
  const got = await live;
  assert.deepEqual(got.map((m) => m.seq), Array.from({ length: 50 }, (_, i) => 4 + i));
  assert.equal(got[7].key, 'K2');
  assert.equal(client.lastSeq('prices'), 53);

  const published = await client.publish('prices', 'x', { key: 'AAPL' });
  assert.equal(published.seq, 54);
  await assert.rejects(client.subscribe('bad channel'), (e) => e instanceof RingcastError && e.code === 'bad_channel');
  await assert.rejects(client.publish('prices', 1, { key: '' }), (e) => e.code === 'bad_request');
});

test('MessagePack with a codec passed in', async (t) => {
  const relay = await startRelay(['--allow-client-publish', 'true']);
  t.after(() => relay.stop());
  const client = new RingcastClient(relay.url, { ...quick, format: 'msgpack', msgpack: { encode, decode } });
  t.after(() => client.close());
  await client.connect();
  await client.subscribe('bin');
  const arrived = next(client, 'message');
  await client.publish('bin', { n: 1, bytes: new Uint8Array([1, 2]) }, { key: 'k' });
  const message = await arrived;
  assert.equal(message.key, 'k');
  assert.equal(message.data.n, 1);
  assert.deepEqual([...message.data.bytes], [1, 2]);
});

test('conflateMs: a burst arrives merged, with conflated counts, and the last value of each key', async (t) => {
  const relay = await startRelay(['--allow-client-publish', 'true', '--max-publish-rate', '0']);
  t.after(() => relay.stop());
  const publisher = new RingcastClient(relay.url, quick);
  const client = new RingcastClient(relay.url, quick);
  t.after(() => { publisher.close(); client.close(); });
  await Promise.all([publisher.connect(), client.connect()]);
  await client.subscribe('burst', { conflateMs: 100 });
  let total = 0;
  const counted = collect(client, 'burst', (m) => {
    total = m.reduce((n, e) => n + 1 + (e.conflated || 0), 0);
    return total === 400;
  });
  await Promise.all(Array.from({ length: 400 }, (_, i) => publisher.publish('burst', i, { key: `k${i % 4}` })));
  const got = await counted;
  assert.ok(got.length < 400, `${got.length} messages for 400: merged`);
  assert.ok(got.some((m) => m.conflated > 0));
  assert.deepEqual(got.slice(-4).map((m) => m.data).sort((a, b) => a - b), [396, 397, 398, 399]);
});

test('a relay restart: the client reconnects by itself and hears recovered: false', async (t) => {
  const port = await fixedPort();
  let relay = await startRelay([], `127.0.0.1:${port}`);
  const client = new RingcastClient(relay.url, quick);
  t.after(() => { client.close(); relay.stop(); });
  await client.connect();
  await client.subscribe('feed');
  const first = collect(client, 'feed', (m) => m.length === 3);
  for (let i = 1; i <= 3; i++) await publish(relay, 'feed', i);
  await first;
  const states = [];
  client.on('state', (s) => states.push(s.state));
  const resubscribed = next(client, 'subscribed', (e) => e.resumed);
  await relay.stop('SIGKILL');
  // Right after the kill the relay may refuse the address for a moment
  // ("in use by another process": seen in CI, not understood yet; see the
  // issue note): start it again until it takes the port.
  for (let attempt = 0; ; attempt++) {
    try {
      relay = await startRelay([], `127.0.0.1:${port}`);
      break;
    } catch (e) {
      assert.ok(attempt < 100, `the relay never took its port back: ${e}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  const event = await resubscribed;
  assert.equal(event.recovered, false, 'a new process: another epoch');
  assert.ok(states.includes('reconnecting') && states.includes('connected'), states.join());
  const after = next(client, 'message');
  await publish(relay, 'feed', 'again');
  assert.equal((await after).seq, 1);
});

test('a drain (1012) sends the client to the node it names, where it recovers what it missed', async (t) => {
  assert.ok(REDIS_URL, 'REDIS_URL is not set: run these tests through `cargo test --test client`');
  const redis = ['--redis', REDIS_URL, '--drain-seconds', '1'];
  const port = await freePort();
  const bUrl = `ws://127.0.0.1:${port}/ws`;
  const b = await startRelay([...redis, '--advertise-url', bUrl], `127.0.0.1:${port}`);
  const a = await startRelay(redis);
  t.after(() => { a.stop(); b.stop(); });
  await Promise.all([ready(a), ready(b)]);
  // Wait until A's directory lists B.
  for (let i = 0; ; i++) {
    const nodes = await (await fetch(`${a.http}/nodes`)).json();
    if (JSON.stringify(nodes).includes(bUrl)) break;
    assert.ok(i < 400, `A never listed B: ${JSON.stringify(nodes)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const client = new RingcastClient(a.url, quick);
  t.after(() => client.close());
  await client.connect();
  await client.subscribe('orders');
  const all = collect(client, 'orders', (m) => m.some((e) => e.seq === 4));
  const before = collect(client, 'orders', (m) => m.length === 2);
  await publish(b, 'orders', 1);
  await publish(b, 'orders', 2);
  await before;
  const closed = next(client, 'state', (s) => s.state === 'reconnecting' && s.code === 1012);
  const resubscribed = next(client, 'subscribed', (e) => e.resumed);
  a.proc.kill('SIGTERM');
  await closed;
  // Published while the client moves: it gets it by `since`.
  await publish(b, 'orders', 3);
  const event = await resubscribed;
  assert.equal(client.ws.url.split('?')[0], bUrl, 'reconnected where the 1012 said');
  assert.equal(event.recovered, true);
  await publish(b, 'orders', 4);
  const seqs = (await all).map((m) => m.seq);
  assert.deepEqual(seqs, [1, 2, 3, 4], 'no gap, no duplicate');
});

test('tokens: refreshed before exp through getToken; a revoked client never reconnects', async (t) => {
  const secret = 'a secret of at least thirty-two bytes, for tests';
  const relay = await startRelay(['--jwt-secret', secret, '--publish-key', 'operator']);
  t.after(() => relay.stop());
  let issued = 0;
  const getToken = () => {
    issued += 1;
    return token(secret, { sub: 'eve', jti: `t${issued}`, exp: Math.floor(Date.now() / 1000) + 40 });
  };
  // Refresh 39 s before a 40 s expiry: about a second after connecting.
  const client = new RingcastClient(relay.url, { ...quick, getToken, refreshBeforeMs: 39_000 });
  t.after(() => client.close());
  const errors = [];
  client.on('error', (e) => errors.push(e));
  await client.connect();
  await client.subscribe('mine');
  const deadline = Date.now() + 20_000;
  while (issued < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  assert.ok(issued >= 2, 'getToken called again before exp');
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(errors, [], 'the refresh was accepted');

  const closed = next(client, 'state', (s) => s.state === 'closed');
  const r = await fetch(`${relay.http}/revoke`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: 'Bearer operator' },
    body: JSON.stringify({ sub: 'eve' }),
  });
  assert.equal(r.status, 202);
  assert.equal((await closed).code, 4003);
  const calls = issued;
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(client.state, 'closed');
  assert.equal(issued, calls, 'no reconnect after 4003');
});

test('a subscribe answered unavailable (Redis gone) is asked again until Redis is back', async (t) => {
  const port = await freePort();
  const startRedis = () => spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  let redis = startRedis();
  t.after(() => redis.kill('SIGKILL'));
  const relay = await startRelay(['--redis', `redis://127.0.0.1:${port}/0`]);
  t.after(() => relay.stop());
  await ready(relay);
  const client = new RingcastClient(relay.url, quick);
  t.after(() => client.close());
  await client.connect();
  redis.kill('SIGKILL');
  // The relay notices within its probe interval: it answers unavailable.
  for (let i = 0; (await fetch(`${relay.http}/readyz`)).status === 200; i++) {
    assert.ok(i < 400, 'the relay never noticed Redis was gone');
    await new Promise((r) => setTimeout(r, 50));
  }
  const subscribed = client.subscribe('later');
  await new Promise((r) => setTimeout(r, 300));
  redis = startRedis();
  const event = await subscribed;
  assert.equal(event.channel, 'later');
  const arrived = next(client, 'message');
  await publish(relay, 'later', 'hello');
  assert.equal((await arrived).data, 'hello');
});
