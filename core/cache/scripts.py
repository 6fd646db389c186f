"""Every Lua script the catalog runs, with its KEYS and ARGV. Registered once per client.

Each script is one atomic step of DESIGN section 5, and every key it touches is declared in KEYS
and shares one Redis Cluster hash slot with the others of one call (core/keys.py): the store
groups a call's entries by slot and runs one script per slot (core/cache/store.py). Scripts
take a list of entries, so in standalone mode one call carries a whole batch.

* ``ACQUIRE`` takes a lease per value key and, in the same step, adds a page to its filter's
  page set (same slot), so an invalidation that runs while the fill is in flight finds the page
  and voids its lease. Products need no set: their key is derived from the event's id.
* ``FILL`` writes a value only while its lease is still the caller's and no newer version is
  cached, and keeps a page in its filter's set in the same step.
* ``INVALIDATE_PRODUCTS`` voids products and their leases; ``INVALIDATE_PAGES`` voids the pages
  the caller read from a filter's set and returns members it was not given (added meanwhile),
  which the caller voids in another round.

Nothing in a value depends on a category's or brand's name (names are appended when a product
is served, core/cache/names.py), so no script needs a name generation.
"""

from __future__ import annotations

# KEYS: per entry: value, lease, then `nsets` sets (a page's filter page set, or none)
# ARGV: token, lease_ttl_ms, set_min_ttl_ms, nsets, mode
#   mode 'miss':    take the lease only if the value is absent and nobody holds the lease
#   mode 'refresh': take the lease if nobody holds it, value or not (stale-while-revalidate)
#   mode 'force':   take the lease whatever holds it (write-through: voids fills in flight)
# Returns {r1, r2, ...}: r = the value (bytes) when present in 'miss' mode, 1 when this call took
# the lease, 0 when another reader holds it.
ACQUIRE = """
local token, lease_ttl, set_ttl, nsets = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local mode = ARGV[5]
local out = {}
local i = 1
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
      for s = i + 2, i + 1 + nsets do
        redis.call('SADD', KEYS[s], KEYS[i])
        if redis.call('PTTL', KEYS[s]) < set_ttl then redis.call('PEXPIRE', KEYS[s], set_ttl) end
      end
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  i = i + 2 + nsets
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

# KEYS: per entry: value, lease, then its sets (a page's filter page set, or none)
# ARGV: token, set_margin_ms, then per entry: nsets, ttl_ms, version, data
# Returns {ok1, ok2, ...}: 1 written, 0 refused: lease voided/expired/foreign, or the entry
# already cached is newer. A lease still ours is released either way, so waiters need not wait
# for it to expire.
FILL = (
    _VERSION_OF
    + """
local token, margin = ARGV[1], tonumber(ARGV[2])
local out = {}
local k, a = 1, 3
while a <= #ARGV do
  local nsets, ttl = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local version, data = tonumber(ARGV[a + 2]), ARGV[a + 3]
  local value, lease = KEYS[k], KEYS[k + 1]
  local own = redis.call('GET', lease) == token
  if own then redis.call('DEL', lease) end
  if own and version_of(redis.call('GET', value)) <= version then
    -- Sets before the value: a script that fails midway is not rolled back, and a set member
    -- without its value is harmless where a value missing from its set could never be voided.
    for s = k + 2, k + 1 + nsets do
      redis.call('SADD', KEYS[s], value)
      if redis.call('PTTL', KEYS[s]) < ttl + margin then
        redis.call('PEXPIRE', KEYS[s], ttl + margin)
      end
    end
    redis.call('SET', value, data, 'PX', ttl)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  k, a = k + 2 + nsets, a + 4
end
return out
"""
)

# KEYS: lease, the filter's page set, the page.  ARGV: token.
# A load that caches nothing (an empty list page): drops the lease if still ours and the page's
# membership in its set (a set left empty disappears), so it leaves no key behind.
# Returns 1 if the lease was ours.
ABANDON = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], KEYS[3])
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

# KEYS: per product: value, lease.  ARGV: per product: a minimum version.
# Minimum version 0 deletes the value; v > 0 keeps a value already cached at version >= v (a
# write-through that got there first) and deletes an older one. The lease is always deleted, so
# a fill that read before the change is refused. Returns the number of keys deleted.
INVALIDATE_PRODUCTS = (
    _VERSION_OF
    + """
local n = 0
for i = 1, #KEYS, 2 do
  local min_version = tonumber(ARGV[(i + 1) / 2]) or 0
  if min_version > 0 and version_of(redis.call('GET', KEYS[i])) >= min_version then
    n = n + redis.call('DEL', KEYS[i + 1])
  else
    n = n + redis.call('DEL', KEYS[i], KEYS[i + 1])
  end
end
return n
"""
)

# KEYS: per filter: its page set, then the pages the caller read from it, each with its lease.
# ARGV: per filter: the number of pages declared.
# Deletes every declared page and lease and removes the page from its set. Members the caller
# did not declare (added by an ACQUIRE since its SMEMBERS) cannot be deleted here (their keys
# were not declared): they are returned, and the caller repeats with them.
# Returns {keys deleted, then per filter: the number of undeclared members, then those members}.
INVALIDATE_PAGES = """
local deleted, out = 0, {0}
local k = 1
for f = 1, #ARGV do
  local set, n = KEYS[k], tonumber(ARGV[f])
  for j = k + 1, k + 2 * n, 2 do
    deleted = deleted + redis.call('DEL', KEYS[j], KEYS[j + 1])
    redis.call('SREM', set, KEYS[j])
  end
  local left = redis.call('SMEMBERS', set)
  out[#out + 1] = #left
  for j = 1, #left do out[#out + 1] = left[j] end
  k = k + 1 + 2 * n
end
out[1] = deleted
return out
"""

# KEYS: registry sets.  ARGV: ttl_ms, then per set: the member to add.
# Adds each member and raises each set's TTL to ``ttl_ms`` (never lowers it). Members are never
# removed: one removed while a reader sits between its REGISTER and its ACQUIRE would hide that
# reader's page from the next invalidation.
REGISTER = """
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[i + 1])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return #KEYS
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
