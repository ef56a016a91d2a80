-- wrk script of the benchmark's case 4 (bench/ingest.py, feedback ingest).
--
--   wrk -t2 -c16 -d20s -s scripts/local/bench.lua URL -- TOKENS_FILE TWIN_ID TAG ANON_KEY [BATCH]
--
-- TOKENS_FILE holds one user JWT a line; requests rotate through them. Without BATCH (or 1) every
-- request is one new vote, a JSON object, trace id TAG-<thread>-<n>: each insert is a first vote.
-- With BATCH = B > 10 every request is a JSON array of B votes of its user: B - 10 new traces
-- (TAG-<thread>-<n>-<i>), then 5 changed votes on the request's own traces 1-5 (the later
-- element must win), then 5 changed votes on traces 6-10 of the thread's request n - 8 × users
-- (the same user; far enough back that it has been answered), new traces while n is smaller.
-- At the end one line `BENCH_JSON {...}` reports requests sent, responses by status, errors and
-- latency.

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
  batch = tonumber(args[5] or "1")
  sent = 0
  statuses = {}
end

local function vote(trace, n)
  local score = (n % 3 == 0) and -1 or 1
  local reason = (score > 0) and "helpful" or reasons[n % 4 + 2]
  return string.format(
    '{"twin_id":"%s","trace_id":"%s","score":%d,"reason":"%s","intent_label":"intent_%d"}',
    twin_id, trace, score, reason, n % 10)
end

function request()
  sent = sent + 1
  local headers = header_sets[(sent + thread_id) % #header_sets + 1]
  if batch <= 1 then
    return wrk.format("POST", nil, headers, vote(string.format("%s-%d-%d", tag, thread_id, sent), sent))
  end
  local back = 8 * #header_sets  -- a multiple of the users: the same user as this request
  local votes = {}
  for i = 1, batch do
    local n, i_trace = sent, i
    if i > batch - 10 and i <= batch - 5 then
      i_trace = i - (batch - 10)  -- this request's traces 1-5 again
    elseif i > batch - 5 and sent > back then
      n, i_trace = sent - back, i - (batch - 10)  -- traces 6-10 of request sent - back
    end
    votes[i] = vote(string.format("%s-%d-%d-%d", tag, thread_id, n, i_trace), sent + i)
  end
  return wrk.format("POST", nil, headers, "[" .. table.concat(votes, ",") .. "]")
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
