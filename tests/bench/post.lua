-- wrk script: send the benchmark's POST /v1/responses request and, at the
-- end, print one machine-readable line (all times in microseconds) so that
-- report.py never has to parse wrk's human-readable units.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_REQUEST_BODY") or '{"model":"m","input":"hi"}'
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "BENCH_RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d " ..
        "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
        summary.requests, summary.duration,
        latency:percentile(50), latency:percentile(99),
        e.connect, e.read, e.write, e.status, e.timeout))
end
