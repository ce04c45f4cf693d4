-- Replays pre-signed POST /api/v1/orders requests (one per line in the file given after --),
-- so the load client spends no CPU on signing. Each wrk thread takes its own slice.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

function init(args)
  local nthreads = tonumber(args[2])
  reqs = {}
  local i = 0
  for line in io.lines(args[1]) do
    if i % nthreads == id then
      local path, key, ts, nonce, sig, idem, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      local headers = {}
      headers["Content-Type"] = "application/json"
      headers["X-Api-Key"] = key
      headers["X-Timestamp"] = ts
      headers["X-Nonce"] = nonce
      headers["X-Signature"] = sig
      headers["Idempotency-Key"] = idem
      table.insert(reqs, wrk.format("POST", path, headers, body))
    end
    i = i + 1
  end
  pos = 0
  statuses = {}
end

function request()
  pos = pos + 1
  if pos > #reqs then pos = 1 end
  return reqs[pos]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status ~= 201 and not sample then sample = string.sub(body, 1, 300) end
end

function done(summary, latency, requests)
  local totals = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then
      for code, n in pairs(s) do totals[code] = (totals[code] or 0) + n end
    end
  end
  for code, n in pairs(totals) do io.write(string.format("status %d: %d\n", code, n)) end
  for _, t in ipairs(threads) do
    local body = t:get("sample")
    if body then io.write("sample non-201 answer: " .. body .. "\n") end
  end
  io.write(string.format("p50_us=%d p99_us=%d\n", latency:percentile(50), latency:percentile(99)))
end
