-- wrk script of the API benchmark: one request shape, a bounded request count,
-- and a JSON summary on stdout.
--
-- Environment: BENCH_METHOD (GET or POST), BENCH_BODY (request body, POST only),
-- BENCH_API_KEY (sent as X-API-Key when set), BENCH_MAX_REQUESTS (responses
-- per wrk thread after which the thread stops, a safety bound: wrk still waits
-- for its --duration, so a run that reaches it understates the rate and the
-- caller rejects it).

local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "0")
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   wrk.method = os.getenv("BENCH_METHOD") or "GET"
   local body = os.getenv("BENCH_BODY")
   if body and body ~= "" then
      wrk.body = body
      wrk.headers["Content-Type"] = "application/json"
   end
   local key = os.getenv("BENCH_API_KEY")
   if key and key ~= "" then
      wrk.headers["X-API-Key"] = key
   end
   responses = 0
   expected = 0
   body_bytes = 0
end

function response(status, headers, body)
   responses = responses + 1
   if status == 200 or status == 202 then
      expected = expected + 1
   end
   body_bytes = body_bytes + #body
   if max_requests > 0 and responses >= max_requests then
      wrk.thread:stop()
   end
end

function done(summary, latency, requests)
   local responses_total, expected_total, bytes_total = 0, 0, 0
   for _, thread in ipairs(threads) do
      responses_total = responses_total + thread:get("responses")
      expected_total = expected_total + thread:get("expected")
      bytes_total = bytes_total + thread:get("body_bytes")
   end
   local errors = summary.errors
   io.write(string.format(
      '{"duration_us": %d, "requests": %d, "responses": %d, "expected_status": %d, ' ..
      '"body_bytes": %d, "socket_errors": %d, "non_2xx": %d, "timeouts": %d, ' ..
      '"latency_us": {"min": %d, "p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
      summary.duration, summary.requests, responses_total, expected_total, bytes_total,
      errors.connect + errors.read + errors.write, errors.status, errors.timeout,
      latency.min, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
