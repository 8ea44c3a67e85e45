-- Posts the file named by BODY_FILE with CONTENT_TYPE, or, with BODIES_FILE, the JSON bodies of
-- that file (one per line) in turn, each thread from its own offset; prints one JSON summary
-- line at the end. Without either it sends GETs (the benchmark's HTTP round-trip floor).
local path = os.getenv("BODY_FILE")
local bodies_path = os.getenv("BODIES_FILE")
local bodies = {}
if bodies_path and bodies_path ~= "" then
  for line in io.lines(bodies_path) do
    if line ~= "" then bodies[#bodies + 1] = line end
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
elseif path and path ~= "" then
  local f = assert(io.open(path, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*all")
  f:close()
  wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "image/png"
end

if #bodies > 0 then
  local counter = 0
  local next_thread = 0

  setup = function(thread)
    thread:set("offset", next_thread * 7919)
    next_thread = next_thread + 1
  end

  init = function(args)
    counter = tonumber(offset) or 0
  end

  request = function()
    counter = counter + 1
    return wrk.format(nil, nil, nil, bodies[(counter % #bodies) + 1])
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
