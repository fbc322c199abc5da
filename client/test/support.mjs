// Test support: real relays started from the binary the Rust test harness
// names (RINGCAST_BIN), on loopback, and small HTTP and token helpers.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import net from 'node:net';
import { readFileSync } from 'node:fs';
import readline from 'node:readline';
import WebSocket from 'ws';

export { WebSocket };

const BIN = process.env.RINGCAST_BIN;
if (!BIN) {
  throw new Error('RINGCAST_BIN is not set: run these tests through `cargo test --test client`');
}

/** Patience for anything the relay does, as in the Rust tests. */
export const PATIENCE = 20_000;

/** Starts a relay with `args`; resolves once it printed its address. */
export function startRelay(args = [], listen = '127.0.0.1:0') {
  const proc = spawn(BIN, ['--listen', listen, '--log', 'warn', ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  return new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: proc.stdout });
    lines.once('line', (line) => {
      const addr = /addr=(\S+)/.exec(line)?.[1];
      if (!addr) return reject(new Error(`the relay printed no addr=: ${line}`));
      const port = Number(addr.split(':').pop());
      resolve({
        proc,
        exited,
        addr,
        port,
        url: `ws://${addr}/ws`,
        http: `http://${addr}`,
        stop(signal = 'SIGKILL') {
          if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
          return exited;
        },
      });
    });
    proc.once('error', reject);
    proc.once('exit', (code) => reject(new Error(`the relay exited (${code}) before it listened`)));
  });
}

/**
 * A free loopback port below the kernel's ephemeral range, for a relay
 * that is killed and started again on it: a port from the range could be
 * taken meanwhile as the source port of some outgoing connection (or of a
 * reconnecting client's connection to itself).
 */
export async function fixedPort() {
  const [low] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
  for (let i = 0; i < 100; i++) {
    const port = 10000 + Math.floor(Math.random() * Math.max(1, low - 10000));
    if (await isFree(port)) return port;
  }
  throw new Error('no free port below the ephemeral range');
}

function isFree(port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/** A loopback port nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Waits until `GET /readyz` answers 200. */
export async function ready(relay) {
  const deadline = Date.now() + PATIENCE;
  for (;;) {
    try {
      if ((await fetch(`${relay.http}/readyz`)).status === 200) return;
    } catch (_) {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`${relay.addr} is not ready`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** `POST /publish/{channel}` with a JSON body (and `?key=`). */
export async function publish(relay, channel, data, key, headers = {}) {
  const query = key ? `?key=${encodeURIComponent(key)}` : '';
  const r = await fetch(`${relay.http}/publish/${encodeURIComponent(channel)}${query}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...headers },
    body: JSON.stringify(data),
  });
  if (r.status !== 202) throw new Error(`publish answered ${r.status}: ${await r.text()}`);
  return r.json();
}

/** An HS256 JWT with `claims`. */
export function token(secret, claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  const signature = createHmac('sha256', secret).update(body).digest('base64url');
  return `${body}.${signature}`;
}

/** Resolves with the first event `client` emits of `type` that `pick` accepts. */
export function next(client, type, pick = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${type} event in time`));
    }, PATIENCE);
    const off = client.on(type, (event) => {
      if (!pick(event)) return;
      clearTimeout(timer);
      off();
      resolve(event);
    });
  });
}

/** Collects `client`'s messages on `channel` until `done(messages)`. */
export function collect(client, channel, done) {
  const messages = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`only ${messages.length} messages on ${channel} in time`));
    }, PATIENCE);
    const off = client.on('message', (event) => {
      if (event.channel !== channel) return;
      messages.push(event);
      if (done(messages)) {
        clearTimeout(timer);
        off();
        resolve(messages);
      }
    });
  });
}
