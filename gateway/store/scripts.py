"""The Lua scripts the Redis store (gateway.store.redis) runs, each atomic on the server, and the
hash fields they share with it. What each takes (KEYS, ARGV) and returns is said above it."""

from __future__ import annotations

import hashlib

from gateway.store.base import PURPOSES

LAST_SEEN = "@last_seen"
CONSENT_PREFIX = "@consent:"
CONSENT_FIELDS = tuple(CONSENT_PREFIX + purpose for purpose in PURPOSES)

# Whether the consent held in hash field ARGV[field] (a JSON Consent, or absent) permits: absent
# means the model's default (ARGV[default], "1" or "0"); else only an unexpired grant does.
PERMITS = """
local function permits(raw, default, now)
  if not raw then return default == '1' end
  local choice = cjson.decode(raw)
  return choice.state == 'granted' and (choice.expires_at == nil or choice.expires_at > now)
end
"""

# One visitor's batch, atomically. KEYS: recent list, counters hash, event-id sorted set, log stream.
# ARGV: now, keep, ttl_ms, ids to remember, max counter fields, log length (0: no log), channel,
# visitor, the consent field the events need ("" for none), whether no choice permits ("1"/"0"),
# the oldest log entry id to keep ("" for any), the number of windows and each window's seconds,
# the number of events, then per event:
# id ("" for none), packed interaction ("" for none), ts, log line, the number of counter names and
# the names (the first is the event type's total, the others per item or category). Counter fields
# are "name|window" -> "bucket:current:previous" (gateway.store.base.sliding_count); returns a flag
# per event, 1 stored, 0 a duplicate id; or -1 when consent does not permit (nothing stored).
RECORD_SCRIPT = (
    PERMITS
    + """
local now, keep, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ids_keep, max_counters, log_len = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local channel, visitor = ARGV[7], ARGV[8]
if ARGV[9] ~= '' and not permits(redis.call('HGET', KEYS[2], ARGV[9]), ARGV[10], now) then return -1 end
-- The log's entries older than the retention go first (their ids are the server's clock in ms).
if tonumber(ARGV[6]) > 0 and ARGV[11] ~= '' then redis.call('XTRIM', KEYS[4], 'MINID', ARGV[11]) end
local n_windows = tonumber(ARGV[12])
local windows = {}
for w = 1, n_windows do windows[w] = ARGV[12 + w] end
local at = 13 + n_windows
local n_events = tonumber(ARGV[at])
at = at + 1
local stored, any, last_seen = {}, false, tonumber(redis.call('HGET', KEYS[2], '@last_seen') or '-1')
for e = 1, n_events do
  local id, packed, ts = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  local line, n_names = ARGV[at + 3], tonumber(ARGV[at + 4])
  local fresh = 1
  if id ~= '' and ids_keep > 0 then fresh = redis.call('ZADD', KEYS[3], 'NX', now, id) end
  if fresh == 1 then
    any = true
    if packed ~= '' then redis.call('RPUSH', KEYS[1], packed) end
    for n = 1, n_names do
      local name = ARGV[at + 4 + n]
      for w = 1, n_windows do
        local field = name .. '|' .. windows[w]
        local bucket = math.floor(ts / tonumber(windows[w]))
        local held = redis.call('HGET', KEYS[2], field)
        local value = nil
        if not held then
          if n == 1 or redis.call('HLEN', KEYS[2]) < max_counters then value = bucket .. ':1:0' end
        else
          local hb, cur, prev = string.match(held, '^(-?%d+):(%d+):(%d+)$')
          hb, cur, prev = tonumber(hb), tonumber(cur), tonumber(prev)
          if bucket == hb then value = hb .. ':' .. (cur + 1) .. ':' .. prev
          elseif bucket == hb + 1 then value = bucket .. ':1:' .. cur
          elseif bucket > hb + 1 then value = bucket .. ':1:0'
          elseif bucket == hb - 1 then value = hb .. ':' .. cur .. ':' .. (prev + 1)
          end
        end
        if value then redis.call('HSET', KEYS[2], field, value) end
      end
    end
    if ts > last_seen then last_seen = ts end
    if log_len > 0 and line ~= '' then redis.call('XADD', KEYS[4], 'MAXLEN', '~', log_len, '*', 'e', line) end
  end
  stored[e] = fresh
  at = at + 5 + n_names
end
if any then
  redis.call('LTRIM', KEYS[1], -keep, -1)
  redis.call('HSET', KEYS[2], '@last_seen', string.format('%.17g', last_seen))
  if ids_keep > 0 then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -ids_keep - 1) end
  for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ttl) end
  redis.call('PUBLISH', channel, visitor)
end
return stored
"""
)
RECORD_SHA = hashlib.sha1(RECORD_SCRIPT.encode()).hexdigest()

# A visitor's profile, consent first. KEYS: recent list, counters hash, inbox list. ARGV: limit,
# counters ("1" for all of them), the position in HEAD_FIELDS of the consent the read needs (0:
# none), whether no choice permits ("1"/"0"), now, the position of the consent the inbox needs (0:
# leave the inbox alone), whether no choice permits it. The inbox is emptied when asked for, and
# returned only if its consent permits. Returns {0, head, inbox} when consent does not permit
# (nothing else is read), else {1, head, inbox, recent, all counter fields or nothing}; head is HMGET
# of HEAD_FIELDS.
HEAD_FIELDS = (LAST_SEEN, *CONSENT_FIELDS)
PROFILE_SCRIPT = (
    PERMITS
    + f"""
local head = redis.call('HMGET', KEYS[2], {", ".join(repr(f) for f in HEAD_FIELDS)})
local now, inbox, messages = tonumber(ARGV[5]), tonumber(ARGV[6]), {{}}
if inbox > 0 then
  if permits(head[inbox], ARGV[7], now) then
    messages = redis.call('LRANGE', KEYS[3], 0, -1)
    if #messages > 0 then redis.call('DEL', KEYS[3]) end
  else
    redis.call('DEL', KEYS[3])
  end
end
local need = tonumber(ARGV[3])
if need > 0 and not permits(head[need], ARGV[4], now) then return {{0, head, messages}} end
local limit, recent = tonumber(ARGV[1]), {{}}
if limit > 0 then recent = redis.call('LRANGE', KEYS[1], -limit, -1) end
if ARGV[2] == '1' then return {{1, head, messages, recent, redis.call('HGETALL', KEYS[2])}} end
if ARGV[2] == '2' then return {{1, head, messages, recent, redis.call('HMGET', KEYS[2], unpack(ARGV, 8))}} end
return {{1, head, messages, recent}}
"""
)
PROFILE_SHA = hashlib.sha1(PROFILE_SCRIPT.encode()).hexdigest()  # Redis names scripts by SHA-1

# Set a visitor's timers. KEYS: counters hash (consent), timers hash, the timers sorted set. ARGV:
# now, the consent field needed ("" for none), whether no choice permits, then per timer its member,
# due time and payload. A member already pending keeps its time. Returns a flag per timer (1 set) or
# -1 when consent does not permit (nothing set).
SCHEDULE_SCRIPT = (
    PERMITS
    + """
if ARGV[2] ~= '' and not permits(redis.call('HGET', KEYS[1], ARGV[2]), ARGV[3], tonumber(ARGV[1])) then return -1 end
local set = {}
for at = 4, #ARGV, 3 do
  local added = redis.call('ZADD', KEYS[3], 'NX', ARGV[at + 1], ARGV[at])
  if added == 1 then redis.call('HSET', KEYS[2], ARGV[at], ARGV[at + 2]) end
  set[#set + 1] = added
end
return set
"""
)

# Remove a visitor's timers. KEYS: timers hash, the timers sorted set. ARGV: members. Returns the
# (1-based) positions of those that were pending.
CANCEL_SCRIPT = """
local removed = {}
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[2], ARGV[i]) == 1 then removed[#removed + 1] = i end
  redis.call('HDEL', KEYS[1], ARGV[i])
end
return removed
"""

# Take the due timers. KEYS: the timers sorted set. ARGV: now, limit, key prefix. The visitor's
# timers hash is named from the member (a script runs alone, so no other claim sees these members).
# Returns member, due, payload for each, soonest first.
CLAIM_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for i = 1, #due, 2 do
  local member = due[i]
  redis.call('ZREM', KEYS[1], member)
  local hash = ARGV[3] .. 'v:' .. cjson.decode(member)[1] .. ':timers'
  claimed[#claimed + 1] = member
  claimed[#claimed + 1] = due[i + 1]
  claimed[#claimed + 1] = redis.call('HGET', hash, member) or ''
  redis.call('HDEL', hash, member)
end
return claimed
"""

# Fire a trigger for a visitor. KEYS: counters hash (consent), fired hash, inbox list. ARGV: now, the
# consent field needed ("" for none), whether no choice permits, trigger, until when it is then
# fired, the period in ms, message, inbox length, inbox ttl in ms, channel, announcement. Returns 1
# fired, 0 fired already within the period, -1 consent does not permit (nothing done).
FIRE_SCRIPT = (
    PERMITS
    + """
local now = tonumber(ARGV[1])
if ARGV[2] ~= '' and not permits(redis.call('HGET', KEYS[1], ARGV[2]), ARGV[3], now) then return -1 end
local held = redis.call('HGET', KEYS[2], ARGV[4])
if held and tonumber(held) > now then return 0 end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[6]) then redis.call('PEXPIRE', KEYS[2], ARGV[6]) end
redis.call('RPUSH', KEYS[3], ARGV[7])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[8]), -1)
redis.call('PEXPIRE', KEYS[3], ARGV[9])
redis.call('PUBLISH', ARGV[10], ARGV[11])
return 1
"""
)

# What a visitor has of triggers. KEYS: timers hash, fired hash, inbox, the timers sorted set.
# Returns {timers hash, the due time of each of its members, fired hash, inbox}.
TRIGGER_STATE_SCRIPT = """
local timers = redis.call('HGETALL', KEYS[1])
local dues = {}
for i = 1, #timers, 2 do dues[#dues + 1] = redis.call('ZSCORE', KEYS[4], timers[i]) or '' end
return {timers, dues, redis.call('HGETALL', KEYS[2]), redis.call('LRANGE', KEYS[3], 0, -1)}
"""

# Delete a visitor. KEYS: recent, counters, ids, timers hash, fired, inbox, the timers sorted set.
# Returns how many of the visitor's keys existed.
FORGET_SCRIPT = """
local members = redis.call('HKEYS', KEYS[4])
for i = 1, #members do redis.call('ZREM', KEYS[7], members[i]) end
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
"""
