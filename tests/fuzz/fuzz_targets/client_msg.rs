//! Any text a client sends is either a valid message or a refusal, never a panic,
//! and what is accepted keeps PROTOCOL.md's promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rollingpaper::protocol::{is_valid_id, parse_client_msg, ClientMsg, MAX_CURSOR_BYTES};

const MAX_NOTE_BYTES: usize = 512;

fn is_compact_object(data: &str) -> bool {
    matches!(serde_json::from_str::<serde_json::Value>(data), Ok(serde_json::Value::Object(ref map))
        if serde_json::to_string(map).ok().as_deref() == Some(data))
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    match parse_client_msg(text, MAX_NOTE_BYTES) {
        Ok(ClientMsg::Upsert { id, data, reference }) => {
            assert!(is_valid_id(&id));
            assert!(data.len() <= MAX_NOTE_BYTES && is_compact_object(&data));
            if let Some(reference) = reference {
                assert!(serde_json::from_str::<String>(&reference).is_ok());
            }
        }
        Ok(ClientMsg::Delete { id, .. }) => assert!(is_valid_id(&id)),
        Ok(ClientMsg::Cursor { data }) => assert!(data.len() <= MAX_CURSOR_BYTES && is_compact_object(&data)),
        Ok(ClientMsg::Complete { .. } | ClientMsg::Ping) => {}
        Err(refusal) => {
            if let Some(reference) = refusal.reference {
                assert!(serde_json::from_str::<String>(&reference).is_ok());
            }
        }
    }
});
