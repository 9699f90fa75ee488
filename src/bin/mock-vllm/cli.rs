//! vLLM's `serve` command line, parsed by hand so that every vLLM option is accepted, and the
//! `--help` text.

use crate::knobs::KNOBS;

/// What `/version` and `--version` report; the suffix keeps it from passing for a real vLLM.
pub(crate) const VERSION: &str = "0.0.0+mock";

pub(crate) const SHORT_USAGE: &str = "usage: mock-vllm serve <model> [--host HOST] [--port PORT] \
                           [--api-key KEY] [vLLM options...]";

/// What the command line asked for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Invocation {
    Serve(Cli),
    Help,
    Version,
}

/// The options of `mock-vllm serve` that change what it does.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Cli {
    /// The model name `/v1/models` lists and chat completions report by default.
    pub(crate) served_model: String,
    /// The host to bind, a name or an address, as vLLM's `--host`.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// When set, every `/v1` request must carry it as a bearer token.
    pub(crate) api_key: Option<String>,
}

pub(crate) fn parse_command_line() -> Result<Invocation, String> {
    let args = std::env::args_os()
        .skip(1)
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| format!("argument {arg:?} is not valid UTF-8"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let env_api_key = std::env::var("VLLM_API_KEY")
        .ok()
        .filter(|key| !key.is_empty());
    parse_args(&args, env_api_key)
}

/// Parses vLLM's `serve` command line by hand, because it must accept every vLLM option without
/// knowing them all.
pub(crate) fn parse_args(
    args: &[String],
    env_api_key: Option<String>,
) -> Result<Invocation, String> {
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        return Ok(Invocation::Help);
    }
    if args.iter().any(|arg| arg == "--version") {
        return Ok(Invocation::Version);
    }
    let mut args = args.iter().peekable();
    match args.next().map(String::as_str) {
        Some("serve") => {}
        Some(other) => return Err(format!("unknown command {other:?} (expected 'serve')")),
        None => return Err("missing command (expected 'serve')".to_owned()),
    }
    let mut positional_model = None;
    let mut flag_model = None;
    let mut served_model_name = None;
    let mut host = "0.0.0.0".to_owned();
    let mut port = 8000;
    let mut api_key = None;
    while let Some(arg) = args.next() {
        if !arg.starts_with('-') || arg == "-" {
            // Later positionals can only be extra values of a multi-value vLLM option.
            positional_model.get_or_insert_with(|| arg.clone());
            continue;
        }
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (arg.as_str(), None),
        };
        let value = match inline_value {
            Some(value) => Some(value),
            None => args.next_if(|next| !next.starts_with("--")).cloned(),
        };
        let slot = match name {
            "--host" => &mut host,
            "--port" => {
                let value = require_value(name, value)?;
                port = value
                    .parse()
                    .map_err(|_| format!("argument --port: invalid port: {value:?}"))?;
                continue;
            }
            "--api-key" => api_key.insert(String::new()),
            "--model" => flag_model.insert(String::new()),
            "--served-model-name" => served_model_name.insert(String::new()),
            _ => continue,
        };
        *slot = require_value(name, value)?;
    }
    let model = positional_model
        .or(flag_model)
        .ok_or_else(|| "the model is required: mock-vllm serve <model> [options]".to_owned())?;
    Ok(Invocation::Serve(Cli {
        served_model: served_model_name.unwrap_or(model),
        host,
        port,
        api_key: api_key.or(env_api_key),
    }))
}

pub(crate) fn require_value(name: &str, value: Option<String>) -> Result<String, String> {
    value.ok_or_else(|| format!("argument {name}: expected one argument"))
}

pub(crate) fn help_text() -> String {
    let mut text = format!(
        "mock-vllm {VERSION}: a stand-in for vLLM's OpenAI-compatible API server\n\n\
         {SHORT_USAGE}\n\n\
         Options:\n  \
           --host HOST                 address or name to bind (default 0.0.0.0)\n  \
           --port PORT                 port to bind, 0 for any free one (default 8000)\n  \
           --api-key KEY               require 'Authorization: Bearer KEY' on /v1 (env VLLM_API_KEY)\n  \
           --model MODEL               the model, when not given as the positional argument\n  \
           --served-model-name NAME    the model name /v1/models lists (default the model)\n  \
           -h, --help                  print this help\n  \
           --version                   print the version\n\n\
         Any other vLLM option is accepted and ignored.\n\n\
         Knobs (environment variables):\n"
    );
    for (name, _, help) in KNOBS {
        text.push_str(&format!("  {name:<29} {help}\n"));
    }
    text.push_str(
        "\nLike vLLM, it runs its engine as VLLM::EngineCore and VLLM::Worker processes in its \
         process group, exits 0 a while after its engine died, and dies of SIGHUP; SIGTERM, \
         SIGINT and SIGQUIT stop it gracefully.\n",
    );
    text.push_str(
        "\nTest-control endpoints: GET /_mock/last-request, GET /_mock/stats, \
         POST /_mock/hang-health, POST /_mock/unhang-health, POST /_mock/exit?code=N",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    fn serve(line: &str) -> Cli {
        match parse_args(&args(line), None) {
            Ok(Invocation::Serve(cli)) => cli,
            other => panic!("expected a serve command, got {other:?}"),
        }
    }

    #[test]
    fn serve_defaults_match_vllm() {
        let cli = serve("serve demo-model");
        assert_eq!(cli.served_model, "demo-model");
        assert_eq!(cli.host, "0.0.0.0");
        assert_eq!(cli.port, 8000);
        assert_eq!(cli.api_key, None);
    }

    #[test]
    fn unknown_vllm_options_are_skipped_with_their_values() {
        let cli = serve(
            "serve m --max-model-len 8192 --enforce-eager --tensor-parallel-size=2 \
             --seed -1 -tp 2 --port 9000 --host 127.0.0.1 --api-key k",
        );
        assert_eq!(cli.served_model, "m");
        assert_eq!(cli.port, 9000);
        assert_eq!(cli.host, "127.0.0.1");
        assert_eq!(cli.api_key.as_deref(), Some("k"));
    }

    #[test]
    fn flag_equals_value_form_is_understood() {
        let cli = serve("serve m --port=1234 --api-key=secret");
        assert_eq!(cli.port, 1234);
        assert_eq!(cli.api_key.as_deref(), Some("secret"));
    }

    #[test]
    fn command_line_api_key_wins_over_the_environment() {
        let from_env = parse_args(&args("serve m"), Some("env".to_owned()));
        let from_flag = parse_args(&args("serve m --api-key flag"), Some("env".to_owned()));
        assert!(
            matches!(from_env, Ok(Invocation::Serve(Cli { api_key: Some(ref k), .. })) if k == "env")
        );
        assert!(
            matches!(from_flag, Ok(Invocation::Serve(Cli { api_key: Some(ref k), .. })) if k == "flag")
        );
    }

    #[test]
    fn served_model_name_renames_the_listed_model() {
        assert_eq!(
            serve("serve m --served-model-name alias").served_model,
            "alias"
        );
        assert_eq!(serve("serve --model m").served_model, "m");
    }

    #[test]
    fn a_missing_model_command_or_value_is_an_error() {
        assert!(parse_args(&args(""), None).is_err());
        assert!(parse_args(&args("run m"), None).is_err());
        assert!(parse_args(&args("serve"), None).is_err());
        assert!(parse_args(&args("serve --enforce-eager"), None).is_err());
        assert!(parse_args(&args("serve m --port"), None).is_err());
        assert!(parse_args(&args("serve m --port 99999"), None).is_err());
    }

    #[test]
    fn help_and_version_win_anywhere() {
        assert_eq!(
            parse_args(&args("serve m --help"), None),
            Ok(Invocation::Help)
        );
        assert_eq!(
            parse_args(&args("--version"), None),
            Ok(Invocation::Version)
        );
    }
}
