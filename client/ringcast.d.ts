// Types of ringcast.js, the browser client of the ringcast relay.

/** An event the relay sends (see docs/protocol.md). */
export interface MessageEvent {
  type: 'message';
  channel: string;
  /** Absent only for messages a backend put straight into Redis. */
  seq?: number;
  key?: string;
  data: unknown;
  /** On a conflating subscription: earlier messages of this key it replaced. */
  conflated?: number;
}

export interface SubscribedEvent {
  type: 'subscribed';
  channel: string;
  seq: number;
  epoch?: string;
  /** Present when the subscribe carried `since` (a resubscribe after a reconnect). */
  recovered?: boolean;
  id?: number | string;
  /** Sent by the client itself again after a reconnect. */
  resumed: boolean;
}

export interface PublishedEvent {
  type: 'published';
  channel: string;
  seq: number;
  id: number | string;
}

export interface UnsubscribedEvent {
  type: 'unsubscribed';
  channel: string;
  id?: number | string;
  reason?: string;
}

export type ConnectionState = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'closed';

export interface StateEvent {
  state: ConnectionState;
  /** Reconnect attempts so far. */
  attempt?: number;
  /** Milliseconds until the next attempt (while reconnecting). */
  delay?: number;
  /** The close code that ended the last connection. */
  code?: number;
  reason?: string;
  /** On `connected`: this connection replaced one that was lost. */
  resumed?: boolean;
}

/** A request that failed: `code` is the relay's error code (or `timeout`, `disconnected`, `decode`, `token`). */
export class RingcastError extends Error {
  code: string;
  event?: unknown;
}

export interface MsgpackCodec {
  encode(value: unknown): Uint8Array;
  decode(bytes: Uint8Array): unknown;
}

export interface ClientOptions {
  /** `json` (default) or `msgpack` (needs `msgpack`). */
  format?: 'json' | 'msgpack';
  msgpack?: MsgpackCodec;
  /** Called before each connection and before the token expires (`exp` less `refreshBeforeMs`). */
  getToken?: () => string | Promise<string>;
  /** A WebSocket constructor (defaults to the global one; in Node, e.g. the `ws` package). */
  WebSocket?: unknown;
  /** Full-jitter exponential backoff between reconnects: 500 ms doubling up to 20 s. */
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  /** After a drain (1012): a random delay below this, to the node the close names. */
  drainDelayMs?: number;
  refreshBeforeMs?: number;
  requestTimeoutMs?: number;
}

export interface SubscribeOptions {
  /** The latest message of every key first. */
  snapshot?: boolean;
  /** At most one message per key per this many ms (1 to 60000). */
  conflateMs?: number;
  /** Resume after this seq (the client tracks it by itself across reconnects). */
  since?: number;
  epoch?: string;
}

interface Events {
  message: MessageEvent;
  subscribed: SubscribedEvent;
  state: StateEvent;
  error: RingcastError;
}

export function backoffDelay(attempt: number, base: number, max: number, random?: () => number): number;

export class RingcastClient {
  constructor(url: string, options?: ClientOptions);
  readonly state: ConnectionState;
  /** Resolves once the connection is open (it keeps retrying until then). */
  connect(): Promise<void>;
  close(): void;
  on<K extends keyof Events>(type: K, listener: (event: Events[K]) => void): () => void;
  off<K extends keyof Events>(type: K, listener: (event: Events[K]) => void): void;
  subscribe(channel: string, options?: SubscribeOptions): Promise<SubscribedEvent>;
  unsubscribe(channel: string): Promise<UnsubscribedEvent>;
  publish(channel: string, data: unknown, options?: { key?: string }): Promise<PublishedEvent>;
  /** The last seq seen on `channel`. */
  lastSeq(channel: string): number | null;
}
