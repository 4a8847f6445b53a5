//! Any bytes a client sends before the upgrade get an answer or a wait, never a
//! panic, with auth off and on.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rollingpaper::auth::Verifier;
use rollingpaper::conn::http::{parse, Parsed, Policy, Route, MAX_REQUEST_BYTES};
use rollingpaper::protocol::is_valid_id;

fn policies() -> &'static [Policy; 2] {
    static POLICIES: OnceLock<[Policy; 2]> = OnceLock::new();
    POLICIES.get_or_init(|| {
        [
            Policy { echo: true, ..Policy::default() },
            Policy {
                verifier: Some(Verifier::new("fuzzing-secret-0123456789")),
                allowed_origins: vec!["https://paper.example".to_string()],
                echo: false,
            },
        ]
    })
}

fuzz_target!(|bytes: &[u8]| {
    for policy in policies() {
        match parse(bytes, policy) {
            Ok(Parsed::Partial) => assert!(bytes.len() < MAX_REQUEST_BYTES),
            Ok(Parsed::Complete { len, route }) => {
                assert!(len <= bytes.len());
                match route {
                    Route::Upgrade(upgrade) => assert!(is_valid_id(&upgrade.paper)),
                    Route::ReadPaper(paper) => assert!(is_valid_id(&paper)),
                    Route::Reply(reply) => assert!((200..600).contains(&reply.status)),
                    Route::Ready | Route::Metrics | Route::Echo(_) => {}
                }
            }
            Err(reply) => assert!((400..500).contains(&reply.status)),
        }
    }
});
