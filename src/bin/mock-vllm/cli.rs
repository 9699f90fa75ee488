//! vLLM's `serve` command line, parsed by hand so that every vLLM option is accepted, and the
//! `--help` text.

use crate::knobs::KNOBS;

/// What `/version` and `--version` report; the suffix keeps it from passing for a real vLLM.
pub(crate) const VERSION: &str = "0.0.0+mock";

pub(crate) const SHORT_USAGE: &str = "usage: mock-vllm serve <model> [--host HOST] [--port PORT] \
                           [--api-key KEY [KEY ...]] [vLLM options...]";

/// The context length `/v1/models` reports without `--max-model-len`, a common vLLM setting.
pub(crate) const DEFAULT_MAX_MODEL_LEN: u64 = 8192;

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
    /// The model as given (positional or `--model`), which `/v1/models` reports as each card's
    /// `root`.
    pub(crate) model: String,
    /// The names the model is served under (`--served-model-name`, by default the model itself):
    /// `/v1/models` lists one card per name and a request may name any of them.
    pub(crate) served_model_names: Vec<String>,
    /// The host to bind, a name or an address, as vLLM's `--host`.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// When not empty, every `/v1` request must carry one of them as a bearer token.
    pub(crate) api_keys: Vec<String>,
    /// The context length `/v1/models` reports (`--max-model-len`).
    pub(crate) max_model_len: u64,
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
    let mut served_model_names = None;
    let mut host = "0.0.0.0".to_owned();
    let mut port = 8000;
    let mut api_keys = None;
    let mut max_model_len = None;
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
        let has_inline_value = inline_value.is_some();
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
            "--max-model-len" => {
                max_model_len = parse_max_model_len(&require_value(name, value)?)?;
                continue;
            }
            "--api-key" | "--served-model-name" => {
                let Some(first) = value else {
                    return Err(format!("argument {name}: expected at least one argument"));
                };
                // Both take several values in vLLM (argparse's nargs='+'): every following
                // argument up to the next option, unless the first came as `--flag=value`.
                let mut values = vec![first];
                if !has_inline_value {
                    while let Some(next) = args.next_if(|next| !next.starts_with('-')) {
                        values.push(next.clone());
                    }
                }
                let list = if name == "--api-key" {
                    &mut api_keys
                } else {
                    &mut served_model_names
                };
                *list = Some(values);
                continue;
            }
            "--model" => flag_model.insert(String::new()),
            _ => continue,
        };
        *slot = require_value(name, value)?;
    }
    let model = positional_model
        .or(flag_model)
        .ok_or_else(|| "the model is required: mock-vllm serve <model> [options]".to_owned())?;
    // As vLLM: keys from the command line win over the environment's, and empty ones are dropped.
    let api_keys = api_keys
        .unwrap_or_else(|| env_api_key.into_iter().collect())
        .into_iter()
        .filter(|key| !key.is_empty())
        .collect();
    Ok(Invocation::Serve(Cli {
        served_model_names: served_model_names.unwrap_or_else(|| vec![model.clone()]),
        model,
        host,
        port,
        api_keys,
        max_model_len: max_model_len.unwrap_or(DEFAULT_MAX_MODEL_LEN),
    }))
}

impl Cli {
    /// The first served name, which answers report as their model, as vLLM's do.
    pub(crate) fn served_model(&self) -> &str {
        self.served_model_names.first().unwrap_or(&self.model)
    }
}

/// Parses `--max-model-len` as vLLM does (`human_readable_int_or_auto`): a whole number, one
/// with a decimal suffix (`1k` is 1000, `25.6k` 25600) or a binary one (`1K` is 1024), or `-1`
/// or `auto` for the model's own length, which gives `None` (and here the default length).
pub(crate) fn parse_max_model_len(value: &str) -> Result<Option<u64>, String> {
    let invalid =
        || format!("argument --max-model-len: invalid human_readable_int_or_auto value: '{value}'");
    let trimmed = value.trim();
    if trimmed == "-1" || trimmed.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    let digits = |text: &str| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit());
    // The last character, on a character boundary so that no input can make the split panic.
    let suffix_at = trimmed.char_indices().next_back().map_or(0, |(at, _)| at);
    let (number, suffix) = trimmed.split_at(suffix_at);
    let is_decimal = match number.split_once('.') {
        Some((whole, fraction)) => digits(whole) && digits(fraction),
        None => digits(number),
    };
    let power = match suffix {
        "k" | "K" => 1,
        "m" | "M" => 2,
        "g" | "G" => 3,
        "t" | "T" => 4,
        _ => 0,
    };
    if power == 0 || !is_decimal {
        return trimmed.parse().map(Some).map_err(|_| invalid());
    }
    if suffix.bytes().all(|byte| byte.is_ascii_lowercase()) {
        // Python's `int(float(number) * 10**n)`, which truncates as `as` does.
        let number: f64 = number.parse().map_err(|_| invalid())?;
        return Ok(Some((number * 1000f64.powi(power)) as u64));
    }
    if !digits(number) {
        return Err(format!(
            "argument --max-model-len: Decimals are not allowed with binary suffixes like \
             {suffix}. Did you mean to use {number}{} instead?",
            suffix.to_ascii_lowercase()
        ));
    }
    number
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(1u64 << (10 * power)))
        .map(Some)
        .ok_or_else(invalid)
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
           --api-key KEY [KEY ...]     require 'Authorization: Bearer KEY' on /v1, any of the keys \
                                       (env VLLM_API_KEY)\n  \
           --model MODEL               the model, when not given as the positional argument\n  \
           --served-model-name NAME [NAME ...]\n                              \
                                       the names /v1/models lists; answers report the first \
                                       (default the model)\n  \
           --max-model-len N           the max_model_len /v1/models reports (default 8192; \
                                       1k, 1K and auto as in vLLM)\n  \
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
        assert_eq!(cli.model, "demo-model");
        assert_eq!(cli.served_model_names, ["demo-model"]);
        assert_eq!(cli.host, "0.0.0.0");
        assert_eq!(cli.port, 8000);
        assert!(cli.api_keys.is_empty());
        assert_eq!(cli.max_model_len, DEFAULT_MAX_MODEL_LEN);
    }

    #[test]
    fn unknown_vllm_options_are_skipped_with_their_values() {
        let cli = serve(
            "serve m --dtype half --enforce-eager --tensor-parallel-size=2 \
             --seed -1 -tp 2 --port 9000 --host 127.0.0.1 --api-key k",
        );
        assert_eq!(cli.model, "m");
        assert_eq!(cli.port, 9000);
        assert_eq!(cli.host, "127.0.0.1");
        assert_eq!(cli.api_keys, ["k"]);
    }

    #[test]
    fn flag_equals_value_form_is_understood() {
        let cli = serve("serve m --port=1234 --api-key=secret --max-model-len=2048");
        assert_eq!(cli.port, 1234);
        assert_eq!(cli.api_keys, ["secret"]);
        assert_eq!(cli.max_model_len, 2048);
    }

    #[test]
    fn command_line_api_keys_win_over_the_environment() {
        let keys = |line: &str| match parse_args(&args(line), Some("env".to_owned())) {
            Ok(Invocation::Serve(cli)) => cli.api_keys,
            other => panic!("expected a serve command, got {other:?}"),
        };
        assert_eq!(keys("serve m"), ["env"]);
        assert_eq!(keys("serve m --api-key flag"), ["flag"]);
    }

    #[test]
    fn served_model_name_renames_the_listed_model() {
        let cli = serve("serve m --served-model-name alias");
        assert_eq!(cli.served_model_names, ["alias"]);
        assert_eq!(cli.served_model(), "alias");
        assert_eq!(cli.model, "m");
        assert_eq!(serve("serve --model m").served_model(), "m");
    }

    /// Regression: only the first of several names or keys was kept, where vLLM (argparse's
    /// nargs='+') takes every argument up to the next option.
    #[test]
    fn served_model_name_and_api_key_take_every_value_up_to_the_next_option() {
        let cli = serve("serve m --served-model-name tiny alias2 --api-key k1 k2 k3 --port 9000");
        assert_eq!(cli.served_model_names, ["tiny", "alias2"]);
        assert_eq!(cli.served_model(), "tiny");
        assert_eq!(cli.api_keys, ["k1", "k2", "k3"]);
        assert_eq!(cli.port, 9000);
        // As in argparse, the `--flag=value` form takes that one value and no more.
        assert_eq!(
            serve("serve m --served-model-name=tiny alias2").served_model_names,
            ["tiny"]
        );
        // A later use replaces an earlier one, as argparse's last value wins.
        assert_eq!(serve("serve m --api-key a b --api-key c").api_keys, ["c"]);
    }

    #[test]
    fn empty_api_keys_are_dropped_as_vllm_drops_them() {
        let cli = match parse_args(
            &[
                "serve".to_owned(),
                "m".to_owned(),
                "--api-key".to_owned(),
                String::new(),
            ],
            Some("env".to_owned()),
        ) {
            Ok(Invocation::Serve(cli)) => cli,
            other => panic!("expected a serve command, got {other:?}"),
        };
        assert!(cli.api_keys.is_empty());
    }

    #[test]
    fn max_model_len_reads_vllms_human_readable_forms() {
        assert_eq!(serve("serve m --max-model-len 1024").max_model_len, 1024);
        assert_eq!(serve("serve m --max-model-len 1k").max_model_len, 1000);
        assert_eq!(serve("serve m --max-model-len 2K").max_model_len, 2048);
        assert_eq!(serve("serve m --max-model-len 25.6k").max_model_len, 25_600);
        assert_eq!(serve("serve m --max-model-len 1M").max_model_len, 1 << 20);
        for auto in ["auto", "-1"] {
            let cli = serve(&format!("serve m --max-model-len {auto}"));
            assert_eq!(cli.max_model_len, DEFAULT_MAX_MODEL_LEN);
        }
    }

    #[test]
    fn a_bad_max_model_len_is_an_argparse_error() {
        assert_eq!(
            parse_args(&args("serve m --max-model-len abc"), None),
            Err(
                "argument --max-model-len: invalid human_readable_int_or_auto value: 'abc'"
                    .to_owned()
            )
        );
        assert_eq!(
            parse_args(&args("serve m --max-model-len 1.5K"), None),
            Err(
                "argument --max-model-len: Decimals are not allowed with binary suffixes like \
                 K. Did you mean to use 1.5k instead?"
                    .to_owned()
            )
        );
        assert!(parse_args(&args("serve m --max-model-len"), None).is_err());
        assert!(parse_args(&args("serve m --max-model-len -5"), None).is_err());
        assert!(parse_args(&args("serve m --max-model-len 10é"), None).is_err());
    }

    #[test]
    fn a_missing_model_command_or_value_is_an_error() {
        assert!(parse_args(&args(""), None).is_err());
        assert!(parse_args(&args("run m"), None).is_err());
        assert!(parse_args(&args("serve"), None).is_err());
        assert!(parse_args(&args("serve --enforce-eager"), None).is_err());
        assert!(parse_args(&args("serve m --port"), None).is_err());
        assert!(parse_args(&args("serve m --port 99999"), None).is_err());
        assert_eq!(
            parse_args(&args("serve m --served-model-name"), None),
            Err("argument --served-model-name: expected at least one argument".to_owned())
        );
        assert!(parse_args(&args("serve m --api-key --port 1"), None).is_err());
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
