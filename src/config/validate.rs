//! From merged [`Values`] to a [`Config`]: the checks that involve more than one value or the
//! mode (the upstream, the ports, the restart delays), and the typed parts (addresses, secrets,
//! CORS origins, the child's environment). Each mistake is blamed on where its value came from.

use std::net::{IpAddr, SocketAddr};

use std::time::Duration;

use super::load::Values;
use super::table::KEYS;
use super::{
    Config, ConfigError, ConfigErrors, HealthConfig, LogConfig, Mode, ProxyConfig, ServeConfig,
    UpstreamConfig,
};

/// Builds the configuration, or reports every mistake of `values` and of the checks here.
pub(super) fn build(values: Values, mode: Mode) -> Result<Config, ConfigErrors> {
    let mut errors = values.errors.clone();
    let mut error = |key: &str, message: String| {
        errors.push(ConfigError {
            origin: values.origin(key),
            key: Some(key.into()),
            message,
        });
    };

    let host = values.value::<String>("host").unwrap_or_default();
    let port: u16 = values.value("port").unwrap_or_default();
    let llm_api_base = values.value::<String>("llm_api_base");
    let model = values.value::<String>("model");
    let vllm_port: u16 = values.value("vllm_port").unwrap_or_default();

    let ip: Option<IpAddr> = match host.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            error(
                "host",
                format!("expected an IP address such as 0.0.0.0 or ::1, got {host:?}"),
            );
            None
        }
    };
    // Whether the gateway starts vLLM itself; `config check` judges a file by what it holds.
    let serves = match mode {
        Mode::Serve => true,
        Mode::Standalone => false,
        Mode::Check => llm_api_base.is_none(),
    };
    let base = match (mode, &llm_api_base) {
        (Mode::Serve, Some(_)) => {
            error(
                "llm_api_base",
                "cannot be used with `serve`: the gateway proxies to the vLLM it starts".into(),
            );
            None
        }
        (Mode::Serve | Mode::Check, None) => Some(format!("http://127.0.0.1:{vllm_port}")),
        (_, Some(url)) => match normalise_base_url(url) {
            Ok(base) => Some(base),
            Err(message) => {
                error("llm_api_base", message);
                None
            }
        },
        (Mode::Standalone, None) => {
            error(
                "llm_api_base",
                "is required: pass --llm-api-base http://127.0.0.1:8000, or use `gateway serve`"
                    .into(),
            );
            None
        }
    };
    if mode == Mode::Serve && model.as_deref().is_none_or(str::is_empty) {
        error(
            "model",
            "is required: `gateway serve <MODEL>` or `model = \"...\"` in the config file".into(),
        );
    }
    let origins = values
        .value::<Vec<String>>("cors_allowed_origins")
        .unwrap_or_default();
    if !origins.iter().any(|origin| origin == "*") {
        for origin in &origins {
            // A browser's Origin is scheme://host[:port], never with a path or a trailing slash.
            let host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            if host.is_none_or(|host| host.is_empty() || host.contains('/'))
                || http::HeaderValue::from_str(origin).is_err()
            {
                error(
                    "cors_allowed_origins",
                    format!(
                        "expected origins like \"https://app.example\" or \"*\", got {origin:?}"
                    ),
                );
            }
        }
    }
    // A key goes in `Authorization: Bearer KEY`, one token: one with a space or a byte that is not
    // ASCII could be given but never matched (a client's is read trimmed, as ASCII).
    let token = |key: &str| !key.is_empty() && key.bytes().all(|byte| byte.is_ascii_graphic());
    if !values
        .value::<Vec<String>>("api_keys")
        .unwrap_or_default()
        .iter()
        .all(|key| token(key))
    {
        error(
            "api_keys",
            "every key must be printable ASCII, without spaces".into(),
        );
    }
    if values
        .value::<String>("upstream_api_key")
        .is_some_and(|key| !token(&key))
    {
        error(
            "upstream_api_key",
            "must be printable ASCII, without spaces".into(),
        );
    }
    if serves && vllm_port != 0 && vllm_port == port {
        // Blamed on the key that was set, so that `port = 8000` alone (vLLM's default port) names
        // the file's line rather than a key nobody set.
        if values.is_set("port") && !values.is_set("vllm_port") {
            error(
                "port",
                format!(
                    "must differ from vllm_port ({vllm_port}, its default): vLLM listens there behind the gateway"
                ),
            );
        } else {
            error(
                "vllm_port",
                format!("must differ from port ({port}): vLLM listens there behind the gateway"),
            );
        }
    }
    let health_port: u16 = values.value("health_port").unwrap_or_default();
    if health_port != 0 {
        if health_port == port {
            error(
                "health_port",
                format!("must differ from port ({port}): the health listener is a second one"),
            );
        } else if serves && health_port == vllm_port {
            error(
                "health_port",
                format!("must differ from vllm_port ({vllm_port}): vLLM listens there"),
            );
        }
    }
    let restart_delay: Duration = values.value("restart_delay").unwrap_or_default();
    let restart_max_delay: Duration = values.value("restart_max_delay").unwrap_or_default();
    if restart_delay > restart_max_delay {
        error(
            "restart_delay",
            format!(
                "must not exceed restart_max_delay ({})",
                humantime::format_duration(restart_max_delay)
            ),
        );
    }
    let log_level = values.value::<String>("log_level").unwrap_or_default();
    // An empty filter parses, and lets through errors alone.
    if log_level.trim().is_empty() || log_level.parse::<tracing_subscriber::EnvFilter>().is_err() {
        error(
            "log_level",
            format!(
                "expected a level or filter such as \"info\" or \"gateway=debug\", got {log_level:?}"
            ),
        );
    }
    if values
        .value::<String>("vllm_bin")
        .is_some_and(|bin| bin.trim().is_empty())
    {
        error(
            "vllm_bin",
            "expected vLLM's executable, a name on PATH or a path, got an empty string".into(),
        );
    }
    // An exit status is 0 to 255 (a signal's death is reported as 128 + N).
    if let Some(code) = values
        .value::<Vec<i32>>("restart_prevent_exit_codes")
        .unwrap_or_default()
        .into_iter()
        .find(|code| !(0..=255).contains(code))
    {
        error(
            "restart_prevent_exit_codes",
            format!("exit codes are 0 to 255, got {code}"),
        );
    }
    // A standalone proxy in front of its own address would forward every request to itself.
    if let (Some(ip), Some(base)) = (ip, &base)
        && !serves
    {
        if port != 0 && is_own_address(base, ip, port) {
            error(
                "llm_api_base",
                format!(
                    "names the gateway's own address (port {port}): it would forward to itself"
                ),
            );
        } else if health_port != 0 && is_own_address(base, ip, health_port) {
            error(
                "llm_api_base",
                format!(
                    "names the gateway's own health port ({health_port}), which serves no model"
                ),
            );
        }
    }
    for pair in &values.value::<Vec<String>>("child_env").unwrap_or_default() {
        match pair.split_once('=') {
            Some((name, value))
                if !name.is_empty() && !name.contains('\0') && !value.contains('\0') => {}
            // The value may be a secret (HF_TOKEN=...): only the name is repeated.
            Some((name, _)) if !name.is_empty() && !name.contains('\0') => error(
                "child_env",
                format!("expected NAME=VALUE, got a NUL byte in the value of {name:?}"),
            ),
            _ => error(
                "child_env",
                "expected NAME=VALUE, got an entry without a name (or without `=`)".to_string(),
            ),
        }
    }

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let (Some(ip), Some(base)) = (ip, base) else {
        unreachable!("every None above pushed an error")
    };
    let mut config = Config {
        file: values.file.clone(),
        file_keys: values.file_keys,
        overridden: values.overridden.clone(),
        listen: SocketAddr::new(ip, port),
        health_port: None,
        upstream: UpstreamConfig {
            base,
            api_key: None,
        },
        proxy: ProxyConfig::default(),
        health: HealthConfig::default(),
        drain_timeout: Duration::ZERO,
        log: LogConfig::default(),
        metrics_merge_upstream: false,
        serve: (mode == Mode::Serve).then(ServeConfig::default),
    };
    // Every other field is its key's value, or the blank for a key nobody set that has no
    // default (no upstream key, no CORS, no connection limit).
    for key in KEYS {
        if let (Some(set), Some(value)) = (key.set, values.get(key.name)) {
            let fits = set(&mut config, value);
            debug_assert!(fits, "the table gives {} a value of another type", key.name);
        }
    }
    Ok(config)
}

/// Whether the upstream `base` (normalised) is an address the gateway listens on: its port, on
/// the listening address itself, or on loopback when it listens on every address. (A vLLM on
/// 127.0.0.1 behind a gateway on another address and the same port is no loop.)
fn is_own_address(base: &str, listen_ip: IpAddr, listen_port: u16) -> bool {
    let Ok(url) = reqwest::Url::parse(base) else {
        return false;
    };
    if url.port_or_known_default() != Some(listen_port) {
        return false;
    }
    let listens_on =
        |ip: IpAddr| ip == listen_ip || (listen_ip.is_unspecified() && ip.is_loopback());
    let host = url.host_str().unwrap_or_default();
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => listens_on(ip),
        Err(_) => {
            host.eq_ignore_ascii_case("localhost")
                && [
                    IpAddr::from([127, 0, 0, 1]),
                    IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                ]
                .into_iter()
                .any(listens_on)
        }
    }
}

/// Accepts `http(s)://host[:port][/prefix][/v1][/]` and returns it without the `/v1` and slash.
pub(super) fn normalise_base_url(url: &str) -> Result<String, String> {
    let expected = "expected an http:// URL such as http://127.0.0.1:8000";
    // Credentials in the URL would be logged with it (and are not how vLLM takes a key).
    if url.split_once("://").is_some_and(|(_, rest)| {
        rest.split('/')
            .next()
            .is_some_and(|authority| authority.contains('@'))
    }) {
        return Err(format!(
            "{expected}, without credentials (use upstream_api_key for vLLM's key)"
        ));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("{expected}, got {url:?}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        // The gateway sits beside vLLM (same host or pod); it carries no TLS client.
        Some("https") => {
            return Err(format!(
                "https upstreams are not supported (the gateway runs beside vLLM and speaks plain HTTP to it), got {url:?}"
            ));
        }
        _ => return Err(format!("{expected}, got {url:?}")),
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{expected}, got {url:?}"));
    };
    if uri.query().is_some() {
        return Err(format!("{expected}, without a query (`?...`), got {url:?}"));
    }
    // The URI parser drops a fragment silently; the upstream client would keep it in every request.
    if url.contains('#') {
        return Err(format!(
            "{expected}, without a fragment (`#...`), got {url:?}"
        ));
    }
    // Checked here, naming the key, rather than failing at start-up with a bare "invalid port".
    // (`Authority::port` cannot tell a bad port from none, so the text after the last `:` is read,
    // unless that colon is inside an IPv6 address.)
    let port = authority
        .as_str()
        .rsplit_once(':')
        .map(|(_, port)| port)
        .filter(|port| !port.is_empty() && !port.contains(']'));
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(1..))
    {
        return Err(format!(
            "the port must be a number from 1 to 65535, got {port:?} in {url:?}"
        ));
    }
    let mut base = url.trim_end_matches('/');
    if let Some(stripped) = base.strip_suffix("/v1") {
        base = stripped;
    }
    let base = base.trim_end_matches('/').to_string();
    // The upstream client parses the base once more at start: whatever it would refuse is refused
    // now, with the key's name.
    if let Err(error) = reqwest::Url::parse(&base) {
        return Err(format!("{expected}, got {url:?} ({error})"));
    }
    Ok(base)
}
