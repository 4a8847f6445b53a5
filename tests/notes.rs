//! PROTOCOL.md section 2: notes, authors and versions.

use serde_json::json;

use crate::common::Server;

#[test]
fn versions_strictly_increase_and_stay_below_2_pow_53() {
    let server = Server::memory(&[]);
    let mut a = server.join("p-v", "user=ann");
    let mut b = server.join("p-v", "user=bob");
    a.next_of("join");
    a.upsert("shared", json!({"created": true}));
    let created = next_change(&mut a);
    assert_eq!(next_change(&mut b), created);
    for i in 0..50 {
        let (sender, other) = if i % 2 == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
        sender.upsert("shared", json!({"i": i}));
        let _ = other;
    }
    let mut seen_a: Vec<_> = (0..50).map(|_| next_change(&mut a)).collect();
    let seen_b: Vec<_> = (0..50).map(|_| next_change(&mut b)).collect();
    assert_eq!(seen_a, seen_b, "members of one node see one order");
    a.send(json!({"type": "delete", "id": "shared"}));
    seen_a.push(next_change(&mut a));
    let seen_b: Vec<_> = seen_b.into_iter().chain([next_change(&mut b)]).collect();
    assert_eq!(seen_a, seen_b, "members of one node see one order");
    let versions: Vec<u64> = seen_a.iter().map(|m| m["v"].as_u64().unwrap()).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert!(versions[0] > created["v"].as_u64().unwrap());
    assert!(versions.iter().all(|&v| v > 0 && v < 1 << 53));
    // Replacing data never changes the author.
    assert!(seen_a[..50].iter().all(|m| m["author"] == "ann"));
    // Created again after the delete: a higher version, the new creator.
    b.upsert("shared", json!({}));
    let again = next_change(&mut a);
    assert!(again["v"].as_u64().unwrap() > versions[50]);
    assert_eq!(again["author"], "bob");
}

fn next_change(client: &mut crate::common::Client) -> serde_json::Value {
    loop {
        let msg = client.next();
        if msg["type"] == "upsert" || msg["type"] == "delete" {
            return msg;
        }
    }
}

#[test]
fn data_is_any_object_kept_as_sent() {
    let server = Server::memory(&[]);
    let mut a = server.join("p-data", "");
    let data =
        json!({"kind": "text", "x": 1.5, "y": -2, "text": "héllo \"quoted\" 🎉", "nested": {"a": [1, null, true]}});
    a.upsert("n1", data.clone());
    assert_eq!(a.next_of("upsert")["data"], data);
    let b = server.join("p-data", "");
    assert_eq!(b.snapshot["notes"][0]["data"], data);
}
