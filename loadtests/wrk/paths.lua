-- wrk script: GET a list of request paths (or POST a list of bodies), optionally paced, and print the
-- results as one JSON line.
--
--   wrk -t1 -c64 -d15s -s loadtests/wrk/paths.lua http://127.0.0.1:8000 -- file=PATHS [threads=T] [rate=R connections=C]
--   wrk ... -s loadtests/wrk/paths.lua http://127.0.0.1:8000 -- file=BODIES post=/v1/events [threads=T]
--
-- file=PATHS     one request path per line ("/v1/recommend?user=u0007&n=10"). With threads=T, thread k
--                sends lines k+1, k+1+T, k+1+2T, ... so together the threads consume a prefix of the file,
--                each line once, wrapping around only when the whole file is used up. Requests are
--                pre-formatted in init(), so the per-request Lua cost is one table lookup, the same for
--                every endpoint measured.
-- post=PATH      the lines are JSON bodies (without newlines), POSTed to PATH with Content-Type:
--                application/json; then errors.status counts every answer that is not 2xx (wrk itself
--                counts only > 399) and "status_codes" counts each status seen. (Only in this mode is a
--                response() hook defined: it costs wrk time on every response.)
-- rate=R         target request rate of the whole run (all threads and connections); connections=C must
--                repeat wrk's -c, which Lua cannot read. wrk has no rate limiter, so delay() waits before
--                each request of a connection, its first included, a random time with an exponential
--                distribution of mean C*1000/R ms: the C connections together send as independent
--                visitors do (Poisson arrivals at rate R). A fixed wait would keep the connections in
--                step: they would start together and send in bursts of C, which tests a burst, not a
--                rate. The delay is not part of the latency wrk records (its clock starts when the
--                request is written), and a connection waits for its response before the next delay,
--                so the achieved rate is somewhat below R: read it from "rate" in the output.
--
-- done() prints one line, "WRK_JSON {...}": requests, duration_s, rate, bytes, errors (connect, read,
-- write, timeout, status = responses with HTTP status > 399) and latency in milliseconds (mean, stdev,
-- max, p50, p90, p99, p99_9).

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

function init(args)
   local options = {}
   for _, arg in ipairs(args) do
      local key, value = string.match(arg, "^(%w+)=(.*)$")
      if key == nil then
         error("arguments are key=value: file=PATHS [post=PATH] [threads=T] [rate=R connections=C], got " .. arg)
      end
      options[key] = value
   end
   if options.file == nil then
      error("missing file=PATHS")
   end
   local headers = { ["Content-Type"] = "application/json" }
   for line in io.lines(options.file) do
      if line ~= "" then
         if options.post then
            table.insert(requests, wrk.format("POST", options.post, headers, line))
         else
            table.insert(requests, wrk.format("GET", line))
         end
      end
   end
   if options.post then
      statuses = {} -- per thread: HTTP status -> count, read by done() through thread:get
      response = function(status, headers, body)
         statuses[status] = (statuses[status] or 0) + 1
      end
   end
   if #requests == 0 then
      error(options.file .. ": no request paths")
   end
   stride = tonumber(options.threads or "1") or 1
   position = (id % #requests) + 1
   local rate = tonumber(options.rate or "0") or 0
   if rate > 0 then
      local connections = tonumber(options.connections or "0") or 0
      if connections <= 0 then
         error("rate=R needs connections=C (wrk's -c)")
      end
      local mean = connections * 1000.0 / rate
      math.randomseed(os.time() * 1000 + id)
      -- defined only when pacing: wrk looks for delay() after init(), and without it keeps its fast path.
      -- wrk waits whole milliseconds: the exponential wait is rounded up or down at random, so that
      -- its mean stays exact.
      delay = function()
         local wait = -mean * math.log(1.0 - math.random())
         local whole = math.floor(wait)
         if math.random() < wait - whole then
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

local function fmt(value)
   return string.format("%.4f", value)
end

function done(summary, latency, requests_stats)
   local e = summary.errors
   local seconds = summary.duration / 1e6
   local status_errors = e.status
   local codes = nil
   for _, thread in ipairs(threads) do
      local seen = thread:get("statuses")
      if seen then
         codes = codes or {}
         for status, count in pairs(seen) do
            codes[status] = (codes[status] or 0) + count
         end
      end
   end
   local code_parts = nil
   if codes then
      code_parts, status_errors = {}, 0
      for status, count in pairs(codes) do
         table.insert(code_parts, '"' .. status .. '":' .. count)
         if status < 200 or status > 299 then
            status_errors = status_errors + count
         end
      end
   end
   local parts = {
      '"requests":' .. summary.requests,
      '"duration_s":' .. fmt(seconds),
      '"rate":' .. fmt(summary.requests / seconds),
      '"bytes":' .. summary.bytes,
      '"errors":{"connect":' .. e.connect .. ',"read":' .. e.read .. ',"write":' .. e.write
         .. ',"timeout":' .. e.timeout .. ',"status":' .. status_errors .. '}',
      '"latency_ms":{"mean":' .. fmt(latency.mean / 1000) .. ',"stdev":' .. fmt(latency.stdev / 1000)
         .. ',"max":' .. fmt(latency.max / 1000)
         .. ',"p50":' .. fmt(latency:percentile(50) / 1000)
         .. ',"p90":' .. fmt(latency:percentile(90) / 1000)
         .. ',"p99":' .. fmt(latency:percentile(99) / 1000)
         .. ',"p99_9":' .. fmt(latency:percentile(99.9) / 1000) .. '}',
      '"threads":' .. counter,
   }
   if code_parts then
      table.insert(parts, '"status_codes":{' .. table.concat(code_parts, ",") .. '}')
   end
   io.write("WRK_JSON {" .. table.concat(parts, ",") .. "}\n")
end
