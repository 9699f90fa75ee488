//! The command line: every flag, its environment variable and its help text.
//!
//! The flags of the configuration keys are made from `config::KEYS` (name, help, default,
//! variables) and kept as text: `config` parses them, so that a bad value is blamed on its flag,
//! and it reads the `GATEWAY_*` variables itself (clap does not), so that a bad one is blamed on
//! the variable and `--help` never prints a value. Nothing here has a default.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand};

pub use crate::config::parse_duration;
use crate::config::{Flag, Flags, KEYS, Key, Kind, Scope};

/// A supervisor and reverse proxy for vLLM's OpenAI-compatible API.
///
/// Without a subcommand, `gateway` proxies to a vLLM that is already running
/// (`gateway --llm-api-base http://127.0.0.1:8000`). `gateway serve <model>` starts vLLM itself.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start `vllm serve <MODEL>` as a supervised child and proxy to it once it is ready.
    Serve(ServeArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Exit 0 when a gateway's /readyz answers 2xx, 1 otherwise (for Docker HEALTHCHECK).
    Healthcheck(HealthcheckArgs),
    /// Internal: stops vLLM's process group if the gateway dies (see `supervisor::guard`).
    #[command(name = "__guard", hide = true)]
    Guard { grace_ms: u64 },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and report every mistake in it, or which run it is fit for.
    Check {
        /// The TOML file to check.
        file: PathBuf,
        /// Judge it as `gateway serve --config FILE` (the systemd unit's command) takes it:
        /// `model` is required, `llm_api_base` refused.
        #[arg(long)]
        serve: bool,
    },
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The readiness URL to probe.
    #[arg(long, default_value = "http://127.0.0.1:9000/readyz")]
    pub url: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// The standalone proxy's options: `--config` and a flag for every key of [`KEYS`] that
/// is not `serve`'s alone.
#[derive(Debug, Clone, Default)]
pub struct ProxyArgs(pub Flags);

/// `gateway serve`'s options: `--config` and a flag (or argument) for every key.
#[derive(Debug, Clone, Default)]
pub struct ServeArgs(pub Flags);

impl Args for ProxyArgs {
    fn augment_args(command: clap::Command) -> clap::Command {
        key_args(command, Scope::All)
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        key_args(command, Scope::All)
    }
}

impl FromArgMatches for ProxyArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(ProxyArgs(flags(matches, Scope::All)))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for ServeArgs {
    fn augment_args(command: clap::Command) -> clap::Command {
        key_args(command, Scope::Serve)
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        key_args(command, Scope::Serve)
    }
}

impl FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(ServeArgs(flags(matches, Scope::Serve)))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// Whether a command with `scope` (`All`: the standalone proxy; `Serve`: `gateway serve`) takes
/// a key as a flag.
fn takes(scope: Scope, key: &Key) -> bool {
    scope == Scope::Serve || key.scope == Scope::All
}

/// `--config`, then one argument per key, its help made from the table.
fn key_args(mut command: clap::Command, scope: Scope) -> clap::Command {
    command = command.arg(
        // GATEWAY_CONFIG is read in `flags`, where an empty one counts as unset (clap would
        // refuse it as a missing value).
        Arg::new("config")
            .long("config")
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .help("TOML configuration file; flags and environment variables override its keys [env: GATEWAY_CONFIG]"),
    );
    for key in KEYS.iter().filter(|key| takes(scope, key)) {
        command = command.arg(key_arg(key));
    }
    command
}

fn key_arg(key: &Key) -> Arg {
    let mut help = key.doc.to_string();
    match (key.default_doc, key.default) {
        (Some(text), _) | (None, Some(text)) => help.push_str(&format!(" [default: {text}]")),
        (None, None) => {}
    }
    if !key.env.is_empty() {
        help.push_str(&format!(" [env: {}]", key.env.join(", ")));
    }
    let list = matches!(key.kind, Kind::Texts | Kind::Integers);
    let arg = Arg::new(key.name)
        .help(help)
        .value_parser(clap::value_parser!(String))
        .action(if list {
            ArgAction::Append
        } else {
            ArgAction::Set
        });
    match key.flag {
        Flag::Long(long, value_name) => {
            let arg = arg.long(long).value_name(value_name);
            // A list flag is repeatable, and takes commas too where no value holds one; a value
            // that may be a credential (or an environment entry such as `CUDA_VISIBLE_DEVICES=0,1`)
            // is taken whole: `--api-key sk-a,b` is one key, not `sk-a` and a key `b`.
            if list && !key.secret {
                arg.value_delimiter(',')
            } else {
                arg
            }
        }
        Flag::Positional(value_name) => arg.value_name(value_name),
        Flag::Trailing(value_name) => arg.value_name(value_name).last(true).num_args(1..),
    }
}

/// The values given for each key, as text (parsed by `config`, which knows where they came from).
fn flags(matches: &ArgMatches, scope: Scope) -> Flags {
    let mut flags = Flags::default();
    flags.config = match matches.try_get_one::<PathBuf>("config") {
        Ok(Some(path)) => Some(path.clone()),
        _ => std::env::var_os("GATEWAY_CONFIG")
            .filter(|path| !path.is_empty())
            .map(PathBuf::from),
    };
    for key in KEYS.iter().filter(|key| takes(scope, key)) {
        if let Ok(Some(values)) = matches.try_get_many::<String>(key.name) {
            flags.set(key.name, values.cloned());
        }
    }
    flags
}
