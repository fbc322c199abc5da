// ringcast browser client: one WebSocket to a ringcast relay, with
// subscriptions that survive reconnects (resubscribed with `since`),
// batch frames unwrapped, request promises matched by id, token refresh
// before expiry, and reconnects with full-jitter exponential backoff.
// No dependencies; MessagePack needs a codec passed in (`msgpack`).
// The protocol: docs/protocol.md in the ringcast repository.

const JSON_PROTOCOL = 'ringcast.v1.json';
const MSGPACK_PROTOCOL = 'ringcast.v1.msgpack';
// Close codes the relay uses.
const DRAINING = 1012;
const FULL = 1013;
const TOKEN_EXPIRED = 4001;
const REVOKED = 4003;

/** A failed request: `code` is the relay's error code. */
export class RingcastError extends Error {
  constructor(code, message, event) {
    super(message);
    this.name = 'RingcastError';
    this.code = code;
    this.event = event;
  }
}

/** The payload of a JWT, or null when it cannot be read. */
function jwtPayload(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4)));
  } catch (_) {
    return null;
  }
}

/** Full jitter: a random delay in [0, min(max, base * 2^attempt)). */
export function backoffDelay(attempt, base, max, random = Math.random) {
  return Math.floor(random() * Math.min(max, base * 2 ** attempt));
}

export class RingcastClient {
  /**
   * @param {string} url ws:// or wss:// URL of the relay's /ws.
   * @param {object} [options] see ringcast.d.ts.
   */
  constructor(url, options = {}) {
    this.url = url;
    this.options = {
      format: 'json',
      backoffBaseMs: 500,
      backoffMaxMs: 20000,
      drainDelayMs: 1000,
      refreshBeforeMs: 30000,
      requestTimeoutMs: 10000,
      ...options,
    };
    if (this.options.format === 'msgpack' && !this.options.msgpack) {
      throw new Error('format "msgpack" needs options.msgpack: {encode, decode}');
    }
    this.WebSocket = this.options.WebSocket || globalThis.WebSocket;
    this.state = 'idle';
    this.ws = null;
    this.attempt = 0;
    this.nextId = 1;
    this.pending = new Map();
    // channel -> {options, seq, epoch, active}
    this.channels = new Map();
    this.listeners = new Map();
    this.reconnectTimer = null;
    this.refreshTimer = null;
    this.redirect = null;
    this.token = null;
    this.stopped = false;
    this.hadConnection = false;
  }

  /** Listens to `message`, `subscribed`, `state` or `error`. */
  on(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this.listeners.get(type)?.delete(listener);
  }

  emit(type, event) {
    for (const listener of this.listeners.get(type) || []) {
      try {
        listener(event);
      } catch (e) {
        setTimeout(() => { throw e; });
      }
    }
  }

  setState(state, detail = {}) {
    this.state = state;
    this.emit('state', { state, ...detail });
  }

  /**
   * Opens the connection (and keeps it open until `close`); resolves once
   * it is open, however many attempts that takes.
   */
  connect() {
    if (this.state === 'connected') return Promise.resolve();
    this.stopped = false;
    const opened = new Promise((resolve) => {
      const off = this.on('state', (s) => {
        if (s.state === 'connected') {
          off();
          resolve();
        }
      });
    });
    this.open();
    return opened;
  }

  async open() {
    if (this.stopped) return;
    if (this.ws) {
      // A connect while one is open or opening: that one goes.
      const old = this.ws;
      this.ws = null;
      old.close(1000);
    }
    this.setState(this.hadConnection ? 'reconnecting' : 'connecting', { attempt: this.attempt });
    let url = this.redirect || this.url;
    this.redirect = null;
    if (this.options.getToken) {
      try {
        this.token = await this.options.getToken();
      } catch (e) {
        this.emit('error', new RingcastError('token', `getToken failed: ${e}`));
        return this.scheduleReconnect();
      }
      url += (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(this.token);
      if (this.stopped) return;
    }
    const protocol = this.options.format === 'msgpack' ? MSGPACK_PROTOCOL : JSON_PROTOCOL;
    const ws = new this.WebSocket(url, protocol);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    ws.onopen = () => this.onOpen(ws);
    ws.onmessage = (e) => {
      if (ws === this.ws) this.onFrame(e.data);
    };
    ws.onclose = (e) => this.onClose(ws, e.code, e.reason);
    ws.onerror = () => {};
  }

  onOpen(ws) {
    if (ws !== this.ws) return;
    // Backoff starts over once the server is heard from (onFrame), not
    // at open: a server that closes at once is retried ever more slowly.
    const resumed = !!this.hadConnection;
    this.hadConnection = true;
    this.setState('connected', { resumed });
    this.scheduleRefresh();
    for (const [channel, sub] of this.channels) {
      clearTimeout(sub.retryTimer);
      sub.inFlight = false;
      sub.resend = false;
      this.sendSubscribe(channel, sub, resumed);
    }
  }

  send(request) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(this.options.format === 'msgpack'
      ? this.options.msgpack.encode(request)
      : JSON.stringify(request));
    return true;
  }

  /** Sends `request` with a fresh id; resolves with its reply event. */
  request(request) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new RingcastError('timeout', `no answer to ${request.action} in time`));
      }, this.options.requestTimeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      if (!this.send({ ...request, id })) {
        clearTimeout(timer);
        this.pending.delete(id);
        reject(new RingcastError('disconnected', 'not connected'));
      }
    });
  }

  /**
   * Subscribes to `channel` (again with new options, when subscribed):
   * resolves with the `subscribed` event. Kept across reconnects.
   */
  subscribe(channel, options = {}) {
    let sub = this.channels.get(channel);
    if (!sub) {
      sub = { seq: null, epoch: null, waiters: [], inFlight: false, resend: false, retryTimer: null };
      this.channels.set(channel, sub);
    }
    sub.options = options;
    if (options.since != null) {
      sub.seq = options.since;
      sub.epoch = options.epoch ?? null;
    }
    return new Promise((resolve, reject) => {
      sub.waiters.push({ resolve, reject });
      if (this.state === 'connected') this.sendSubscribe(channel, sub, false);
    });
  }

  sendSubscribe(channel, sub, resumed) {
    // One subscribe per channel at a time: new options wait for the answer.
    if (sub.inFlight) {
      sub.resend = true;
      return;
    }
    clearTimeout(sub.retryTimer);
    sub.inFlight = true;
    const request = { action: 'subscribe', channel };
    if (sub.options.snapshot) request.snapshot = true;
    if (sub.options.conflateMs) request.conflate_ms = sub.options.conflateMs;
    if (sub.seq != null) {
      request.since = sub.seq;
      if (sub.epoch) request.epoch = sub.epoch;
    }
    this.request(request).then((event) => {
      sub.inFlight = false;
      if (this.channels.get(channel) !== sub) return;
      // Everything up to its seq came before it (a replay, a snapshot) or
      // is not this subscription's; after `recovered: false` it may be
      // another epoch's, lower.
      sub.seq = event.seq;
      sub.epoch = event.epoch ?? null;
      this.emit('subscribed', { ...event, resumed });
      if (sub.resend) {
        sub.resend = false;
        return this.sendSubscribe(channel, sub, resumed);
      }
      for (const w of sub.waiters.splice(0)) w.resolve(event);
    }, (error) => {
      sub.inFlight = false;
      if (error.code === 'disconnected' || this.channels.get(channel) !== sub) return;
      if (error.code === 'unavailable' || error.code === 'rate_limited' || error.code === 'timeout') {
        // The backplane is down or the relay busy: ask again later.
        const delay = backoffDelay(Math.min(sub.retries = (sub.retries || 0) + 1, 6), this.options.backoffBaseMs, this.options.backoffMaxMs);
        sub.retryTimer = setTimeout(() => {
          if (this.channels.get(channel) === sub && this.state === 'connected') this.sendSubscribe(channel, sub, resumed);
        }, delay);
        return;
      }
      this.channels.delete(channel);
      for (const w of sub.waiters.splice(0)) w.reject(error);
      this.emit('error', error);
    });
  }

  /** Unsubscribes from `channel`; resolves with the `unsubscribed` event. */
  unsubscribe(channel) {
    const sub = this.channels.get(channel);
    this.channels.delete(channel);
    clearTimeout(sub?.retryTimer);
    for (const w of sub?.waiters.splice(0) || []) {
      w.reject(new RingcastError('unsubscribed', `unsubscribed from ${channel} before it was answered`));
    }
    return this.request({ action: 'unsubscribe', channel });
  }

  /** Publishes `data` to `channel` (with `key`): resolves with `published`. */
  publish(channel, data, options = {}) {
    const request = { action: 'publish', channel, data };
    if (options.key != null) request.key = options.key;
    return this.request(request);
  }

  /** The last seq seen on `channel` (what a reconnect resumes from). */
  lastSeq(channel) {
    return this.channels.get(channel)?.seq ?? null;
  }

  decode(data) {
    if (this.options.format === 'msgpack') {
      return this.options.msgpack.decode(new Uint8Array(data));
    }
    return JSON.parse(data);
  }

  onFrame(data) {
    this.attempt = 0;
    let decoded;
    try {
      decoded = this.decode(data);
    } catch (e) {
      this.emit('error', new RingcastError('decode', `an unreadable frame: ${e}`));
      return;
    }
    for (const event of Array.isArray(decoded) ? decoded : [decoded]) {
      this.onEvent(event);
    }
  }

  onEvent(event) {
    if (event.type === 'message') {
      const sub = this.channels.get(event.channel);
      if (sub && typeof event.seq === 'number' && (sub.seq == null || event.seq > sub.seq)) {
        sub.seq = event.seq;
      }
      this.emit('message', event);
      return;
    }
    const waiter = event.id != null ? this.pending.get(event.id) : undefined;
    if (waiter) {
      this.pending.delete(event.id);
      clearTimeout(waiter.timer);
      if (event.type === 'error') {
        waiter.reject(new RingcastError(event.code, event.message, event));
      } else {
        waiter.resolve(event);
      }
      return;
    }
    if (event.type === 'error') {
      this.emit('error', new RingcastError(event.code, event.message, event));
    } else if (event.type === 'unsubscribed' && event.reason) {
      this.channels.delete(event.channel);
      this.emit('error', new RingcastError(event.reason, `unsubscribed from ${event.channel}`, event));
    }
  }

  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    const exp = this.token && jwtPayload(this.token)?.exp;
    if (!exp || !this.options.getToken) return;
    const wait = Math.max(1000, exp * 1000 - Date.now() - this.options.refreshBeforeMs);
    this.refreshTimer = setTimeout(async () => {
      try {
        const token = await this.options.getToken();
        await this.request({ action: 'refresh', token });
        this.token = token;
        this.scheduleRefresh();
      } catch (e) {
        this.emit('error', e instanceof RingcastError ? e : new RingcastError('token', String(e)));
      }
    }, wait);
  }

  onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    clearTimeout(this.refreshTimer);
    for (const [id, waiter] of this.pending) {
      clearTimeout(waiter.timer);
      waiter.reject(new RingcastError('disconnected', `closed (${code})`));
      this.pending.delete(id);
    }
    if (this.stopped) {
      this.setState('closed', { code, reason });
      return;
    }
    if (code === REVOKED) {
      this.stopped = true;
      this.setState('closed', { code, reason });
      return;
    }
    if (code === DRAINING) {
      // A draining node names another: go there, soon, spread out.
      const named = /^reconnect to (wss?:\/\/\S+)$/.exec(reason || '');
      if (named) this.redirect = named[1];
      return this.scheduleReconnect(backoffDelay(0, this.options.drainDelayMs, this.options.drainDelayMs), code);
    }
    return this.scheduleReconnect(undefined, code);
  }

  scheduleReconnect(delay, code) {
    if (this.stopped) return;
    const attempt = this.attempt++;
    if (delay === undefined) {
      const base = code === FULL || code === TOKEN_EXPIRED ? this.options.backoffBaseMs * 2 : this.options.backoffBaseMs;
      delay = backoffDelay(attempt, base, this.options.backoffMaxMs);
    }
    this.setState('reconnecting', { attempt: this.attempt, delay, code });
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => this.open(), delay);
  }

  /** Closes the connection for good. */
  close() {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    if (this.ws) this.ws.close(1000);
    else this.setState('closed', {});
  }
}
