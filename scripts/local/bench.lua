-- wrk script of the benchmark's case 4 (bench/ingest.py, feedback ingest): every request is a new feedback vote.
--
--   wrk -t2 -c16 -d20s -s scripts/local/bench.lua URL -- TOKENS_FILE TWIN_ID TAG ANON_KEY
--
-- TOKENS_FILE holds one user JWT a line; requests rotate through them. Trace ids are
-- TAG-<thread>-<n>, distinct for every request, so each insert is a first vote. At the end one
-- line `BENCH_JSON {...}` reports requests sent, responses by status, errors and latency.

local threads = {}
local next_thread = 1

function setup(thread)
  thread:set("thread_id", next_thread)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end

function init(args)
  twin_id, tag = args[2], args[3]
  header_sets = {}
  for token in io.lines(args[1]) do
    if #token > 0 then
      header_sets[#header_sets + 1] = {
        ["Authorization"] = "Bearer " .. token,
        ["apikey"] = args[4],
        ["Content-Type"] = "application/json",
        ["Prefer"] = "return=minimal",
      }
    end
  end
  reasons = { "helpful", "incorrect", "unhelpful", "off_persona", "outdated" }
  sent = 0
  statuses = {}
end

function request()
  sent = sent + 1
  local headers = header_sets[(sent + thread_id) % #header_sets + 1]
  local score = (sent % 3 == 0) and -1 or 1
  local reason = (score > 0) and "helpful" or reasons[sent % 4 + 2]
  local body = string.format(
    '{"twin_id":"%s","trace_id":"%s-%d-%d","score":%d,"reason":"%s","intent_label":"intent_%d"}',
    twin_id, tag, thread_id, sent, score, reason, sent % 10)
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
  local sent_total, by_status = 0, {}
  for _, thread in ipairs(threads) do
    sent_total = sent_total + thread:get("sent")
    for code, n in pairs(thread:get("statuses")) do
      by_status[code] = (by_status[code] or 0) + n
    end
  end
  local codes = {}
  for code, n in pairs(by_status) do
    codes[#codes + 1] = string.format('"%s":%d', code, n)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"completed":%d,"sent":%d,"statuses":{%s},'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.duration, summary.requests, sent_total, table.concat(codes, ","),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
