-- Posts the JSON bodies of BODIES_FILE (one per line) in turn, each thread from its own offset,
-- to the URL's path; prints one JSON summary line at the end (as wrk_post.lua does).
local bodies = {}
for line in io.lines(os.getenv("BODIES_FILE")) do
  if line ~= "" then bodies[#bodies + 1] = line end
end
local counter = 0
local next_thread = 0

setup = function(thread)
  thread:set("offset", next_thread * 7919)
  next_thread = next_thread + 1
end

init = function(args)
  counter = tonumber(offset) or 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, bodies[(counter % #bodies) + 1])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
