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

/// Stream: one entry (`paper`, `snapshot`) per completed paper, for the main backend.
pub const COMPLETED_STREAM: &str = "rp:papers:completed";

#[cfg(test)]
mod tests {
    #[test]
    fn keys_use_the_paper_as_hash_tag() {
        assert_eq!(super::notes("p1"), "rp:paper:{p1}:notes");
        assert_eq!(super::meta("p1"), "rp:paper:{p1}:meta");
    }
}
