-- wrk script: POST a list of pre-built JSON bodies, optionally paced, and print the results as one JSON line.
--
--   wrk -t1 -c64 -d15s -s loadtests/wrk/post.lua http://127.0.0.1:8000 -- file=BODIES [path=/v1/events]
--       [threads=T] [rate=R connections=C]
--
-- file=BODIES    one request body per line (a JSON document without newlines), POSTed round-robin to
--                path (default /v1/events) with Content-Type: application/json. With threads=T, thread k
--                sends lines k+1, k+1+T, k+1+2T, ... so together the threads consume a prefix of the file,
--                each line once, wrapping around only when the whole file is used up. Requests are
--                pre-formatted in init(), so the per-request Lua cost is one table lookup.
-- rate=R         target request rate of the whole run (all threads and connections); connections=C must
--                repeat wrk's -c, which Lua cannot read. As in paths.lua: delay() spaces each connection's
--                requests by C*1000/R ms, rounded up or down at random so that the mean is exact, and the
--                achieved rate is somewhat below R: read it from "rate" in the output.
--
-- done() prints one line, "WRK_JSON {...}", with the fields of paths.lua: requests, duration_s, rate, bytes,
-- errors (connect, read, write, timeout, status) and latency in milliseconds (mean, stdev, max, p50, p90,
-- p99, p99_9); here errors.status counts every response that is not 2xx (wrk itself counts only > 399),
-- and "status_codes" adds the count of each HTTP status seen.

local counter = 0
local threads = {}

function setup(thread)
   thread:set("id", counter)
   table.insert(threads, thread)
   counter = counter + 1
end

local requests = {}
local position = 1
local stride = 1
-- per thread: HTTP status -> count ("statuses" is read by done() through thread:get)
statuses = {}

function init(args)
   local options = {}
   for _, arg in ipairs(args) do
      local key, value = string.match(arg, "^(%w+)=(.*)$")
      if key == nil then
         error("arguments are key=value: file=BODIES [path=P] [threads=T] [rate=R connections=C], got " .. arg)
      end
      options[key] = value
   end
   if options.file == nil then
      error("missing file=BODIES")
   end
   local path = options.path or "/v1/events"
   local headers = { ["Content-Type"] = "application/json" }
   for line in io.lines(options.file) do
      if line ~= "" then
         table.insert(requests, wrk.format("POST", path, headers, line))
      end
   end
   if #requests == 0 then
      error(options.file .. ": no request bodies")
   end
   stride = tonumber(options.threads or "1") or 1
   position = (id % #requests) + 1
   local rate = tonumber(options.rate or "0") or 0
   if rate > 0 then
      local connections = tonumber(options.connections or "0") or 0
      if connections <= 0 then
         error("rate=R needs connections=C (wrk's -c)")
      end
      local interval = connections * 1000.0 / rate
      math.randomseed(os.time() + id)
      -- defined only when pacing: wrk looks for delay() after init(), and without it keeps its fast path
      delay = function()
         local whole = math.floor(interval)
         if math.random() < interval - whole then
            return whole + 1
         end
         return whole
      end
   end
end

function request()
   local r = requests[position]
   position = position + stride
   if position > #requests then
      position = (position - 1) % #requests + 1
   end
   return r
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

local function fmt(value)
   return string.format("%.4f", value)
end

function done(summary, latency, requests_stats)
   local e = summary.errors
   local seconds = summary.duration / 1e6
   local codes = {}
   local not_2xx = 0
   for _, thread in ipairs(threads) do
      local seen = thread:get("statuses") or {}
      for status, count in pairs(seen) do
         codes[status] = (codes[status] or 0) + count
         if status < 200 or status > 299 then
            not_2xx = not_2xx + count
         end
      end
   end
   local code_parts = {}
   for status, count in pairs(codes) do
      table.insert(code_parts, '"' .. status .. '":' .. count)
   end
   local parts = {
      '"requests":' .. summary.requests,
      '"duration_s":' .. fmt(seconds),
      '"rate":' .. fmt(summary.requests / seconds),
      '"bytes":' .. summary.bytes,
      '"errors":{"connect":' .. e.connect .. ',"read":' .. e.read .. ',"write":' .. e.write
         .. ',"timeout":' .. e.timeout .. ',"status":' .. not_2xx .. '}',
      '"latency_ms":{"mean":' .. fmt(latency.mean / 1000) .. ',"stdev":' .. fmt(latency.stdev / 1000)
         .. ',"max":' .. fmt(latency.max / 1000)
         .. ',"p50":' .. fmt(latency:percentile(50) / 1000)
         .. ',"p90":' .. fmt(latency:percentile(90) / 1000)
         .. ',"p99":' .. fmt(latency:percentile(99) / 1000)
         .. ',"p99_9":' .. fmt(latency:percentile(99.9) / 1000) .. '}',
      '"status_codes":{' .. table.concat(code_parts, ",") .. '}',
      '"threads":' .. counter,
   }
   io.write("WRK_JSON {" .. table.concat(parts, ",") .. "}\n")
end
