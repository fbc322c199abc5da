//! The Lua scripts ringcast runs in Redis and the keys they touch.
//!
//! Per ringcast channel `c`, with `N = prefix + c` (also its pub/sub
//! channel), five keys share N's hash slot so one script may touch them and
//! publish on N even on a Redis Cluster: `B:seq` (counter), `B:epoch`
//! (string), `B:hist` (a stream whose entry IDs are the seqs, so "what
//! came after seq s" is one `XRANGE` and a missing entry is visible),
//! `B:latest` (a hash: per key, `"" ` for keyless publications, the latest
//! publication as `<seq> <stored, Unix ms> <item>`) and `B:keys` (a sorted
//! set of the same keys scored by seq, to forget the least recently
//! updated past the limit).

use std::sync::OnceLock;

/// Sequences, stores and publishes the publications of one or more
/// channels in one atomic step. Batching happens in the arguments because
/// every script call is a socket flush in fred.
///
/// KEYS: per channel `seq`, `epoch`, `hist`, `latest`, `keys`.
/// ARGV: history size, history TTL ms, state TTL ms, epoch candidate,
/// publish command (`PUBLISH`/`SPUBLISH`), history bytes per channel, most
/// keys per channel (0: no latest values), then per channel: the pub/sub
/// channel, the item count n, n items.
/// Returns per channel: epoch, first seq.
///
/// Seq, epoch and history exist together or not at all: when the counter
/// restarts (new channel, or state lost), the epoch is replaced and the old
/// history deleted, so no client can take a new seq for an old one.
///
/// History is bounded in count (`MAXLEN`) and in bytes: each entry carries
/// `o`, the item bytes the channel's history has taken in up to and
/// including it, so the bytes from any entry to the newest are a
/// subtraction, and the oldest entries go while more than the limit is
/// held (all of them when the newest alone is larger). Entries written by
/// an earlier ringcast carry no `o`; the byte bound starts after them.
///
/// Latest values: each key's last item of the call is written once, and
/// the keys updated least recently are dropped past the limit. They expire
/// with the history.
pub const PUBLISH: &str = r#"
local hsize = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local state_ttl = tonumber(ARGV[3])
local cand = ARGV[4]
local cmd = ARGV[5]
local hbytes = tonumber(ARGV[6])
local maxkeys = tonumber(ARGV[7])
local function key_of(item)
  local klen = string.match(item, '^K(%d+)\n')
  if not klen then return '' end
  return string.sub(item, #klen + 3, #klen + 2 + tonumber(klen))
end
local function offset(f)
  if f[5] == 'o' then return tonumber(f[6]) end
end
local function trim_to_bytes(key, total)
  while true do
    local oldest = redis.call('XRANGE', key, '-', '+', 'COUNT', 16)
    if #oldest == 0 then return end
    for _, e in ipairs(oldest) do
      local o = offset(e[2])
      if not o then return end
      if total - o + #e[2][2] <= hbytes then
        redis.call('XTRIM', key, 'MINID', e[1])
        return
      end
    end
    local last = tonumber(string.match(oldest[#oldest][1], '^(%d+)'))
    redis.call('XTRIM', key, 'MINID', tostring(last + 1) .. '-0')
  end
end
local now = 0
if hsize > 0 or maxkeys > 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local out = {}
local a = 8
for c = 1, #KEYS / 5 do
  local kseq, kepoch, khist = KEYS[5 * c - 4], KEYS[5 * c - 3], KEYS[5 * c - 2]
  local klatest, kkeys = KEYS[5 * c - 1], KEYS[5 * c]
  local name = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  local last = redis.call('INCRBY', kseq, n)
  local epoch = redis.call('GET', kepoch)
  if last == n or not epoch then
    last = n
    epoch = cand .. c
    redis.call('SET', kseq, n)
    redis.call('SET', kepoch, epoch)
    redis.call('DEL', khist, klatest, kkeys)
  end
  local first = last - n + 1
  local parts = {'\0rc1\n', epoch, '\n', tostring(first), '\n'}
  local taken = 0
  if hsize > 0 then
    local newest = redis.call('XREVRANGE', khist, '+', '-', 'COUNT', 1)
    if newest[1] then
      taken = offset(newest[1][2]) or 0
    end
  end
  local last_of = {}
  for i = 0, n - 1 do
    local item = ARGV[a + i]
    if hsize > 0 then
      taken = taken + #item
      redis.call('XADD', khist, 'MAXLEN', hsize, tostring(first + i) .. '-0', 'd', item, 't', now, 'o', taken)
    end
    if maxkeys > 0 then
      last_of[key_of(item)] = i
    end
    parts[#parts + 1] = tostring(#item) .. '\n'
    parts[#parts + 1] = item
  end
  if maxkeys > 0 then
    for k, i in pairs(last_of) do
      redis.call('HSET', klatest, k, tostring(first + i) .. ' ' .. now .. ' ' .. ARGV[a + i])
      redis.call('ZADD', kkeys, first + i, k)
    end
    local extra = redis.call('ZCARD', kkeys) - maxkeys
    if extra > 0 then
      local gone = redis.call('ZPOPMIN', kkeys, extra)
      for j = 1, #gone, 2 do
        redis.call('HDEL', klatest, gone[j])
      end
    end
    redis.call('PEXPIRE', klatest, ttl)
    redis.call('PEXPIRE', kkeys, ttl)
  end
  a = a + n
  if hsize > 0 then
    trim_to_bytes(khist, taken)
    redis.call('PEXPIRE', khist, ttl)
  end
  redis.call('PEXPIRE', kseq, state_ttl)
  redis.call('PEXPIRE', kepoch, state_ttl)
  redis.call(cmd, name, table.concat(parts))
  out[#out + 1] = epoch
  out[#out + 1] = first
end
return out
"#;

/// Reads one channel's state in one consistent snapshot.
///
/// KEYS: `seq`, `epoch`, `hist`, `latest`. ARGV: after (-1: no entries
/// wanted), expected epoch ("" for none), history TTL ms, most entries,
/// `1` when the latest values are wanted.
/// Returns: epoch ("" when the channel has no state), seq, the number of
/// history entries n, then per entry after `after` (all of history when the
/// epoch is not the expected one): its seq, its item and its age in ms;
/// then, when asked, the same three per latest value. Anything older than
/// the TTL is left out.
pub const FETCH: &str = r#"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  return {'', 0, 0}
end
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {epoch, seq, 0}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local oldest = now - tonumber(ARGV[3])
local after = tonumber(ARGV[1])
if ARGV[2] ~= '' and ARGV[2] ~= epoch then
  after = 0
end
if after >= 0 and after < seq then
  local entries = redis.call('XRANGE', KEYS[3], tostring(after + 1) .. '-0', '+', 'COUNT', ARGV[4])
  for _, e in ipairs(entries) do
    local f = e[2]
    if tonumber(f[4]) >= oldest then
      out[#out + 1] = tonumber(string.match(e[1], '^(%d+)'))
      out[#out + 1] = f[2]
      out[#out + 1] = now - tonumber(f[4])
      out[3] = out[3] + 1
    end
  end
end
if ARGV[5] == '1' then
  local values = redis.call('HVALS', KEYS[4])
  for _, v in ipairs(values) do
    local s1 = string.find(v, ' ', 1, true)
    local s2 = s1 and string.find(v, ' ', s1 + 1, true)
    if s2 then
      local stored = tonumber(string.sub(v, s1 + 1, s2 - 1))
      if stored >= oldest then
        out[#out + 1] = tonumber(string.sub(v, 1, s1 - 1))
        out[#out + 1] = string.sub(v, s2 + 1)
        out[#out + 1] = now - stored
      end
    end
  end
end
return out
"#;

/// Records a revocation: KEYS[1] the sorted set of revocations (member
/// `sub:<v>` or `jti:<v>`, score: until, Unix seconds); ARGV: member,
/// until, now, the pub/sub channel other nodes hear it on. The set expires
/// with its longest revocation.
pub const REVOKE: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], 0, 0, 'REV', 'WITHSCORES')
redis.call('EXPIREAT', KEYS[1], last[2])
redis.call('PUBLISH', ARGV[4], ARGV[2] .. ' ' .. ARGV[1])
return 1
"#;

/// The revocations still in force at ARGV[1] (now): member, until, ...
pub const REVOCATIONS: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES')
"#;

/// The node directory, one hash (KEYS[1]): field, a node's id; value,
/// `<expires, Unix ms> <entry JSON>`. ARGV: this node's id, its entry
/// (empty: it announces nothing, only reads), the entry's lifetime in ms.
/// Expired entries are removed; the live ones are returned. Expiry is by
/// Redis's clock, so the nodes' clocks need not agree.
pub const NODES: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], (now + ttl) .. ' ' .. ARGV[2])
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
end
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  local v = all[i + 1]
  local space = string.find(v, ' ', 1, true)
  local expires = space and tonumber(string.sub(v, 1, space - 1))
  if expires == nil or expires <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    live[#live + 1] = string.sub(v, space + 1)
  end
end
return live
"#;

/// Names of one channel in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelKeys {
    /// The pub/sub channel, `prefix + channel`.
    pub pubsub: String,
    pub seq: String,
    pub epoch: String,
    pub hist: String,
    pub latest: String,
    pub keys: String,
    /// The Redis Cluster hash slot of all of the above.
    pub slot: u16,
}

impl ChannelKeys {
    pub fn new(prefix: &str, channel: &str) -> ChannelKeys {
        let pubsub = format!("{prefix}{channel}");
        let base = key_base(&pubsub);
        ChannelKeys {
            slot: fred::util::redis_keyslot(pubsub.as_bytes()),
            seq: format!("{base}:seq"),
            epoch: format!("{base}:epoch"),
            hist: format!("{base}:hist"),
            latest: format!("{base}:latest"),
            keys: format!("{base}:keys"),
            pubsub,
        }
    }
}

/// The hash tag Redis Cluster would use for `key`, if any.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')? + open + 1;
    (close > open + 1).then(|| &key[open + 1..close])
}

/// A key prefix whose slot is the slot of the pub/sub channel `n`.
fn key_base(n: &str) -> String {
    if hash_tag(n).is_some() {
        // The suffixes keep n's own tag, hence its slot.
        return n.to_string();
    }
    if !n.contains(['{', '}']) {
        return format!("{{{n}}}");
    }
    // Braces that form no tag: n hashes whole, so borrow a short tag of the
    // same slot.
    let slot = fred::util::redis_keyslot(n.as_bytes());
    format!("{{{}}}{n}", slot_tags()[slot as usize])
}

/// For each of the 16384 slots, a short string that hashes to it.
pub fn slot_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); 16384];
        let mut missing = tags.len();
        let mut i = 0u64;
        while missing > 0 {
            let tag = format!("t{i}");
            let slot = fred::util::redis_keyslot(tag.as_bytes()) as usize;
            if tags[slot].is_empty() {
                tags[slot] = tag;
                missing -= 1;
            }
            i += 1;
        }
        tags
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::util::redis_keyslot;

    #[test]
    fn every_key_shares_the_slot_of_the_pubsub_channel() {
        for channel in [
            "prices.AAPL",
            "a{b}c",
            "x}y{",
            "{}z",
            "}{",
            "é{",
            "{user1}.feed",
        ] {
            let k = ChannelKeys::new("ringcast:", channel);
            let slot = redis_keyslot(k.pubsub.as_bytes());
            assert_eq!(k.slot, slot);
            for key in [&k.seq, &k.epoch, &k.hist, &k.latest, &k.keys] {
                assert_eq!(redis_keyslot(key.as_bytes()), slot, "{channel}: {key}");
            }
        }
    }

    #[test]
    fn keys_are_readable() {
        let k = ChannelKeys::new("ringcast:", "prices.AAPL");
        assert_eq!(k.pubsub, "ringcast:prices.AAPL");
        assert_eq!(k.seq, "{ringcast:prices.AAPL}:seq");
        assert_eq!(hash_tag("a{b}c"), Some("b"));
        assert_eq!(hash_tag("a{}b}"), None);
    }
}
