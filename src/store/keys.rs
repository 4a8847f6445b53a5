//! Every Redis key the server uses (PROTOCOL.md section 4). The paper id sits in
//! literal braces, a Redis Cluster hash tag, so one paper's keys share a slot.

/// Hash: note id -> `{"author","data","v"}` or `{"deleted":true,"v"}`.
pub fn notes(paper: &str) -> String {
    format!("rp:paper:{{{paper}}}:notes")
}

/// Hash: `completed`, `completed_by`, `created_ms`, `updated_ms`.
pub fn meta(paper: &str) -> String {
    format!("rp:paper:{{{paper}}}:meta")
}

/// Sorted set: the paper's tombstones by version, the ones the horizon drops
/// first (PROTOCOL.md 4, 1.1).
pub fn tombstones(paper: &str) -> String {
    format!("rp:paper:{{{paper}}}:tombstones")
}

/// Hash (with `--cluster`): member id -> `{"user","name","node"}` of the members
/// on every node, read by a node that loads the paper.
pub fn members(paper: &str) -> String {
    format!("rp:paper:{{{paper}}}:members")
}

/// Hash (1.2): user -> unix seconds until which the user may not join
/// (PROTOCOL.md 7); the key expires with the last of them.
pub fn revoked(paper: &str) -> String {
    format!("rp:paper:{{{paper}}}:revoked")
}

/// String (1.2), with an expiry of `erase_retention`: present while the paper
/// is erased; no write of the paper is applied while it is.
pub fn erased(paper: &str) -> String {
    format!("rp:paper:{{{paper}}}:erased")
}

/// Pub/sub channel of one paper's relayed messages.
pub fn channel(paper: &str) -> String {
    format!("rp:paper:{{{paper}}}")
}

/// The paper of a channel name, if it is one.
pub fn paper_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("rp:paper:{")?.strip_suffix('}')
}

/// Pub/sub channel where every node says it is alive (every few seconds); a node
/// hearing its own message knows its subscription works.
pub const NODES_CHANNEL: &str = "rp:nodes";

/// String key with an expiry, refreshed by each live node.
pub fn node_alive(node: &str) -> String {
    format!("rp:node:{node}")
}

/// Stream: one entry (`paper`, `snapshot`) per completed paper, for the main backend.
pub const COMPLETED_STREAM: &str = "rp:papers:completed";

#[cfg(test)]
mod tests {
    #[test]
    fn keys_use_the_paper_as_hash_tag() {
        assert_eq!(super::notes("p1"), "rp:paper:{p1}:notes");
        assert_eq!(super::meta("p1"), "rp:paper:{p1}:meta");
        assert_eq!(super::channel("p1"), "rp:paper:{p1}");
        assert_eq!(super::paper_of_channel("rp:paper:{p1}"), Some("p1"));
        assert_eq!(super::paper_of_channel("rp:nodes"), None);
    }
}
