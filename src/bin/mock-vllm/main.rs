//! `mock-vllm`: a stand-in for vLLM's OpenAI-compatible API server.
//!
//! It answers on vLLM's command line and HTTP surface so that the gateway can be tried without a GPU
//! and so that the gateway's integration tests have an upstream whose failures they can script, both
//! when they run it on its own and when `gateway serve` supervises it as its child.
//!
//! # Command line
//!
//! `mock-vllm serve <model> [--host H] [--port P] [--api-key K [K ...]] [other vLLM options]`
//!
//! - `--host` defaults to `0.0.0.0` and `--port` to `8000`, as in vLLM; port 0 picks a free port,
//!   which the "Uvicorn running on" line then reports.
//! - `--api-key` takes one or more keys, any of which a request may carry, and falls back to the
//!   `VLLM_API_KEY` environment variable, as in vLLM; empty keys are dropped.
//! - `--model M` is accepted in place of the positional model. `--served-model-name N [N ...]`
//!   serves the model under one or more names, as in vLLM: `/v1/models` lists a card per name,
//!   each with the model as given for `root`; a request may name any of them, or none, and
//!   answers report the first.
//! - `--max-model-len N` is the `max_model_len` `/v1/models` reports (8192 without it), in vLLM's
//!   forms (`1024`, `1k` for 1000, `1K` for 1024, `auto`); a value vLLM would refuse exits with
//!   code 2 and argparse's message, as vLLM does.
//! - Every other option is accepted and ignored, with its value when the next argument does not
//!   start with `--` (or in the `--flag=value` form), so a supervisor can pass real vLLM arguments.
//! - `--help` lists the options and every knob below; `--version` prints the version.
//!
//! A missing or unknown subcommand, a missing model, a bad `--port` or `--max-model-len` and a
//! bad knob all exit with code 2.
//!
//! # Endpoints
//!
//! - `GET /health`, `GET /version`, `GET /v1/models`: as vLLM answers them; `/health` answers
//!   503 once the engine died. `GET /ping` and `POST /ping` (SageMaker's name for it, which
//!   vLLM serves) answer as `/health` does, hanging with it too.
//! - Every answer carries uvicorn's `server: uvicorn` and, but for the key check's 401, the
//!   `vary: Origin` of vLLM's CORS middleware, as vLLM 0.32's do.
//! - Once the engine died, the generation endpoints (`/v1/responses`, `/v1/chat/completions`,
//!   `/v1/completions`, streaming or not) answer vLLM's 500 `InternalServerError` with
//!   `EngineDeadError`'s message, after the model check and before anything is generated, and
//!   the server then shuts down without waiting out the rest of the death linger, as vLLM's
//!   handler of that error makes uvicorn exit.
//! - `POST /v1/responses`: replays a stream (`"stream": true`) or a response recorded from vLLM
//!   serving gpt-oss-20b, byte for byte, whatever the request asks for; a `model` other than the
//!   served names gets vLLM's 404, as on every generation endpoint (below).
//!   A `max_output_tokens` below the answer's length (the stream's 128 text deltas, one token
//!   each; the JSON answer's recorded 36 tokens) cuts it as vLLM does: `status: "incomplete"`,
//!   `incomplete_details: {"reason": "max_output_tokens"}`, the limit echoed and the usage of the
//!   tokens sent; a cut stream ends with vLLM's `response.completed` event carrying that
//!   response, and a cut JSON answer keeps only the start of its reasoning (a function call goes
//!   out only whole). A limit below 1 is vLLM's 400.
//! - The model check of the generation endpoints, `/tokenize` and `/detokenize` is vLLM's: a
//!   missing or empty `model` means the served model, and a name not served gets vLLM 0.32's 404,
//!   byte for byte: "The model `x` does not exist. Valid aliases: a, b." (the served names),
//!   `param: "model"`. A token limit below 1 gets vLLM's 400 naming `max_tokens` (whatever the
//!   endpoint calls it), and a chat request without `messages` (or a Responses request without
//!   `input`) pydantic's error as vLLM words it.
//! - `GET /metrics`: a few of vLLM's Prometheus metrics (`vllm:num_requests_running`,
//!   `vllm:num_requests_waiting`, `vllm:request_success_total`), with vLLM's names and labels,
//!   counting this process's `/v1` requests.
//! - `POST /v1/chat/completions`: a synthetic completion saying "Hello from mock-vllm." (five
//!   tokens), in vLLM 0.32's shapes: the message with `reasoning` and no `tool_calls`,
//!   `system_fingerprint`, usage with `null` details and vLLM's fields after it; streamed
//!   (`"stream": true`) as a role chunk (with `prompt_token_ids` and `prompt_text`), a chunk per
//!   token, the cut answer's last token saying `length`, a whole answer ending with an empty
//!   chunk saying `stop`, the fingerprint on that last chunk or on the usage chunk (no `null`s)
//!   when `stream_options.include_usage` asks for one, then `data: [DONE]`. `max_tokens` (or
//!   `max_completion_tokens`) below five cuts it with `finish_reason: "length"`. Its `model` is
//!   the first served name, whichever name the request used, and its id
//!   `chatcmpl-<x-request-id>` when the request has that header, as in vLLM.
//! - `POST /v1/completions`: the same answer as a text completion, in vLLM 0.32's shapes: one
//!   choice, `system_fingerprint` (`vllm-<version>-<hash of the options>`), usage with `null`
//!   details; streamed (`"stream": true`) as a chunk per token with no role chunk, the cut
//!   answer's last token saying `length`, a whole answer ending with an empty chunk saying
//!   `stop`, the fingerprint on that last chunk or on the usage chunk when
//!   `stream_options.include_usage` asks for one, then `data: [DONE]`. The id is
//!   `cmpl-<x-request-id>` when the request has that header, as vLLM names it. A missing or empty
//!   `prompt` gets vLLM's 400; the prompt's tokens are its words (or token ids), counted across
//!   a list of prompts.
//! - `POST /tokenize` and `POST /detokenize`: vLLM's bodies, from a stand-in tokenizer (the mock
//!   has none): a token is a whitespace-separated word of the `prompt` (or of the `messages`'
//!   text, with no chat template), so a prompt's `count` is its completion's `prompt_tokens`;
//!   ids come from a vocabulary of the words seen, and `/detokenize` joins the words of the ids
//!   it knows with spaces, leaving out the others as vLLM leaves out ids outside its vocabulary.
//!   `return_token_strs` returns the words. Missing fields and negative ids get pydantic's errors
//!   as vLLM words them. As in vLLM they need no key, and they answer while the engine is dead.
//! - A stream in flight when the server begins to stop (a stop signal, or the end of the death
//!   linger) is aborted, with what vLLM reports for an aborted request: a chat or completions
//!   stream ends with a `finish_reason: "abort"` chunk (and the usage chunk when asked for) and
//!   `[DONE]`, a Responses stream with `response.completed` carrying `status: "cancelled"`. A
//!   stream in flight when the engine dies ends as vLLM's does: a chat or completions stream with
//!   vLLM's error chunk (`EngineDeadError`'s message, in Python's `json.dumps` spacing) and
//!   `[DONE]`; a Responses stream is cut off, the connection closed without the chunked body's
//!   end. Stalled streams (`MOCK_VLLM_STALL_MID_STREAM`) stay stalled.
//! - The JSON endpoints (generation, `/tokenize`, `/detokenize`) refuse a body whose media type is
//!   not `application/json` (or that has none) with vLLM's 400, whatever the body, once the route
//!   matched and the key passed.
//! - Unknown paths answer 404 and wrong methods 405 with FastAPI's bodies; as vLLM's, its GET
//!   routes (`/health`, `/ping`, `/version`, `/v1/models`) answer HEAD with 405 too, and allow GET
//!   alone. With API keys set, every `/v1` path needs `Authorization: Bearer <one of the keys>`
//!   and otherwise answers vLLM's 401.
//! - Every response echoes the request's `x-request-id` header.
//! - Connections are HTTP/1.1, as uvicorn serves them: kept alive, and closed without a word once
//!   idle for `MOCK_VLLM_KEEP_ALIVE_TIMEOUT` (5 s, vLLM's `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`) after
//!   their last response; a connection with a request in flight, or one that has not finished
//!   its first response, is never closed for being idle.
//!
//! Test-control endpoints, which vLLM does not have, live under `/_mock/` and need no key:
//!
//! - `GET /_mock/last-request`: method, path, query, headers and body length of the latest `/v1`
//!   request (recorded before the key is checked), or `null` before the first one.
//! - `GET /_mock/stats`: pid, counts of `/v1` requests, completed responses and client disconnects,
//!   the names of the signals received, whether `/health` hangs, the engine core's pid (`null`
//!   without engine processes), whether the engine died, and how many connections were closed
//!   for being idle (`keep_alive_closes`).
//! - `POST /_mock/hang-health` and `POST /_mock/unhang-health`: make `/health` (and `/ping`) hang
//!   or answer again.
//! - `POST /_mock/exit?code=N`: answer 200, then exit with code N (default 0).
//!   `&linger=DURATION` stops listening at once but exits only after the duration, like vLLM's
//!   API server shutting down after its engine died (connections are refused meanwhile).
//!
//! # Processes
//!
//! As vLLM does, the server starts its engine as two processes in its own process group:
//! `VLLM::EngineCore` and its `VLLM::Worker` (this executable again, under those names, which
//! `/proc/<pid>/comm` shows as `VLLM::EngineCor` and `VLLM::Worker`). Stop signals and SIGHUP
//! kill them, so stopping the group stops them; the server stops the engine core whenever it exits by itself or
//! on a stop signal; a SIGKILL or SIGHUP of the server alone leaves both running, orphaned, until
//! their group is stopped. The worker dies with its engine core. When the engine core dies while
//! the server runs (killed, or `MOCK_VLLM_ENGINE_DIE_AFTER`), `/health` answers 503 and
//! generation requests 500 for `MOCK_VLLM_ENGINE_DEATH_LINGER` (5 s, as vLLM's watchdog) or until
//! the first generation request, then the server shuts down and exits 0.
//! `MOCK_VLLM_ENGINE_PROCESSES=0` keeps the engine inside the server process.
//!
//! # Knobs
//!
//! Knobs are environment variables so that they pass through a supervisor to its child; durations
//! use humantime (`500ms`, `2s`), booleans accept `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`,
//! an empty value means unset, and a bad value or an unknown `MOCK_VLLM_*` name exits with code 2.
//!
//! - `MOCK_VLLM_STARTUP_DELAY`: hold the port but refuse connections this long, like vLLM loading
//!   its weights, before listening.
//! - `MOCK_VLLM_STREAM_DELAY`: pause between stream events.
//! - `MOCK_VLLM_HEADERS_DELAY`: wait this long before answering the generation endpoints
//!   (`/v1/responses`, `/v1/chat/completions`, `/v1/completions`), so response headers come late.
//! - `MOCK_VLLM_FAIL_STATUS`: answer the generation endpoints with this status (400-599) and an
//!   OpenAI-style error body.
//! - `MOCK_VLLM_DIE_MID_STREAM=N`: once a stream has sent N events, exit with code 1.
//! - `MOCK_VLLM_STALL_MID_STREAM=N`: once a stream has sent N events, send nothing more, forever.
//! - `MOCK_VLLM_CRASH_AFTER`: this long after listening, exit with `MOCK_VLLM_EXIT_CODE`.
//! - `MOCK_VLLM_EXIT_CODE`: the code for `MOCK_VLLM_CRASH_AFTER` (default 1).
//! - `MOCK_VLLM_EXIT_AT_START=N`: exit with code N before binding, like vLLM rejecting an argument.
//! - `MOCK_VLLM_HANG_HEALTH_AFTER`: this long after listening, `/health` (and `/ping`) stops
//!   answering.
//! - `MOCK_VLLM_IGNORE_SIGTERM`: log and ignore SIGTERM and SIGINT, so only SIGQUIT or SIGKILL end
//!   the process.
//! - `MOCK_VLLM_IGNORE_SIGHUP`: log and ignore SIGHUP, which otherwise kills the process as it
//!   kills vLLM (an exit by signal, 129 as a shell reports it).
//! - `MOCK_VLLM_HANDLE_SIGUSR`: log and record SIGUSR1 and SIGUSR2, which otherwise kill the
//!   process as they kill vLLM (checked against vLLM 0.32 on CPU: every process of it gone).
//! - `MOCK_VLLM_ENGINE_PROCESSES`: run the engine as `VLLM::EngineCore` and `VLLM::Worker`
//!   processes (default 1); 0 keeps it inside the server process.
//! - `MOCK_VLLM_ENGINE_DIE_AFTER`: this long after listening, the engine dies (the engine core is
//!   killed).
//! - `MOCK_VLLM_ENGINE_DEATH_LINGER`: once the engine died, how long `/health` answers 503 (and
//!   generation requests 500) before the server shuts down and exits 0 (default 5s, as vLLM); the
//!   first generation request ends it sooner.
//! - `MOCK_VLLM_SPAWN_GRANDCHILD`: start `sleep 100000` in our own process group, a descendant
//!   that, unlike the engine processes, the server never stops, and leave it running.
//! - `MOCK_VLLM_DETACH_GRANDCHILD`: start that grandchild in a process group of its own instead,
//!   like a worker that called setsid, so that stopping our group leaves it alive.
//! - `MOCK_VLLM_PID_FILE`: append `<pid> <grandchild pid or 0> <engine core pid or 0>` to this
//!   file at start, so that a test sees one line per (re)start.
//! - `MOCK_VLLM_FLOOD`: write one 1 MiB line to stderr, then log lines to stdout as fast as the pipe
//!   takes them, from a thread of their own so that a pipe nobody reads blocks only that thread.
//! - `MOCK_VLLM_SHUTDOWN_GRACE`: how long a graceful shutdown waits for open responses before
//!   exiting anyway (default 3s), so a stalled stream cannot keep the process alive.
//! - `MOCK_VLLM_KEEP_ALIVE_TIMEOUT`: how long a kept-alive connection may sit idle after its last
//!   response before the server closes it (default 5s, as vLLM).
//!
//! # Signals
//!
//! SIGTERM, SIGINT and SIGQUIT shut down gracefully and exit 0, as uvicorn does, aborting streams
//! in flight; a second one exits at once. SIGHUP, SIGUSR1 and SIGUSR2 kill the process, as they
//! kill vLLM, which installs no handler for them (both keep whatever action they inherited,
//! normally the default), unless `MOCK_VLLM_IGNORE_SIGHUP` or `MOCK_VLLM_HANDLE_SIGUSR` is set
//! (then they are only logged). Every signal the server handles is recorded in the stats.
//!
//! # Layout
//!
//! One concern a file; `main` only parses, reads the knobs and runs the server.
//!
//! - `cli`: vLLM's `serve` command line and the `--help` text.
//! - `knobs`: the `MOCK_VLLM_*` table and reading it from the environment.
//! - `server`: start-up, the router, and the run that ends in a graceful stop.
//! - `conn`: the accept loop and each connection, with uvicorn's keep-alive timeout.
//! - `signals`: the signal task.
//! - `engine`: the `VLLM::EngineCore` and `VLLM::Worker` processes, and their deaths.
//! - `process`: the grandchild, the pid file and the output flood.
//! - `log`: uvicorn-style output through the log writer thread; exits that flush it.
//! - `state`: `AppState`, the counters and the per-request outcome.
//! - `middleware`: `/v1` counting and key check, access log, `x-request-id`, the `server` and
//!   `vary` headers.
//! - `openai`: vLLM's wire formats, error bodies and request checks.
//! - `ordered`: JSON that keeps its key order, for changing recorded answers.
//! - `tokens`: the stand-in tokenizer: the synthetic answer's tokens, prompt counts, the
//!   vocabulary.
//! - `models`, `metrics`, `responses`, `chat`, `completions`, `tokenize`, `control`: the handlers,
//!   one file per surface.
//! - `stream`: server-sent events, paced, dying or stalling where the knobs say.
//!
//! # Invariants
//!
//! - The recorded fixtures are embedded at build time and sent unchanged unless a token limit or
//!   an abort cuts them short; the stream is split into events once, at start, on blank-line
//!   boundaries, and each event goes out as one body chunk.
//! - Every `/v1` request ends as exactly one of `completed` (its body reached its end) or
//!   `disconnects` (its handler or body was dropped first, a stream cut off by the engine's
//!   death too), so
//!   `requests == completed + disconnects + in flight`.
//! - The server signals and reaps only its engine core, never the worker and never the grandchild
//!   below.
//! - This process never signals or waits for its grandchild: stopping the whole process group is
//!   the supervisor's job, which is what the grandchild is there to test.
//! - Once it runs, only the log writer thread (and the flood thread) writes to stdout and stderr:
//!   the server queues whole lines, in uvicorn's format so that tests and supervisors can wait on
//!   them, and drops them when the queue is full because nobody reads, so that unread output never
//!   stalls a request. Every exit first gives the queue a bounded moment to drain.
//! - JSON bodies keep vLLM's field order, so the wire formats are structs, not JSON maps, and a
//!   recorded answer is changed as `ordered::Json`, which keeps the recorded order.

#![warn(clippy::unwrap_used)]

mod chat;
mod cli;
mod completions;
mod conn;
mod control;
mod engine;
mod knobs;
mod log;
mod metrics;
mod middleware;
mod models;
mod openai;
mod ordered;
mod process;
mod responses;
mod server;
mod signals;
mod state;
mod stream;
mod tokenize;
mod tokens;

use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{Invocation, SHORT_USAGE, VERSION, help_text, parse_command_line};
use crate::knobs::Knobs;
use crate::log::{complain, flush_log, say, start_log_writer};
use crate::server::start;

/// How long the runtime may take to stop once the server is done, in case a task is stuck.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(500);

fn main() -> ExitCode {
    let role = engine::role();
    if role != engine::Role::Server {
        return engine::run_helper(role);
    }
    let cli = match parse_command_line() {
        Ok(Invocation::Serve(cli)) => cli,
        Ok(Invocation::Help) => {
            say(format_args!("{}", help_text()));
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            say(format_args!("{VERSION}"));
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            complain(format_args!("{SHORT_USAGE}\nmock-vllm: error: {message}"));
            return ExitCode::from(2);
        }
    };
    let knobs = match Knobs::from_vars(std::env::vars_os()) {
        Ok(knobs) => knobs,
        Err(errors) => {
            for error in errors {
                complain(format_args!("mock-vllm: error: {error}"));
            }
            return ExitCode::from(2);
        }
    };
    if let Some(code) = knobs.exit_at_start {
        complain(format_args!(
            "{SHORT_USAGE}\nmock-vllm serve: error: exiting with code {code} \
             because MOCK_VLLM_EXIT_AT_START is set"
        ));
        return ExitCode::from(code);
    }
    if let Err(message) = start_log_writer() {
        complain(format_args!("ERROR:    {message}"));
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            complain(format_args!(
                "ERROR:    cannot start the async runtime: {error}"
            ));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(start(cli, knobs));
    engine::stop_engine();
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    if let Err(message) = &result {
        complain(format_args!("ERROR:    {message}"));
    }
    flush_log();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
