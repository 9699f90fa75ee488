//! Spawning and signalling the vLLM child.
//!
//! The child is spawned as the leader of a new process group. If the gateway dies, `guard` stops
//! that group. The child gets no parent-death signal (PR_SET_PDEATHSIG): that signal fires when
//! the *thread* that forked the child ends, and an in-place upgrade (`upgrade`) ends every thread
//! but one, so it would take vLLM down with the old image.
//! Every signal goes to the whole group; ESRCH (nobody left) counts as success.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::config::ServeConfig;
use crate::lifecycle::state::ExitInfo;
use crate::supervisor::reaper;

/// Environment variables that belong to the gateway's own service manager, never to vLLM.
const SYSTEMD_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// A running child.
pub struct Spawned {
    pub pid: u32,
    /// Resolves when the reaper collected the child.
    pub exit: oneshot::Receiver<ExitInfo>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// The command line: `<vllm_bin> serve <model> --host 127.0.0.1 --port <port> <args>`.
pub fn command(serve: &ServeConfig) -> Command {
    let mut command = Command::new(&serve.vllm_bin);
    command
        .arg("serve")
        .arg(&serve.model)
        .args(["--host", "127.0.0.1", "--port"])
        .arg(serve.vllm_port.to_string())
        .args(&serve.vllm_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for name in SYSTEMD_VARS {
        command.env_remove(name);
    }
    command.env_remove(crate::upgrade::handover::ENV_VAR);
    // vLLM gives up on its engine after VLLM_ENGINE_READY_TIMEOUT_S (600 s by default); a model
    // that may take startup_timeout to load must not be cut short by that.
    if std::env::var_os("VLLM_ENGINE_READY_TIMEOUT_S").is_none() {
        command.env(
            "VLLM_ENGINE_READY_TIMEOUT_S",
            serve.startup_timeout.as_secs().max(1).to_string(),
        );
    }
    for (name, value) in &serve.child_env {
        command.env(name, value);
    }
    unblock_signals_in_child(&mut command);
    command
}

/// Makes `command` start with no signal blocked. The gateway's threads block the signals it
/// handles, all but the one that takes them (see `signals`), and a child inherits the mask
/// of the thread that forks it: vLLM would then never see the SIGTERM that stops it.
pub fn unblock_signals_in_child(command: &mut Command) {
    // SAFETY: between fork and exec only sigprocmask is called, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&nix::sys::signal::SigSet::empty()),
                None,
            )?;
            Ok(())
        });
    }
}

/// The program and arguments, for the log.
///
/// Shown as `***`: the values of any option whose name says it is secret (`--api-key`,
/// `--hf-token`, ...), in the `--flag=value` form, and in the `--flag value...` form the word after
/// it (whatever it starts with) and every word up to the next option, since some (vLLM's
/// `--api-key`) take a list; the password of a URL (`http://user:***@host`) in any word; and in a
/// JSON object (`--kv-transfer-config '{...}'`), the value of every field whose name says it is
/// secret, at any depth.
pub fn describe(command: &Command) -> String {
    let mut words: Vec<String> = vec![command.get_program().to_string_lossy().into_owned()];
    // Whether the next word is a secret option's value: its first (`Some(true)`), or a further
    // one of a list (`Some(false)`).
    let mut hiding = None;
    for arg in command.get_args() {
        let arg = arg.to_string_lossy();
        if hiding == Some(true) || (hiding.is_some() && !arg.starts_with('-')) {
            hiding = Some(false);
            words.push("***".into());
            continue;
        }
        match arg.split_once('=') {
            Some((flag, _)) if is_secret_option(flag) => {
                hiding = None;
                words.push(format!("{flag}=***"));
            }
            _ => {
                hiding = is_secret_option(&arg).then_some(true);
                words.push(hide_in_value(&arg));
            }
        }
    }
    words.join(" ")
}

/// `word` with the secrets inside it hidden: a URL's password, and a JSON object's secret fields.
fn hide_in_value(word: &str) -> String {
    if word.trim_start().starts_with('{')
        && let Ok(mut object) = serde_json::from_str::<serde_json::Value>(word)
        && object.is_object()
    {
        hide_json_secrets(&mut object);
        return object.to_string();
    }
    hide_url_passwords(word)
}

/// Every `scheme://user:password@` in `text`, with the password as `***`.
fn hide_url_passwords(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        shown.push_str(before);
        let authority_end = after.find(['/', '?', '#', ' ', '"']).unwrap_or(after.len());
        match after[..authority_end].rfind('@') {
            Some(userinfo_end) => {
                let userinfo = &after[..userinfo_end];
                match userinfo.split_once(':') {
                    Some((user, _)) => shown.push_str(&format!("{user}:***")),
                    None => shown.push_str(userinfo),
                }
                rest = &after[userinfo_end..];
            }
            None => rest = after,
        }
    }
    shown.push_str(rest);
    shown
}

/// Hides the value of every field whose name says it is secret, at any depth, and the URL
/// passwords in every other string.
fn hide_json_secrets(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => {
            for (name, field) in fields.iter_mut() {
                if is_secret_name(name) {
                    *field = serde_json::Value::String("***".into());
                } else {
                    hide_json_secrets(field);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(hide_json_secrets),
        serde_json::Value::String(text) => *text = hide_url_passwords(text),
        _ => {}
    }
}

/// Whether an option's value is a secret: its name says so ([`is_secret_name`]: `--api-key`,
/// `--hf-token`, `--client-secret`).
fn is_secret_option(word: &str) -> bool {
    word.strip_prefix("--").is_some_and(is_secret_name)
}

/// Whether a name (of an option, of a JSON field, of a query parameter) ends in `key`, `token`,
/// `secret`, `password`, `passwd`, `pwd`, `auth`, `authorization`, `credential(s)` or
/// `signature`, whatever the case.
pub(super) fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "key",
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "auth",
        "authorization",
        "credential",
        "credentials",
        "signature",
    ]
    .iter()
    .any(|secret| name.ends_with(secret))
}

/// Spawns `command`, registering its pid with the reaper before any SIGCHLD for it can be
/// handled. The fork happens on a blocking thread: it may take a while for a large gateway.
pub async fn spawn(mut command: Command) -> std::io::Result<Spawned> {
    tokio::task::spawn_blocking(move || spawn_now(&mut command))
        .await
        .map_err(|_| std::io::Error::other("the spawning thread panicked"))?
}

fn spawn_now(command: &mut Command) -> std::io::Result<Spawned> {
    let mut table = reaper::lock();
    let mut child = command.spawn()?;
    let pid = child.id();
    let exit = reaper::register(&mut table, pid as i32);
    drop(table);
    Ok(Spawned {
        pid,
        exit,
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
    })
}

/// Sends `signal` to the process group led by `pid`. A group with nobody left is not an error.
pub fn signal_group(pid: u32, signal: Signal) -> Result<(), Errno> {
    match killpg(Pid::from_raw(pid as i32), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Logs instead of failing: a signal that cannot be delivered must not stop the supervisor.
pub fn signal_group_logged(pid: u32, signal: Signal) {
    if let Err(error) = signal_group(pid, signal) {
        tracing::warn!(pid, signal = signal.as_str(), %error, "cannot signal vLLM's process group");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_option_values_are_hidden_in_the_logged_command() {
        let mut command = Command::new("vllm");
        command.args([
            "serve",
            "m",
            "--api-key",
            "sk-secret",
            "--hf-token=hf_secret",
            "--max-num-batched-tokens",
            "8192",
            "--tokenizer",
            "t",
        ]);
        assert_eq!(
            describe(&command),
            "vllm serve m --api-key *** --hf-token=*** --max-num-batched-tokens 8192 --tokenizer t"
        );
    }

    /// Regression: vLLM's `--api-key` takes a list, and `--api-key sk-a sk-b` was logged as
    /// `--api-key *** sk-b`.
    #[test]
    fn every_value_of_a_secret_list_option_is_hidden() {
        let mut command = Command::new("vllm");
        command.args([
            "serve",
            "m",
            "--api-key",
            "sk-a",
            "sk-b",
            "--port",
            "8000",
            "--api-key=sk-c",
            "--client-secret",
            "s1",
            "--HF-TOKEN",
            "hf_x",
            "--enforce-eager",
        ]);
        let line = describe(&command);
        assert_eq!(
            line,
            "vllm serve m --api-key *** *** --port 8000 --api-key=*** --client-secret *** \
             --HF-TOKEN *** --enforce-eager"
        );
        for secret in ["sk-a", "sk-b", "sk-c", "s1", "hf_x"] {
            assert!(!line.contains(secret), "{secret} in {line}");
        }
    }

    /// Regression: a value starting with `-`, a password in a URL and a secret field of a JSON
    /// argument were all logged.
    #[test]
    fn secrets_inside_values_are_hidden_too() {
        let mut command = Command::new("vllm");
        command.args([
            "serve",
            "m",
            "--api-key",
            "-sk-dash",
            "--otlp-traces-endpoint",
            "http://user:pw_url@collector:4317/v1",
            "--kv-transfer-config",
            r#"{"kv_connector":"x","extra":{"password":"pw_json","url":"redis://:pw_redis@h/0"}}"#,
            "--served-model-name",
            "tiny",
        ]);
        let line = describe(&command);
        assert_eq!(
            line,
            "vllm serve m --api-key *** --otlp-traces-endpoint http://user:***@collector:4317/v1 \
             --kv-transfer-config {\"extra\":{\"password\":\"***\",\"url\":\"redis://:***@h/0\"},\"kv_connector\":\"x\"} \
             --served-model-name tiny"
        );
        for secret in ["sk-dash", "pw_url", "pw_json", "pw_redis"] {
            assert!(!line.contains(secret), "{secret} in {line}");
        }
    }
}
