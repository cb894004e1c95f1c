//! The password check rumqttd calls for every CONNECT that carries credentials.
//!
//! rumqttd's own `auth` table would do the comparison, but it keeps the passwords in a struct
//! whose `Debug` prints them, and it gives no hook to count failures. A CONNECT without any
//! credentials never reaches this check: rumqttd refuses it first (and it is not counted).

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::sync::Arc;

use runtime::Secret;

use crate::events;

/// Username → password.
#[derive(Debug)]
pub(crate) struct Users(HashMap<String, Secret>);

impl Users {
    pub(crate) fn new(users: Vec<(String, Secret)>) -> Self {
        Self(users.into_iter().collect())
    }

    fn check(&self, username: &str, password: &str) -> Result<(), events::AuthFailure> {
        let stored = self
            .0
            .get(username)
            .ok_or(events::AuthFailure::UnknownUser)?;
        if constant_time_eq(stored.expose().as_bytes(), password.as_bytes()) {
            Ok(())
        } else {
            Err(events::AuthFailure::WrongPassword)
        }
    }
}

/// The handler for one listener; `listener` labels its failures.
pub(crate) fn handler(
    users: Arc<Users>,
    listener: &str,
) -> impl Fn(String, String, String) -> Ready<bool> + Send + Sync + 'static {
    let failed = events::AuthFailed::new(listener);
    move |client_id, username, password| {
        let verdict = users.check(&username, &password);
        if let Err(why) = verdict {
            failed.emit(&client_id, &username, why);
        }
        ready(verdict.is_ok())
    }
}

/// Compares without stopping at the first differing byte, so the time taken does not tell a
/// guesser how much of a password was right. (The length is not hidden.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_password_of_a_known_user_passes() {
        let users = Users::new(vec![("alice".into(), Secret::new("s3cret"))]);
        assert_eq!(users.check("alice", "s3cret"), Ok(()));
        assert_eq!(
            users.check("alice", "s3cre"),
            Err(events::AuthFailure::WrongPassword)
        );
        assert_eq!(
            users.check("alice", "s3creT"),
            Err(events::AuthFailure::WrongPassword)
        );
        assert_eq!(
            users.check("bob", "s3cret"),
            Err(events::AuthFailure::UnknownUser)
        );
        assert_eq!(users.check("", ""), Err(events::AuthFailure::UnknownUser));
    }
}
