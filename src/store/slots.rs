//! Redis Cluster hash slots: the slot of a key, and the map of which master
//! serves which slots, as `CLUSTER SLOTS` tells it. The writer routes its
//! pipelines by it, the relay its sharded subscriptions.

use redis::{Connection, ErrorKind, RedisError, Value};

/// The hash slot of a key (CRC16 of its `{tag}` or of the whole key, mod 16384).
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = key
        .find('{')
        .and_then(|open| key[open + 1..].find('}').filter(|&len| len > 0).map(|len| &bytes[open + 1..open + 1 + len]));
    let mut crc: u16 = 0;
    for &b in tagged.unwrap_or(bytes) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// Which master (`host:port`) serves which range of slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    ranges: Vec<SlotRange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SlotRange {
    first: u16,
    last: u16,
    master: String,
}

impl SlotMap {
    /// The map as the node behind `conn` sees it (`CLUSTER SLOTS`).
    ///
    /// # Errors
    /// The node did not answer, or not with a slot map.
    pub fn read(conn: &mut Connection) -> redis::RedisResult<SlotMap> {
        let ranges = match redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(conn)? {
            Value::Array(ranges) => ranges,
            other => return Err(RedisError::from((ErrorKind::Parse, "CLUSTER SLOTS", format!("{other:?}")))),
        };
        let mut map = SlotMap::default();
        for range in ranges {
            let Value::Array(parts) = range else { continue };
            let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                _ => continue,
            };
            let Some(Value::Int(port)) = master.get(1) else { continue };
            map.ranges.push(SlotRange { first: *first as u16, last: *last as u16, master: format!("{host}:{port}") });
        }
        Ok(map)
    }

    /// The master serving a key's slot, if the map covers it.
    pub fn master_of(&self, key: &str) -> Option<&str> {
        let slot = slot(key);
        self.ranges.iter().find(|r| (r.first..=r.last).contains(&slot)).map(|r| r.master.as_str())
    }

    /// Every master of the map, each once, in the map's order.
    pub fn masters(&self) -> Vec<&str> {
        let mut masters: Vec<&str> = Vec::new();
        for range in &self.ranges {
            if !masters.contains(&range.master.as_str()) {
                masters.push(&range.master);
            }
        }
        masters
    }

    /// Whether `addr` serves any slot.
    pub fn serves(&self, addr: &str) -> bool {
        self.ranges.iter().any(|r| r.master == addr)
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    #[cfg(test)]
    fn of(ranges: &[(u16, u16, &str)]) -> SlotMap {
        let ranges =
            ranges.iter().map(|&(first, last, master)| SlotRange { first, last, master: master.to_string() }).collect();
        SlotMap { ranges }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("rp:paper:{p1}:notes"), slot("p1"));
        assert_eq!(slot("rp:paper:{p1}"), slot("rp:paper:{p1}:meta"));
    }

    #[test]
    fn a_key_goes_to_the_master_of_its_slot() {
        let map = SlotMap::of(&[(0, 5460, "a:1"), (5461, 10922, "b:2"), (10923, 16383, "a:1")]);
        assert_eq!(map.master_of("foo"), Some("a:1"));
        assert_eq!(map.masters(), ["a:1", "b:2"]);
        assert!(map.serves("b:2") && !map.serves("c:3"));
        assert_eq!(SlotMap::of(&[(0, 100, "a:1")]).master_of("foo"), None);
    }
}
