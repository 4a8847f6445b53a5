//! Tokens and roles (PROTOCOL.md section 5): HS256 JWTs issued by the main
//! backend, verified with `jsonwebtoken`, turned into who a client is and what
//! it may do.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Seconds a token is still accepted after its `exp`, and already before its `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// What tokens are checked against: the main backend's secret and, when the
/// operator names one, the audience (`aud`) they must be issued for.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    pub secret: String,
    pub audience: Option<String>,
}

impl From<&str> for Key {
    fn from(secret: &str) -> Self {
        Key { secret: secret.to_string(), audience: None }
    }
}

impl From<&Key> for Key {
    fn from(key: &Key) -> Self {
        key.clone()
    }
}

/// The secret never reaches a log line, even through `{:?}`.
impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("secret", &"***").field("audience", &self.audience).finish()
    }
}

/// What a member may do (PROTOCOL.md 5). With auth off every member is `Owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Receives everything; sends `cursor` and `ping`.
    Viewer,
    /// Also creates notes, and updates or deletes its own.
    Writer,
    /// Also updates or deletes any note, and completes the paper.
    Owner,
    /// Reads `GET /papers/{paper}`; never opens a session.
    Service,
}

impl Role {
    pub fn may_write(self) -> bool {
        matches!(self, Role::Writer | Role::Owner)
    }

    pub fn may_moderate(self) -> bool {
        self == Role::Owner
    }

    pub fn may_complete(self) -> bool {
        self == Role::Owner
    }

    pub fn may_read_papers(self) -> bool {
        matches!(self, Role::Owner | Role::Service)
    }
}

/// The claims of a valid token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Grant {
    /// The user id: the `author` of the notes this member creates.
    pub sub: String,
    /// The paper the token opens.
    pub paper: String,
    pub role: Role,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    #[serde(default)]
    pub name: Option<String>,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// 401: no token, or one that is malformed, badly signed, of another
    /// algorithm, missing a claim, or expired.
    Unauthorized,
    /// 403: a valid token that does not open this resource.
    Forbidden,
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// A verifier for a secret alone (`&str`) or a secret and an audience (`&Key`).
    pub fn new(key: impl Into<Key>) -> Self {
        let key = key.into();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        match &key.audience {
            // A token without `aud` could have been issued for any service sharing
            // the secret, so with an audience configured it is required.
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.set_required_spec_claims(&["exp", "sub", "aud"]);
            }
            // PROTOCOL.md 5: `aud` is checked only when an audience is configured;
            // jsonwebtoken would otherwise refuse every token that carries one.
            None => {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp", "sub"]);
            }
        }
        Verifier { key: DecodingKey::from_secret(key.secret.as_bytes()), validation }
    }

    /// Checks a token's signature, algorithm, claims and expiry.
    ///
    /// # Errors
    /// `Unauthorized` for anything but a valid HS256 token with `sub`, `paper`,
    /// `role` and `exp`.
    pub fn verify(&self, token: &str) -> Result<Grant, Denied> {
        jsonwebtoken::decode::<Grant>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|_| Denied::Unauthorized)
    }

    /// The grant of a session token for `paper` (`?token=`).
    ///
    /// # Errors
    /// 401 for a bad token, 403 for another paper's token or the service role.
    pub fn session(&self, token: Option<&str>, paper: &str) -> Result<Grant, Denied> {
        let grant = self.verify(token.ok_or(Denied::Unauthorized)?)?;
        if grant.paper != paper || grant.role == Role::Service {
            return Err(Denied::Forbidden);
        }
        Ok(grant)
    }

    /// The grant of an `Authorization: Bearer` header for reading `paper`.
    ///
    /// # Errors
    /// 401 for a missing or bad token, 403 for another paper or a role that may not read.
    pub fn reader(&self, authorization: Option<&str>, paper: &str) -> Result<Grant, Denied> {
        let token = authorization
            .and_then(|value| value.trim().strip_prefix("Bearer ").or_else(|| value.trim().strip_prefix("bearer ")))
            .ok_or(Denied::Unauthorized)?;
        let grant = self.verify(token.trim())?;
        if grant.paper != paper || !grant.role.may_read_papers() {
            return Err(Denied::Forbidden);
        }
        Ok(grant)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::{json, Value};

    pub fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn token(claims: Value, secret: &str, alg: Algorithm) -> String {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn good(role: &str, exp: u64) -> String {
        token(json!({"sub": "u1", "paper": "p1", "role": role, "exp": exp}), "s3cret", Algorithm::HS256)
    }

    #[test]
    fn accepts_a_valid_token_and_checks_the_paper() {
        let v = Verifier::new("s3cret");
        let grant = v.session(Some(&good("writer", now() + 60)), "p1").unwrap();
        assert_eq!((grant.sub.as_str(), grant.role, grant.name), ("u1", Role::Writer, None));
        assert_eq!(v.session(Some(&good("writer", now() + 60)), "p2"), Err(Denied::Forbidden));
        assert_eq!(v.session(Some(&good("service", now() + 60)), "p1"), Err(Denied::Forbidden));
        assert_eq!(v.session(None, "p1"), Err(Denied::Unauthorized));
    }

    #[test]
    fn refuses_bad_tokens_with_401() {
        let v = Verifier::new("s3cret");
        let later = now() + 60;
        let bad = [
            token(json!({"sub": "u1", "paper": "p1", "role": "owner", "exp": later}), "other", Algorithm::HS256),
            token(json!({"sub": "u1", "paper": "p1", "role": "owner", "exp": later}), "s3cret", Algorithm::HS512),
            token(json!({"paper": "p1", "role": "owner", "exp": later}), "s3cret", Algorithm::HS256),
            token(json!({"sub": "u1", "role": "owner", "exp": later}), "s3cret", Algorithm::HS256),
            token(json!({"sub": "u1", "paper": "p1", "exp": later}), "s3cret", Algorithm::HS256),
            token(json!({"sub": "u1", "paper": "p1", "role": "owner"}), "s3cret", Algorithm::HS256),
            token(json!({"sub": "u1", "paper": "p1", "role": "king", "exp": later}), "s3cret", Algorithm::HS256),
            good("owner", now() - LEEWAY_SECS - 2),
            "not.a.token".to_string(),
            // alg "none", unsigned
            format!(
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
                base64_url(format!(r#"{{"sub":"u1","paper":"p1","role":"owner","exp":{later}}}"#).as_bytes())
            ),
        ];
        for t in bad {
            assert_eq!(v.session(Some(&t), "p1"), Err(Denied::Unauthorized), "{t}");
        }
        // Within the leeway it still passes.
        assert!(v.session(Some(&good("owner", now() - 2)), "p1").is_ok());
    }

    #[test]
    fn reading_papers_needs_owner_or_service() {
        let v = Verifier::new("s3cret");
        let bearer = |role: &str| format!("Bearer {}", good(role, now() + 60));
        assert!(v.reader(Some(&bearer("service")), "p1").is_ok());
        assert!(v.reader(Some(&bearer("owner")), "p1").is_ok());
        assert_eq!(v.reader(Some(&bearer("writer")), "p1"), Err(Denied::Forbidden));
        assert_eq!(v.reader(Some(&bearer("owner")), "p2"), Err(Denied::Forbidden));
        assert_eq!(v.reader(None, "p1"), Err(Denied::Unauthorized));
        assert_eq!(v.reader(Some("Basic abc"), "p1"), Err(Denied::Unauthorized));
    }

    #[test]
    fn not_before_is_checked_with_the_same_leeway() {
        let v = Verifier::new("s3cret");
        let claims = |nbf: u64| json!({"sub": "u1", "paper": "p1", "role": "owner", "exp": now() + 600, "nbf": nbf});
        let early = token(claims(now() + LEEWAY_SECS + 60), "s3cret", Algorithm::HS256);
        assert_eq!(v.session(Some(&early), "p1"), Err(Denied::Unauthorized));
        let within_leeway = token(claims(now() + 2), "s3cret", Algorithm::HS256);
        assert!(v.session(Some(&within_leeway), "p1").is_ok());
        let past = token(claims(now() - 60), "s3cret", Algorithm::HS256);
        assert!(v.session(Some(&past), "p1").is_ok());
    }

    #[test]
    fn audience_is_checked_only_when_configured() {
        let with_aud = |aud: &str| {
            token(
                json!({"sub": "u1", "paper": "p1", "role": "owner", "exp": now() + 60, "aud": aud}),
                "s3cret",
                Algorithm::HS256,
            )
        };
        let without_aud = good("owner", now() + 60);
        let open = Verifier::new("s3cret");
        assert!(open.session(Some(&with_aud("anything")), "p1").is_ok());
        assert!(open.session(Some(&without_aud), "p1").is_ok());
        let strict = Verifier::new(&Key { secret: "s3cret".into(), audience: Some("rollingpaper".into()) });
        assert!(strict.session(Some(&with_aud("rollingpaper")), "p1").is_ok());
        assert_eq!(strict.session(Some(&with_aud("billing")), "p1"), Err(Denied::Unauthorized));
        assert_eq!(strict.session(Some(&without_aud), "p1"), Err(Denied::Unauthorized));
    }

    #[test]
    fn the_secret_stays_out_of_debug_output() {
        let key = Key { secret: "hunter2hunter2hunter2".into(), audience: None };
        assert!(!format!("{key:?}").contains("hunter2"));
    }

    fn base64_url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
