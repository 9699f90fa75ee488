//! The gateway as a container's entrypoint: PID 1 of a PID namespace of its own (`unshare --pid`,
//! as a container runtime makes one). The kernel gives PID 1 no default signal actions, so a
//! SIGTERM without a handler would be ignored; and when PID 1 exits, everything in the namespace
//! dies with it, so the exit code is the container's.

mod common;

use common::*;
use nix::sys::signal::Signal;

/// `unshare` forks the gateway as PID 1 of a new PID namespace and exits with its exit status;
/// if the test dies first, `--kill-child` takes the namespace down.
fn in_pid_namespace() -> Vec<&'static str> {
    let mut wrapper = vec!["unshare"];
    if !nix::unistd::geteuid().is_root() {
        wrapper.push("--map-root-user");
    }
    wrapper.extend(["--pid", "--kill-child", "--mount-proc"]);
    wrapper
}

/// The gateway's pid as the host sees it: the one child of the `unshare` process.
fn gateway_host_pid(unshare: &Proc) -> i32 {
    let path = format!("/proc/{0}/task/{0}/children", unshare.pid());
    wait_until("unshare to fork the gateway", DEADLINE, || {
        std::fs::read_to_string(&path).is_ok_and(|children| !children.trim().is_empty())
    });
    let children = std::fs::read_to_string(&path).expect("children");
    children
        .split_whitespace()
        .next()
        .expect("one child")
        .parse()
        .expect("a pid")
}

/// The process's pid inside its innermost PID namespace (the last `NSpid` field).
fn namespace_pid(host_pid: i32) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|line| line.starts_with("NSpid:"))
        .expect("NSpid line");
    line.split_whitespace()
        .last()
        .expect("a pid")
        .parse()
        .expect("a number")
}

fn serve_as_pid_1(extra: &[&str]) -> (Proc, u16, i32) {
    let wrapper = in_pid_namespace();
    let (gateway, vllm_port) = gateway_serve_wrapped(&wrapper, 0, extra, &[]);
    let gateway_pid = gateway_host_pid(&gateway);
    assert_eq!(namespace_pid(gateway_pid), 1, "the gateway runs as PID 1");
    wait_ready(&gateway);
    (gateway, vllm_port, gateway_pid)
}

#[test]
fn as_pid_1_it_serves_and_a_sigterm_drains_stops_vllm_and_exits_0() {
    let (mut container, _, gateway_pid) = serve_as_pid_1(&["--restart", "always"]);
    let response = post_json(container.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(response.status, 200);

    // What `docker stop` and the kubelet do: SIGTERM to PID 1.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(gateway_pid), Signal::SIGTERM)
        .expect("signal the gateway");
    let status = container.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", container.log_text());
    let log = container.log_text();
    let term = log
        .find("sending SIGTERM to vLLM")
        .expect("vLLM got SIGTERM");
    let stopped = log
        .find("\"message\":\"vLLM stopped\"")
        .expect("vLLM stopped");
    assert!(term < stopped, "{log}");
}

#[test]
fn as_pid_1_the_container_exits_with_vllms_exit_code_when_the_policy_does_not_restart() {
    let (mut container, vllm_port, _) = serve_as_pid_1(&["--restart", "no"]);
    let response = raw_request(vllm_port, "POST /_mock/exit?code=3 HTTP/1.1", b"");
    assert_eq!(response.status, 200);
    let status = container.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(3), "{}", container.log_text());
}
