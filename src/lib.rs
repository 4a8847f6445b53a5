//! rollingpaper: the real-time server of a rolling paper (a shared greeting card).
//! The wire contract is PROTOCOL.md; this crate is organised as a map of it.

pub mod api; // the backend API: routes, callers, bodies and answers (PROTOCOL.md 7)
pub mod auth; // tokens and roles
pub mod config; // every knob, its default, its flag and environment variable
pub mod conn; // one TCP connection: HTTP request, reply or WebSocket, and its output
pub mod logging; // the logger: text or JSON lines, a level per module
pub mod metrics; // counters and the Prometheus text
pub mod paper; // notes, members and versions of one paper; no sockets
pub mod protocol; // client messages parsed, server messages encoded, codes
pub mod rate; // the per-session token bucket
pub mod server; // start, event loops, inboxes, ordered shutdown
pub mod shared; // bytes many connections write, encoded once, counted against a bound
pub mod store; // Redis writer and loader threads, key layout
