//! Identifier newtypes shared by every layer: [`ConnectionId`], [`UserId`], [`GroupName`].
//! Pure: no I/O.
//!
//! Ids that come from the network are validated here once (length, no control characters),
//! so the rest of the server never handles a bare, unchecked `String`.

use std::fmt;
use std::sync::Arc;

use base64::Engine;

/// Longest user id or group name accepted (bytes). Channel names are built from them.
pub const MAX_ID_LEN: usize = 256;

/// Why an id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty id.
    #[error("id must not be empty")]
    Empty,
    /// Longer than [`MAX_ID_LEN`].
    #[error("id longer than {MAX_ID_LEN} bytes")]
    TooLong,
    /// Contains a control character.
    #[error("id contains a control character")]
    ControlChar,
}

fn validate(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    if s.chars().any(char::is_control) {
        return Err(IdError::ControlChar);
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: &str) -> Result<Self, IdError> {
                validate(s)?;
                Ok($name(Arc::from(s)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A connection's public id (`connectionId` in negotiate; `Clients.Client(id)`).
    ConnectionId
);
id_type!(
    /// A user's id: the JWT `sub` claim (`Context.UserIdentifier`). Matched exactly.
    UserId
);
id_type!(
    /// A group name. Case-sensitive, as ASP.NET's channel names are.
    GroupName
);

/// 16 random bytes as base64url without padding (22 characters), as ASP.NET makes
/// connection ids and tokens. URL-safe, because the client appends `id=` unencoded.
pub fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl ConnectionId {
    /// A fresh random connection id.
    pub fn random() -> ConnectionId {
        ConnectionId(Arc::from(random_token()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(UserId::new(""), Err(IdError::Empty));
        assert_eq!(UserId::new("a\nb"), Err(IdError::ControlChar));
        assert_eq!(
            UserId::new(&"x".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong)
        );
        assert!(UserId::new("*").is_ok(), "ids are literal, never patterns");
    }

    #[test]
    fn random_tokens_are_url_safe_and_22_chars() {
        let t = random_token();
        assert_eq!(t.len(), 22);
        assert!(t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(random_token(), t);
    }
}
