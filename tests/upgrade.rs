//! Upgrading the gateway's binary. Re-executing a replaced binary in place on SIGHUP is not
//! enabled yet (src/upgrade holds its groundwork): until it is, a SIGHUP after the binary was
//! replaced is a configuration reload like any other, the running image keeps serving and vLLM
//! is left alone. `/livez` names the running version, so an operator sees which binary serves.
//! Real processes: `gateway serve`, run from a copy of the binary, with mock-vllm as its child.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use nix::sys::signal::Signal;

/// A copy of the gateway binary in a directory of its own, which a test may replace.
struct Binary {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    fn copy() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway");
        std::fs::copy(GATEWAY, &path).expect("copy the gateway binary");
        Binary { path, _dir: dir }
    }

    /// Replaces the file as a package manager does: a new file written aside, renamed over.
    fn replace(&self) {
        let aside = self.path.with_extension("new");
        std::fs::copy(GATEWAY, &aside).expect("copy the gateway binary aside");
        std::fs::rename(&aside, &self.path).expect("rename over the binary");
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }
}

/// `gateway serve` run from `binary` (a shell wrapper that execs it, so the pid is the gateway's).
fn serve_from(binary: &Binary) -> Proc {
    let script = format!("shift; exec '{}' \"$@\"", binary.path());
    let (gateway, _) = gateway_serve_wrapped(&["sh", "-c", &script, "sh"], 0, &[], &[]);
    wait_ready(&gateway);
    gateway
}

fn livez(gateway: &Proc) -> serde_json::Value {
    let (status, body) = get(&gateway.url("/livez")).expect("livez answers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("livez JSON")
}

fn exe_of(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("the gateway's exe link")
}

#[test]
fn livez_names_the_version_of_the_running_binary() {
    let binary = Binary::copy();
    let gateway = serve_from(&binary);
    assert_eq!(
        livez(&gateway)["version"].as_str(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(exe_of(gateway.pid()), Path::new(binary.path()));
}

#[test]
fn sighup_after_the_binary_was_replaced_keeps_the_running_image_serving_and_vllm_alive() {
    let binary = Binary::copy();
    let gateway = serve_from(&binary);
    let vllm_pid = livez(&gateway)["pid"].as_i64().expect("vLLM's pid") as i32;

    binary.replace();
    gateway.signal(Signal::SIGHUP);
    wait_until("the reload to be logged", DEADLINE, || {
        gateway.log_text().contains("configuration reloaded")
    });

    assert!(ready(&gateway), "the gateway serves after the reload");
    let report = livez(&gateway);
    assert_eq!(report["pid"].as_i64(), Some(i64::from(vllm_pid)));
    assert!(alive(vllm_pid), "vLLM was left alone");
    let status = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "").status;
    assert_eq!(status, 200);
    // The old image still runs: its file was renamed over, so the kernel marks it deleted.
    let exe = exe_of(gateway.pid());
    assert_eq!(
        exe,
        PathBuf::from(format!("{} (deleted)", binary.path())),
        "the gateway was not re-executed"
    );
}
