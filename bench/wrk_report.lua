-- wrk script used by bench/run.py. Optional request body and content type come from the
-- environment (BENCH_BODY_FILE, BENCH_CONTENT_TYPE); no response() callback, so wrk keeps
-- its fast path. done() prints one machine-readable line:
--   BENCH requests=<n> duration_us=<n> p50_us=<n> p99_us=<n> connect=<n> read=<n> write=<n> status=<n> timeout=<n>
-- wrk counts every response with status >= 400 in errors.status; 3xx is not expected here.

local body_file = os.getenv("BENCH_BODY_FILE")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/octet-stream"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
