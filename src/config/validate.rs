//! From merged [`Values`] to a [`Config`]: the checks that involve more than one value or the
//! mode (the upstream, the ports, the restart delays), and the typed parts (addresses, secrets,
//! CORS origins, the child's environment). Each mistake is blamed on where its value came from.

use std::net::{IpAddr, SocketAddr};

use super::load::Values;
use super::{
    BackoffConfig, Config, ConfigError, ConfigErrors, Cors, HealthConfig, LogConfig, LogFormat,
    Mode, ProxyConfig, RestartPolicy, Secret, ServeConfig, UpstreamConfig,
};

/// Builds the configuration, or reports every mistake of `values` and of the checks here.
pub(super) fn build(values: Values, mode: Mode) -> Result<Config, ConfigErrors> {
    let mut errors = values.errors.clone();
    let mut error = |key: &str, message: String| {
        errors.push(ConfigError {
            origin: values.origin(key),
            key: key.into(),
            message,
        });
    };

    let host = values.text("host").unwrap_or_default();
    let port: u16 = values.integer("port").unwrap_or_default();
    let llm_api_base = values.text("llm_api_base");
    let model = values.text("model");
    let vllm_port: u16 = values.integer("vllm_port").unwrap_or_default();

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
    let origins = values.texts("cors_allowed_origins");
    let cors = if origins.is_empty() {
        None
    } else if origins.iter().any(|origin| origin == "*") {
        Some(Cors::AnyOrigin)
    } else {
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
        Some(Cors::Origins(origins))
    };
    let api_keys = values.texts("api_keys");
    let mut api_key_secrets = Vec::with_capacity(api_keys.len());
    for key in api_keys {
        if key.is_empty() || http::HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
            error(
                "api_keys",
                "every key must be non-empty printable ASCII".into(),
            );
        } else {
            api_key_secrets.push(Secret(key));
        }
    }
    let upstream_api_key = values.text("upstream_api_key");
    if let Some(key) = &upstream_api_key {
        if http::HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
            error("upstream_api_key", "must be printable ASCII".into());
        }
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
    let restart_delay = values.duration("restart_delay");
    let restart_max_delay = values.duration("restart_max_delay");
    if restart_delay > restart_max_delay {
        error(
            "restart_delay",
            format!(
                "must not exceed restart_max_delay ({})",
                humantime::format_duration(restart_max_delay)
            ),
        );
    }
    let log_level = values.text("log_level").unwrap_or_default();
    if log_level.parse::<tracing_subscriber::EnvFilter>().is_err() {
        error(
            "log_level",
            format!(
                "expected a level or filter such as \"info\" or \"gateway=debug\", got {log_level:?}"
            ),
        );
    }
    let child_env = values.texts("child_env");
    let mut child_env_pairs = Vec::with_capacity(child_env.len());
    for pair in &child_env {
        match pair.split_once('=') {
            Some((name, value))
                if !name.is_empty() && !name.contains('\0') && !value.contains('\0') =>
            {
                child_env_pairs.push((name.to_string(), value.to_string()));
            }
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
    // Choices were checked against these very names when they were read.
    let log_format = values
        .text("log_format")
        .and_then(|name| name.parse().ok())
        .unwrap_or(LogFormat::Auto);
    let restart = values
        .text("restart")
        .and_then(|name| name.parse().ok())
        .unwrap_or(RestartPolicy::OnFailure);
    let serve = (mode == Mode::Serve).then(|| ServeConfig {
        model: model.unwrap_or_default(),
        vllm_bin: values.text("vllm_bin").unwrap_or_default(),
        vllm_port,
        vllm_args: values.texts("vllm_args"),
        child_env: child_env_pairs,
        restart,
        backoff: BackoffConfig {
            delay: restart_delay,
            max_delay: restart_max_delay,
            reset_after: values.duration("restart_reset_after"),
            max_restarts: values.integer("max_restarts").unwrap_or_default(),
        },
        restart_prevent_exit_codes: values.integers("restart_prevent_exit_codes"),
        startup_poll_interval: values.duration("startup_poll_interval"),
        startup_timeout: values.duration("startup_timeout"),
        health_failures: values.integer("health_failures").unwrap_or(1),
        ready_wait_timeout: values.duration("ready_wait_timeout"),
        stop_timeout: values.duration("stop_timeout"),
    });
    Ok(Config {
        file: values.file.clone(),
        listen: SocketAddr::new(ip, port),
        upstream: UpstreamConfig {
            base,
            api_key: upstream_api_key.map(Secret),
        },
        proxy: ProxyConfig {
            api_keys: api_key_secrets,
            max_body_bytes: values.integer("max_body_bytes").unwrap_or(1),
            connect_timeout: values.duration("connect_timeout"),
            request_timeout: values.duration("request_timeout"),
            first_byte_timeout: values.duration("first_byte_timeout"),
            stream_idle_timeout: values.duration("stream_idle_timeout"),
            pool_idle_timeout: values.duration("pool_idle_timeout"),
            cors,
            client_header_timeout: values.duration("client_header_timeout"),
            client_idle_timeout: values.duration("client_idle_timeout"),
            client_send_timeout: values.duration("client_send_timeout"),
            max_connections: values.integer("max_connections"),
        },
        health: HealthConfig {
            interval: values.duration("health_interval"),
            timeout: values.duration("health_timeout"),
        },
        drain_timeout: values.duration("drain_timeout"),
        log: LogConfig {
            level: log_level,
            format: log_format,
            access_log: values.boolean("access_log"),
        },
        metrics_merge_upstream: values.boolean("metrics_merge_upstream"),
        serve,
    })
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
    if let Some(port) = port {
        if !matches!(port.parse::<u16>(), Ok(1..)) {
            return Err(format!(
                "the port must be a number from 1 to 65535, got {port:?} in {url:?}"
            ));
        }
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
