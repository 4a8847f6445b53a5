//! Integration tests: the real binary, real Redis, real WebSocket clients, one
//! module per section of PROTOCOL.md. One test binary keeps linking cheap.

mod common;

mod api; // 7 (1.2): the backend API
mod auth; // 5. tokens and roles
mod bounds; // every buffer, table and wait bounded under hostile clients
mod chaos; // faults at random: acknowledged edits survive
mod cluster; // 6. several nodes
mod conformance; // RFC 6455 over raw sockets
mod cost; // 4 (1.2): no client keeps Redis busy for others
mod cover; // 3.1 and 3.2 (1.1): the paper's cover, meta
mod history; // 3.1 and 4 (1.1): the tombstone horizon, resuming with since
mod http; // 1. HTTP surface
mod integrity; // 2-4 (1.1): foreign values, write_failed, saved, completed with notes, the seal race
mod lifecycle; // conn lifecycle: no leak, a deadline in every waiting phase
mod limits; // abuse: rate, caps, origins, slow and silent peers
#[cfg(feature = "load")]
mod load; // the load generator's smoke run
mod memory; // issue 24: memory bounded under clients that never read
mod metrics; // 1. /metrics: the Prometheus text format, every family moving
mod notes; // 2. notes and versions
mod operations; // 1. papers API, readiness, metrics
mod operators; // run.sh, configuration, fail-fast Redis checks, deploy files, the load tool
mod partition; // 3 and 6: a node cut from Redis while another goes on
mod patch; // 2 and 3 (1.1): field patches
mod persistence; // 4. Redis
mod redis_cluster; // 4 and 6 (1.1): rediss:// and Redis Cluster
mod sentinel; // 4. failover under Sentinel
mod session; // 3. the WebSocket session
