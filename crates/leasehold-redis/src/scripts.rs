//! The Lua scripts: each runs atomically on the server that owns the lock's hash slot.
//!
//! The record is JSON written with `string.format` (not `cjson.encode`, which prints large
//! integers in exponent notation): `{"v":1,"holder":..,"token":N,"lease_ms":N,"acquired_ms":N,
//! "renewed_ms":N,"transitions":N}`. The fencing counter lives in a hash next to the lock
//! (`<key>:meta`, same hash tag, same slot). When that hash does not exist (first use, or a
//! server restarted without persistence) the counter starts from the server's clock in
//! microseconds, so tokens keep increasing across such a restart as long as the server's clock
//! does not step back.

/// Builds a record. ARGV-independent helper prepended to scripts that write one.
const RECORD_FN: &str = r#"
local function record(holder, token, lease_ms, acquired_ms, renewed_ms, transitions)
  return string.format('{"v":1,"holder":%s,"token":%d,"lease_ms":%d,"acquired_ms":%d,"renewed_ms":%d,"transitions":%d}',
    cjson.encode(holder), token, lease_ms, acquired_ms, renewed_ms, transitions)
end
local function decode(raw)
  local ok, rec = pcall(cjson.decode, raw)
  if not ok or type(rec) ~= 'table' or type(rec.holder) ~= 'string' or type(rec.token) ~= 'number' then
    return nil
  end
  return rec
end
"#;

/// KEYS: lock, meta. ARGV: identity, lease_ms, wall_ms, channel.
/// Returns {status, raw record or false, pttl}: status is acquired, held or malformed.
const ACQUIRE_BODY: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local rec = decode(cur)
  if not rec then
    return {'malformed', cur, redis.call('PTTL', KEYS[1])}
  end
  if rec.holder ~= ARGV[1] then
    return {'held', cur, redis.call('PTTL', KEYS[1])}
  end
end
if redis.call('HEXISTS', KEYS[2], 'token') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[2], 'token', string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])))
end
local token = redis.call('HINCRBY', KEYS[2], 'token', 1)
local transitions = tonumber(redis.call('HGET', KEYS[2], 'transitions') or '0')
if redis.call('HGET', KEYS[2], 'holder') ~= ARGV[1] then
  transitions = redis.call('HINCRBY', KEYS[2], 'transitions', 1)
  redis.call('HSET', KEYS[2], 'holder', ARGV[1])
end
local lease = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local rec = record(ARGV[1], token, lease, now, now, transitions)
redis.call('SET', KEYS[1], rec, 'PX', lease)
redis.call('PUBLISH', ARGV[4], rec)
return {'acquired', rec, lease}
"#;

/// KEYS: lock. ARGV: identity, token, lease_ms, wall_ms, channel.
/// Returns {status, raw record or false, pttl}: status is renewed or lost.
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
redis.call('PUBLISH', ARGV[5], new)
return {'renewed', new, lease}
"#;

/// KEYS: lock. ARGV: identity, token, channel. Returns 1 when released, 0 when not held.
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
redis.call('PUBLISH', ARGV[3], '')
return 1
"#;

/// KEYS: lock. Returns {raw record or false, pttl}.
const READ_BODY: &str = r#"
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"#;

pub(crate) struct Scripts {
    pub acquire: redis::Script,
    pub renew: redis::Script,
    pub release: redis::Script,
    pub read: redis::Script,
}

impl Scripts {
    pub fn new() -> Self {
        let with_record = |body: &str| redis::Script::new(&format!("{RECORD_FN}{body}"));
        Self {
            acquire: with_record(ACQUIRE_BODY),
            renew: with_record(RENEW_BODY),
            release: with_record(RELEASE_BODY),
            read: redis::Script::new(READ_BODY),
        }
    }
}
