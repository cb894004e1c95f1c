//! Who may log in, and what they may do once in.
//!
//! - The password check rumqttd calls for every CONNECT that carries credentials. rumqttd's own
//!   `auth` table would do the comparison, but it keeps the passwords in a struct whose `Debug`
//!   prints them, and it gives no hook to count failures. A CONNECT without any credentials
//!   never reaches this check: rumqttd refuses it first (and it is not counted). The same check
//!   refuses a client id that belongs to another user (`acl::client_id_owner`).
//! - The [`rumqttd::Policy`] the patched router asks before every publish, will and
//!   subscription: the topic ACL of `acl`, each refusal logged and counted (`events`); the
//!   router also tells it what its memory limits refused, to be logged and counted alike.

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::sync::Arc;

use proto::Origin;
use runtime::Secret;

use crate::acl::{self, Grant};
use crate::events::{self, Denied, Limited};

/// One `[[broker.users]]` entry, resolved.
#[derive(Debug, Clone)]
pub(crate) struct Account {
    pub(crate) password: Secret,
    pub(crate) grant: Grant,
}

/// Username → account.
#[derive(Debug)]
pub(crate) struct Users(HashMap<String, Account>);

impl Users {
    pub(crate) fn new(accounts: Vec<Account>) -> Self {
        Self(
            accounts
                .into_iter()
                .map(|a| (a.grant.username.clone(), a))
                .collect(),
        )
    }

    fn check(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<(), events::AuthFailure> {
        let account = self
            .0
            .get(username)
            .ok_or(events::AuthFailure::UnknownUser)?;
        if !account.password.matches(password.as_bytes()) {
            return Err(events::AuthFailure::WrongPassword);
        }
        match acl::client_id_owner(client_id, self.0.keys().map(String::as_str)) {
            Some(owner) if owner != username => Err(events::AuthFailure::ClientIdOfAnotherUser),
            _ => Ok(()),
        }
    }
}

/// The login handler for one listener; `listener` labels its failures.
pub(crate) fn handler(
    users: Arc<Users>,
    listener: &str,
) -> impl Fn(String, String, String) -> Ready<bool> + Send + Sync + 'static {
    let failed = events::AuthFailed::new(listener);
    let denied = Denied::new();
    move |client_id, username, password| {
        let verdict = users.check(&client_id, &username, &password);
        match verdict {
            Err(events::AuthFailure::ClientIdOfAnotherUser) => {
                denied.client_id(&client_id, &username);
            }
            Err(why) => failed.emit(&client_id, &username, why),
            Ok(()) => {}
        }
        ready(verdict.is_ok())
    }
}

/// The topic ACL, as the router asks it.
#[derive(Debug)]
pub(crate) struct Policy {
    /// `None`: anonymous clients, no identities to check (`allow_anonymous`).
    users: Option<Arc<Users>>,
    /// Most connections one (non-admin) user may hold at once.
    max_connections_per_user: usize,
    denied: Denied,
    limited: Limited,
}

impl Policy {
    pub(crate) fn new(users: Option<Arc<Users>>, max_connections_per_user: usize) -> Self {
        Self {
            users,
            max_connections_per_user,
            denied: Denied::new(),
            limited: Limited::new(),
        }
    }

    fn grant(&self, username: &str) -> Option<Option<&Grant>> {
        self.users
            .as_ref()
            .map(|users| users.0.get(username).map(|a| &a.grant))
    }
}

impl rumqttd::Policy for Policy {
    fn may_publish(&self, client_id: &str, username: &str, topic: &str, payload: &[u8]) -> bool {
        let Some(users) = &self.users else {
            return true;
        };
        let Some(grant) = users.0.get(username).map(|a| &a.grant) else {
            self.denied.publish(client_id, username, topic);
            return false;
        };
        if !grant.may_publish(topic) {
            self.denied.publish(client_id, username, topic);
            return false;
        }
        if grant.role == acl::Role::Admin {
            return true;
        }
        // A status is stored as the health of the instance its topic names: only the user that
        // owns that client id may publish it, or any service could report another as up (or
        // down) on the dashboard and silence its alerts.
        if let Some(instance) = acl::status_instance(topic)
            && acl::client_id_owner(instance, users.0.keys().map(String::as_str)) != Some(username)
        {
            self.denied.publish(client_id, username, topic);
            return false;
        }
        // A sink acknowledges the origin a payload claims, on any topic it consumes, even when
        // the rest of the payload is not a valid message. Claiming another user's producer
        // would have a real sink acknowledge that producer's sequence numbers, and the
        // producer delete readings no sink stored.
        match Origin::claimed(payload) {
            Some(origin)
                if acl::client_id_owner(
                    origin.producer.as_str(),
                    users.0.keys().map(String::as_str),
                ) != Some(username) =>
            {
                self.denied
                    .origin(client_id, username, topic, origin.producer.as_str());
                false
            }
            _ => true,
        }
    }

    fn may_subscribe(&self, client_id: &str, username: &str, filter: &str) -> bool {
        let allowed = match self.grant(username) {
            None => true,
            Some(grant) => grant.is_some_and(|g| g.may_subscribe(filter)),
        };
        if !allowed {
            self.denied.subscribe(client_id, username, filter);
        }
        allowed
    }

    fn filter_limit(&self, client_id: &str, filter: &str, limit: rumqttd::FilterLimit) {
        self.limited.filters(client_id, filter, limit);
    }

    fn max_connections_of(&self, username: &str) -> Option<usize> {
        let users = self.users.as_ref()?;
        match users.0.get(username) {
            Some(a) if a.grant.role == acl::Role::Admin => None,
            _ => Some(self.max_connections_per_user),
        }
    }

    fn connection_limit(&self, client_id: &str, username: &str, limit: usize) {
        self.limited.connections(client_id, username, limit);
    }

    fn waiting_limit(&self, addr: std::net::SocketAddr, limit: rumqttd::WaitingLimit) {
        self.limited.waiting(addr, limit);
    }

    fn retained_limit(&self, client_id: &str, topic: &str) {
        self.limited.retained(client_id, topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::Role;
    use runtime::telemetry::Counter;

    fn account(name: &str, password: &str, role: Role) -> Account {
        Account {
            password: Secret::new(password),
            grant: Grant {
                username: name.into(),
                role,
                devices: None,
            },
        }
    }

    #[test]
    fn only_the_exact_password_of_a_known_user_passes() {
        let users = Users::new(vec![account("alice", "s3cret", Role::Admin)]);
        assert_eq!(users.check("a", "alice", "s3cret"), Ok(()));
        assert_eq!(
            users.check("a", "alice", "s3cre"),
            Err(events::AuthFailure::WrongPassword)
        );
        assert_eq!(
            users.check("a", "alice", "s3creT"),
            Err(events::AuthFailure::WrongPassword)
        );
        assert_eq!(
            users.check("a", "bob", "s3cret"),
            Err(events::AuthFailure::UnknownUser)
        );
        assert_eq!(
            users.check("a", "", ""),
            Err(events::AuthFailure::UnknownUser)
        );
    }

    #[test]
    fn a_client_id_of_another_user_is_refused_even_with_the_right_password() {
        let users = Users::new(vec![
            account("influx-writer", "iw", Role::Sink),
            account("tools", "t", Role::Admin),
        ]);
        let takeover = Err(events::AuthFailure::ClientIdOfAnotherUser);
        assert_eq!(users.check("influx-writer", "tools", "t"), takeover);
        assert_eq!(users.check("influx-writer-2", "tools", "t"), takeover);
        assert_eq!(users.check("influx-writer", "influx-writer", "iw"), Ok(()));
        assert_eq!(
            users.check("influx-writer-2", "influx-writer", "iw"),
            Ok(())
        );
        assert_eq!(users.check("tools-cli", "tools", "t"), Ok(()));
        assert_eq!(users.check("some-client", "tools", "t"), Ok(()));
        // The password is checked first: a wrong one says so, not who owns the id.
        assert_eq!(
            users.check("influx-writer", "tools", "x"),
            Err(events::AuthFailure::WrongPassword)
        );
    }

    #[test]
    fn the_policy_applies_each_users_grant_and_refuses_unknown_users() {
        use rumqttd::Policy as _;
        let users = Arc::new(Users::new(vec![
            account("serial-ingest", "p", Role::Producer),
            account("grafana", "g", Role::Reader),
        ]));
        let policy = Policy::new(Some(users), 8);
        let reading = "wattbus/v1/site-a/meas/ct-1/current_a";
        assert!(policy.may_publish("serial-ingest", "serial-ingest", reading, b"{}"));
        assert!(!policy.may_publish("grafana", "grafana", reading, b"{}"));
        assert!(!policy.may_publish("x", "nobody", reading, b"{}"));
        assert!(policy.may_subscribe("grafana", "grafana", "wattbus/#"));
        assert!(!policy.may_subscribe("x", "nobody", "wattbus/#"));
        // Anonymous: nobody to tell apart, everything allowed.
        let open = Policy::new(None, 8);
        assert!(open.may_publish("x", "", "anything", b"{}"));
        assert!(open.may_subscribe("x", "", "#"));
    }

    /// A status is stored as the named instance's health: another user's would let any
    /// service report it up (silencing its "service down" alert) or down.
    #[test]
    fn a_status_may_name_only_the_users_own_client_ids() {
        use rumqttd::Policy as _;
        let users = Arc::new(Users::new(vec![
            account("influx", "i", Role::Producer),
            account("influx-writer", "w", Role::Sink),
            account("tools", "t", Role::Admin),
        ]));
        let policy = Policy::new(Some(users), 8);
        let status = |instance: &str| format!("wattbus/v1/home/status/{instance}");
        assert!(policy.may_publish(
            "influx-writer",
            "influx-writer",
            &status("influx-writer"),
            b"{}"
        ));
        assert!(policy.may_publish(
            "influx-writer-2",
            "influx-writer",
            &status("influx-writer-2"),
            b"{}"
        ));
        assert!(policy.may_publish("influx", "influx", &status("influx-1"), b"{}"));
        // Another user's instance, even one that starts with this user's name.
        assert!(!policy.may_publish("influx", "influx", &status("influx-writer"), b"{}"));
        assert!(!policy.may_publish("influx-writer", "influx-writer", &status("influx"), b"{}"));
        assert!(!policy.may_publish("influx", "influx", &status("rms-processor"), b"{}"));
        assert!(policy.may_publish("tools", "tools", &status("influx-writer"), b"{}"));
    }

    /// Sinks acknowledge the origin a payload claims; claiming another user's producer would
    /// make a real sink acknowledge (and that producer delete) readings no sink stored.
    #[test]
    fn a_publish_claiming_the_origin_of_another_users_producer_is_refused() {
        use rumqttd::Policy as _;
        let users = Arc::new(Users::new(vec![
            account("simulator", "s", Role::Producer),
            account("evil", "e", Role::Producer),
            account("rms-processor", "r", Role::Processor),
            account("tools", "t", Role::Admin),
        ]));
        let policy = Policy::new(Some(users), 8);
        let own = "wattbus/v1/home/meas/evil-1/x";
        let claim = |producer: &str| {
            format!(
                r#"{{"origin":{{"producer":"{producer}","stream":"meas","seq":98}},"site":"home"}}"#
            )
        };
        let denied = Counter::new("wattbus_broker_denied_total", "", &[("action", "origin")]);
        let before = denied.get();
        // Another user's producer, also in a payload that is no valid reading at all.
        assert!(!policy.may_publish("evil", "evil", own, claim("simulator").as_bytes()));
        assert!(!policy.may_publish("evil-2", "evil", own, claim("simulator-2").as_bytes()));
        assert!(!policy.may_publish(
            "evil",
            "evil",
            "wattbus/v1/home/raw/evil-1",
            claim("rms-processor").as_bytes()
        ));
        // A producer nobody owns: not this user's either.
        assert!(!policy.may_publish("evil", "evil", own, claim("pi-meter").as_bytes()));
        assert_eq!(denied.get(), before + 4);
        // Its own producer names, and payloads with no readable origin, pass.
        assert!(policy.may_publish("evil", "evil", own, claim("evil").as_bytes()));
        assert!(policy.may_publish("evil-2", "evil", own, claim("evil-north").as_bytes()));
        assert!(policy.may_publish("evil", "evil", own, br#"{"site":"home"}"#));
        assert!(policy.may_publish("evil", "evil", own, b"not json"));
        // The processor publishes readings under its own name; an admin may claim any.
        let processed = "wattbus/v1/home/meas/ct-1/l1";
        assert!(policy.may_publish(
            "rms-processor",
            "rms-processor",
            processed,
            claim("rms-processor").as_bytes()
        ));
        assert!(policy.may_publish("tools", "tools", own, claim("simulator").as_bytes()));
    }
}
