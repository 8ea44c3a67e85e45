-- Posts the file named by BODY_FILE with CONTENT_TYPE; prints one JSON summary line at the end.
-- Without BODY_FILE it sends GETs (the benchmark's HTTP round-trip floor).
local path = os.getenv("BODY_FILE")
if path and path ~= "" then
  local f = assert(io.open(path, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*all")
  f:close()
  wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "image/png"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
