//! The HTTP surface: the router (`router::app`) over the gateway's own endpoints and forwarding, served
//! by the proxy's worker threads.
//!
//! The proxy owns no process and no child state: it reads the [`UpstreamStatus`] watch and forwards
//! requests over its worker's pooled upstream connections (`upstream`). Each worker thread owns its
//! runtime, its accept loop on the shared listening socket, and its pool (`workers`). The
//! configuration a reload may change is [`Live`], swapped whole by the reload and read once per
//! request (`state`).
//!
//! [`UpstreamStatus`]: crate::status::UpstreamStatus

pub mod admission;
pub mod body;
pub mod conn;
pub mod endpoints;
pub mod errors;
pub mod forward;
pub mod headers;
pub mod keepalive;
pub mod router;
pub mod state;
pub mod timer;
pub mod upstream;
pub mod wake;
pub mod workers;

pub use crate::proxy::router::app;
pub use crate::proxy::state::{AppState, Live, LiveConfig, live_config};
