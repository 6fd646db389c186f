"""Every Lua script the catalog runs, with its KEYS and ARGV. Registered once per client.

Each script is one atomic step; together they implement DESIGN section 5:

* ``ACQUIRE`` takes a lease per value key and, in the same step, registers the key in the tag
  sets known before the database read, so an invalidation that runs while the fill is in flight
  finds the key and voids its lease.
* ``FILL`` writes a value only while its lease is still the caller's and the name generation is
  the one seen at lease time, and adds the key to all its tags in the same step.
* ``INVALIDATE`` deletes every member of the given tag sets together with their leases, then the
  sets; being one script, a member added concurrently is either deleted or added after it.

Lua builds two kinds of key itself: a lease from its value key (``value .. ':lease'``, same hash
slot) and product keys from the ids of a page (``ASSEMBLE_PAGE``). Under Redis Cluster those
run per slot; see docs/architecture.md.
"""

from __future__ import annotations

# KEYS: gen, then per entry: value, lease, then `ntags` tag sets
# ARGV: token, lease_ttl_ms, tag_min_ttl_ms, ntags, mode
#   mode 'miss':    take the lease only if the value is absent and nobody holds the lease
#   mode 'refresh': take the lease if nobody holds it, value or not (stale-while-revalidate)
#   mode 'force':   take the lease whatever holds it (write-through: voids fills in flight)
# Returns {gen, r1, r2, ...}: r = the value (bytes) when present in 'miss' mode, 1 when this call
# took the lease, 0 when another reader holds it.
ACQUIRE = """
local token, lease_ttl, tag_ttl, ntags = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local mode = ARGV[5]
local out = {redis.call('GET', KEYS[1]) or '0'}
local i = 2
while i <= #KEYS do
  local value = mode == 'miss' and redis.call('GET', KEYS[i])
  local took
  if value then
    out[#out + 1] = value
  else
    if mode == 'force' then
      took = redis.call('SET', KEYS[i + 1], token, 'PX', lease_ttl)
    else
      took = redis.call('SET', KEYS[i + 1], token, 'NX', 'PX', lease_ttl)
    end
    if took then
      for t = i + 2, i + 1 + ntags do
        redis.call('SADD', KEYS[t], KEYS[i])
        if redis.call('PTTL', KEYS[t]) < tag_ttl then redis.call('PEXPIRE', KEYS[t], tag_ttl) end
      end
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  i = i + 2 + ntags
end
return out
"""

# Version of a cached entry (see core/cache/entry.py): 0 for pages and negative entries.
_VERSION_OF = """
local function version_of(v)
  if v and string.sub(v, 1, 1) == 'E' then return tonumber(string.sub(v, 2, 21)) end
  return 0
end
"""

# KEYS: gen, then per entry: value, lease, then its tag sets
# ARGV: token, gen_seen, tag_margin_ms, then per entry: ntags, ttl_ms, version, data
# Returns {ok1, ok2, ...}: 1 written, 0 refused: lease voided/expired/foreign, generation moved,
# or the entry already cached is newer. A lease still ours is released either way, so waiters
# need not wait for it to expire.
FILL = (
    _VERSION_OF
    + """
local token, margin = ARGV[1], tonumber(ARGV[3])
local gen_ok = (redis.call('GET', KEYS[1]) or '0') == ARGV[2]
local out = {}
local k, a = 2, 4
while a <= #ARGV do
  local ntags, ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local version, data = tonumber(ARGV[a + 2]), ARGV[a + 3]
  local value, lease = KEYS[k], KEYS[k + 1]
  local own = redis.call('GET', lease) == token
  if own then redis.call('DEL', lease) end
  if own and gen_ok and version_of(redis.call('GET', value)) <= version then
    -- Tags before the value: a script that fails midway is not rolled back, and a tag without
    -- its value is harmless where a value missing from a tag could never be invalidated.
    for t = k + 2, k + 1 + ntags do
      redis.call('SADD', KEYS[t], value)
      if redis.call('PTTL', KEYS[t]) < ttl + margin then
        redis.call('PEXPIRE', KEYS[t], ttl + margin)
      end
    end
    redis.call('SET', value, data, 'PX', ttl)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  k, a = k + 2 + ntags, a + 4
end
return out
"""
)

# KEYS: lease, then the tag sets its value key was registered in.  ARGV: token, value key.
# A load that caches nothing (an empty list page): drops the lease if still ours and the value
# key's registration in its tag sets (a set left empty disappears), so it leaves no key behind.
# Returns 1 if the lease was ours.
ABANDON = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do redis.call('SREM', KEYS[i], ARGV[2]) end
return 1
"""

# KEYS: value.  ARGV: version.  Deletes the value if it is older than ``version`` (a miss beats a
# stale entry). Returns 1 if it deleted.
DROP_OLDER = (
    _VERSION_OF
    + """
local v = redis.call('GET', KEYS[1])
if v and version_of(v) < tonumber(ARGV[1]) then return redis.call('DEL', KEYS[1]) end
return 0
"""
)

# KEYS: leases to release.  ARGV: token.  Deletes only leases still holding the token.
RELEASE = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then n = n + redis.call('DEL', KEYS[i]) end
end
return n
"""

# KEYS: gen, then tag sets.  ARGV: bump_generation ('1' or '0'), lease suffix, tag margin ms,
# then per tag: a minimum version and the tag's derivable member ("" if none).
# Minimum version 0 deletes every member; v > 0 keeps a member already cached at version >= v
# (a write-through that got there first) and deletes the rest. Leases are always deleted. The
# derivable member (a product tag's product key) is processed even when the set itself is gone,
# e.g. evicted or expired, so a product edit is never lost with its tag set. A set rebuilt for
# kept members lives at least as long as they do plus the margin (never without a TTL).
# Returns the number of value keys and leases deleted.
INVALIDATE = (
    _VERSION_OF
    + """
local margin = tonumber(ARGV[3])
local n = 0
for i = 2, #KEYS do
  local members = redis.call('SMEMBERS', KEYS[i])
  local min_version = tonumber(ARGV[2 * i]) or 0
  if ARGV[2 * i + 1] ~= '' then members[#members + 1] = ARGV[2 * i + 1] end
  local kept = {}
  local keep_ttl = math.max(redis.call('PTTL', KEYS[i]), margin)
  for j = 1, #members do
    local m = members[j]
    if min_version > 0 and version_of(redis.call('GET', m)) >= min_version then
      kept[#kept + 1] = m
      keep_ttl = math.max(keep_ttl, redis.call('PTTL', m) + margin)
      n = n + redis.call('DEL', m .. ARGV[2])
    else
      n = n + redis.call('DEL', m, m .. ARGV[2])
    end
  end
  redis.call('DEL', KEYS[i])
  if #kept > 0 then
    redis.call('SADD', KEYS[i], unpack(kept))
    redis.call('PEXPIRE', KEYS[i], keep_ttl)
  end
end
if ARGV[1] == '1' then redis.call('INCR', KEYS[1]) end
return n
"""
)

# KEYS: page key.  ARGV: product key prefix, product key suffix, entry header length.
# A page entry's payload starts "<next_after_id>\n<id>,<id>,...\n" (core/cache/entry.py
# pack_page); the ids are read between the first two newlines. Returns false on a miss, else
# {page, product1 or false, product2 or false, ...} in page order.
ASSEMBLE_PAGE = """
local page = redis.call('GET', KEYS[1])
if not page then return false end
local nl = string.find(page, '\\n', tonumber(ARGV[3]) + 1, true)
local ids_end = string.find(page, '\\n', nl + 1, true) or (#page + 1)
local keys = {}
for id in string.gmatch(string.sub(page, nl + 1, ids_end - 1), '[^,]+') do
  keys[#keys + 1] = ARGV[1] .. id .. ARGV[2]
end
if #keys == 0 then return {page} end
local out = redis.call('MGET', unpack(keys))
table.insert(out, 1, page)
return out
"""

# KEYS: the live hash of pending views.  ARGV: cap, then per distinct id: id, count.
# Adds every count, or none when the ids not yet in the hash would take it past ``cap`` fields:
# the hash is bounded whatever ids clients send (unknown ids live only until the next flush
# drops them), and a batch lands whole or not at all. Returns 1 if added, 0 if refused.
RECORD_VIEWS = """
local new = 0
for i = 2, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then new = new + 1 end
end
if new > 0 and redis.call('HLEN', KEYS[1]) + new > tonumber(ARGV[1]) then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
