//! The Lua scripts: each runs atomically on the server that owns the lock's hash slot.
//!
//! The record is JSON written with `string.format` (not `cjson.encode`, which prints large
//! integers in exponent notation): `{"v":1,"holder":..,"token":N,"lease_ms":N,"acquired_ms":N,
//! "renewed_ms":N,"transitions":N}`. Next to the lock lives its meta hash (`<key>:meta`, same
//! hash tag, same slot): the fencing counter `token`, `transitions`, the last `holder`, and what
//! lets an acquire judge whether an earlier lease may still run: `lease_until` (server time in
//! µs until which the last granted or renewed lease runs; 0 after a release), `lease_ms` and
//! `run_id` (the server that wrote them).
//!
//! Rules (all times are the server's `TIME`, in µs):
//! - **Tokens** are `max(counter + 1, now)` on every acquire, so they exceed every token granted
//!   before even when the server reloaded an old counter (RDB snapshot, AOF that lost its tail,
//!   promoted replica) or none at all — as long as the server's clock does not step back.
//! - **Nothing is granted while an earlier lease may run.** With the meta written by this very
//!   server (same `run_id`), an acquire by anyone but the last holder waits for `lease_until`,
//!   even when the lock key vanished (deleted, evicted). When the meta is missing or was written
//!   by another server (a restart, a reload, a failover), nothing tells when the last lease
//!   ends, so the acquire waits until one lease (the longer of the candidate's and the last
//!   recorded one) has passed since this server's life began for leasehold: the `since` of the
//!   server-wide key `<prefix>server` (hash `run_id`, `since`; written on the first such acquire
//!   after a restart) — or, on Redis Cluster, where a script cannot reach a key outside its slot,
//!   the server's start (`uptime_in_seconds`).

/// Builds a record. ARGV-independent helper prepended to scripts that write one.
const RECORD_FN: &str = r#"
local function record(holder, token, lease_ms, acquired_ms, renewed_ms, transitions)
  return string.format('{"v":1,"holder":%s,"token":%d,"lease_ms":%d,"acquired_ms":%d,"renewed_ms":%d,"transitions":%d}',
    cjson.encode(holder), token, lease_ms, acquired_ms, renewed_ms, transitions)
end
local function server()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local info = redis.call('INFO', 'server')
  local run_id = string.match(info, 'run_id:(%x+)') or ''
  local uptime = tonumber(string.match(info, 'uptime_in_seconds:(%d+)') or '0')
  return now, run_id, uptime
end
local function us(n)
  return string.format('%d', n)
end
local function decode(raw)
  local ok, rec = pcall(cjson.decode, raw)
  if not ok or type(rec) ~= 'table' or type(rec.holder) ~= 'string' or type(rec.token) ~= 'number' then
    return nil
  end
  return rec
end
"#;

/// KEYS: lock, meta[, server]. ARGV: identity, lease_ms, wall_ms, channel.
/// Returns {status, raw record or false, pttl or wait in ms, reason}: status is acquired, held,
/// malformed or refused (reason restart or lease; the record is the last holder's, from the
/// meta, when known).
const ACQUIRE_BODY: &str = r#"
local now, run_id, uptime = server()
local lease = tonumber(ARGV[2])
local cur = redis.call('GET', KEYS[1])
local rec = nil
if cur then
  rec = decode(cur)
  if not rec then
    return {'malformed', cur, redis.call('PTTL', KEYS[1]), ''}
  end
end
local meta = redis.call('HMGET', KEYS[2], 'token', 'transitions', 'holder', 'lease_until', 'lease_ms', 'run_id')
local counter = tonumber(meta[1] or '0')
local busy_until = 0
local reason = 'lease'
if meta[6] == run_id then
  if meta[3] ~= ARGV[1] then
    busy_until = tonumber(meta[4] or '0')
  end
else
  local since
  if KEYS[3] then
    local known = redis.call('HMGET', KEYS[3], 'run_id', 'since')
    if known[1] == run_id then
      since = tonumber(known[2] or '0')
    else
      since = now
      redis.call('HSET', KEYS[3], 'run_id', run_id, 'since', us(now))
    end
  else
    since = now - uptime * 1000000
  end
  local hold = math.max(lease, tonumber(meta[5] or '0'))
  busy_until = since + hold * 1000
  reason = 'restart'
end
local wait = math.ceil((busy_until - now) / 1000)
-- A transfer's reservation (empty holder, preferred set) is held for all but its target.
if rec and rec.holder ~= ARGV[1] and not (rec.holder == '' and rec.preferred == ARGV[1]) then
  local pttl = redis.call('PTTL', KEYS[1])
  if wait > pttl then
    pttl = wait
  end
  return {'held', cur, pttl, ''}
end
if wait > 0 then
  local last = false
  if meta[3] and meta[1] then
    last = record(meta[3], counter, tonumber(meta[5] or ARGV[2]), 0, 0, tonumber(meta[2] or '0'))
  end
  return {'refused', last, wait, reason}
end
local token = counter + 1
if now > token then
  token = now
end
local transitions = tonumber(meta[2] or '0')
if meta[3] ~= ARGV[1] then
  transitions = transitions + 1
end
redis.call('HSET', KEYS[2], 'token', us(token), 'transitions', us(transitions), 'holder', ARGV[1],
  'lease_until', us(now + lease * 1000), 'lease_ms', us(lease), 'run_id', run_id)
local wall = tonumber(ARGV[3])
local new = record(ARGV[1], token, lease, wall, wall, transitions)
redis.call('SET', KEYS[1], new, 'PX', lease)
redis.call('PUBLISH', ARGV[4], new)
return {'acquired', new, lease, ''}
"#;

/// KEYS: lock, meta. ARGV: identity, token, lease_ms, wall_ms, channel.
/// Returns {status, raw record or false, pttl}: status is renewed or lost. A renew of the term
/// the lock holds also records, in the meta, until when the lease now runs: the term is the
/// latest one, so no earlier lease can outlive it, even after a restart.
const RENEW_BODY: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then
  return {'lost', false, -2}
end
local rec = decode(cur)
if not rec or rec.holder ~= ARGV[1] or string.format('%d', rec.token) ~= ARGV[2] then
  return {'lost', cur, redis.call('PTTL', KEYS[1])}
end
local lease = tonumber(ARGV[3])
local new = record(rec.holder, rec.token, lease, rec.acquired_ms or 0, tonumber(ARGV[4]), rec.transitions or 0)
redis.call('SET', KEYS[1], new, 'PX', lease)
local now, run_id = server()
redis.call('HSET', KEYS[2], 'holder', rec.holder, 'lease_until', us(now + lease * 1000),
  'lease_ms', us(lease), 'run_id', run_id)
redis.call('PUBLISH', ARGV[5], new)
return {'renewed', new, lease}
"#;

/// KEYS: lock, meta. ARGV: identity, token, channel. Returns 1 when released, 0 when not held.
/// The released term was the latest one: the meta then says no lease runs.
const RELEASE_BODY: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then
  return 0
end
local rec = decode(cur)
if not rec or rec.holder ~= ARGV[1] or string.format('%d', rec.token) ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[1])
local _, run_id = server()
redis.call('HSET', KEYS[2], 'lease_until', '0', 'run_id', run_id)
redis.call('PUBLISH', ARGV[3], '')
return 1
"#;

/// KEYS: lock, meta. ARGV: identity, token, lease_ms, wall_ms, channel, target.
/// Returns 1 when handed over, 0 when not held. Like a release, but the key is replaced by a
/// reservation for the target: an empty holder, `preferred` naming it, the old term's token, a
/// TTL of one lease; the meta says no lease runs (the reservation itself keeps others out).
const TRANSFER_BODY: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then
  return 0
end
local rec = decode(cur)
if not rec or rec.holder ~= ARGV[1] or string.format('%d', rec.token) ~= ARGV[2] then
  return 0
end
local lease = tonumber(ARGV[3])
local new = string.format('{"v":1,"holder":"","token":%d,"lease_ms":%d,"acquired_ms":0,"renewed_ms":%d,"transitions":%d,"preferred":%s}',
  rec.token, lease, tonumber(ARGV[4]), rec.transitions or 0, cjson.encode(ARGV[6]))
redis.call('SET', KEYS[1], new, 'PX', lease)
local _, run_id = server()
redis.call('HSET', KEYS[2], 'lease_until', '0', 'run_id', run_id)
redis.call('PUBLISH', ARGV[5], new)
return 1
"#;

/// KEYS: lock. ARGV: target, channel. Returns {raw record or false, pttl}: the record with
/// `preferred` set when it names a holder (the holder's next renew writes it without), as it
/// was otherwise. The TTL is kept.
const REQUEST_TRANSFER_BODY: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then
  return {false, -2}
end
local rec = decode(cur)
local pttl = redis.call('PTTL', KEYS[1])
if not rec or rec.holder == '' or pttl <= 0 then
  return {cur, pttl}
end
local new = string.format('{"v":1,"holder":%s,"token":%d,"lease_ms":%d,"acquired_ms":%d,"renewed_ms":%d,"transitions":%d,"preferred":%s}',
  cjson.encode(rec.holder), rec.token, rec.lease_ms or 0, rec.acquired_ms or 0, rec.renewed_ms or 0,
  rec.transitions or 0, cjson.encode(ARGV[1]))
redis.call('SET', KEYS[1], new, 'PX', pttl)
redis.call('PUBLISH', ARGV[2], new)
return {new, pttl}
"#;

/// KEYS: lock. Returns {raw record or false, pttl}.
const READ_BODY: &str = r#"
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"#;

pub(crate) struct Scripts {
    pub acquire: redis::Script,
    pub renew: redis::Script,
    pub release: redis::Script,
    pub transfer: redis::Script,
    pub request_transfer: redis::Script,
    pub read: redis::Script,
}

impl Scripts {
    pub fn new() -> Self {
        let with_record = |body: &str| redis::Script::new(&format!("{RECORD_FN}{body}"));
        Self {
            acquire: with_record(ACQUIRE_BODY),
            renew: with_record(RENEW_BODY),
            release: with_record(RELEASE_BODY),
            transfer: with_record(TRANSFER_BODY),
            request_transfer: with_record(REQUEST_TRANSFER_BODY),
            read: redis::Script::new(READ_BODY),
        }
    }
}
