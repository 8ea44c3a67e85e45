-- Soak mix for wrk: valid and invalid requests in rotation. Each request's x-request-id says
-- which status it must get; the server echoes it, so response() can check it.
local mix = {}
local function add(name, method, path, ctype, body, expect)
  mix[#mix + 1] = {name = name, method = method, path = path, ctype = ctype, body = body, expect = expect}
end

local function read(path)
  local f = assert(io.open(path, "rb")); local d = f:read("*all"); f:close(); return d
end

local png = read(os.getenv("SOAK_PNG"))
add("image", "POST", "/v1/models/image-cnn/predict", "image/png", png, 200)
add("image", "POST", "/v1/models/image-cnn/predict", "image/png", png, 200)
add("regressor", "POST", "/v1/models/regressor/predict", "application/json", '{"instances": [[0.5], [1.0]]}', 200)
add("text", "POST", "/v1/models/text-classifier/predict", "application/json", '{"instances": ["I love this", "太糟糕了"]}', 200)
add("v2", "POST", "/v2/models/regressor/infer", "application/json",
    '{"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [0.1, 0.2]}]}', 200)
add("bad-json", "POST", "/v1/models/regressor/predict", "application/json", '{"instances": [1,', 400)
add("bad-shape", "POST", "/v1/models/regressor/predict", "application/json", '{"instances": [[1, 2]]}', 422)
add("no-model", "POST", "/v1/models/nope/predict", "application/json", '{"instances": [1]}', 404)
add("bad-image", "POST", "/v1/models/image-cnn/predict", "image/png", "\137PNG\r\n\026\n garbage", 400)
add("bad-v2", "POST", "/v2/models/regressor/infer", "application/json",
    '{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "UINT32", "data": [1]}]}', 400)

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  ok = 0
  unexpected = 0
  examples = ""
end

function request()
  n = n + 1
  local r = mix[(n % #mix) + 1]
  return wrk.format(r.method, r.path, {["Content-Type"] = r.ctype, ["x-request-id"] = r.name .. "-" .. r.expect .. "-" .. n}, r.body)
end

function response(status, headers, body)
  local id = headers["x-request-id"] or ""
  local expect = tonumber(string.match(id, "-(%d%d%d)-"))
  if expect == status then
    ok = ok + 1
  else
    unexpected = unexpected + 1
    if #examples < 400 then examples = examples .. id .. "=" .. status .. " " end
  end
end

function done(summary, latency, requests)
  local total_ok, total_bad, ex = 0, 0, ""
  for _, t in ipairs(threads) do
    total_ok = total_ok + t:get("ok")
    total_bad = total_bad + t:get("unexpected")
    ex = ex .. t:get("examples")
  end
  local e = summary.errors
  io.write(string.format('SOAK_JSON {"requests": %d, "expected": %d, "unexpected": %d, "socket_errors": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "examples": "%s"}\n',
    summary.requests, total_ok, total_bad, e.connect + e.read + e.write + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99), ex))
end
