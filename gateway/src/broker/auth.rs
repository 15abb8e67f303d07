//! Who may connect to the embedded broker: the `[broker.users.*]` accounts, checked when a client
//! sends CONNECT (rumqttd's external authentication hook).
//!
//! Passwords live in files (re-read at every login, so a change needs no restart) or as Argon2 PHC
//! hashes in the TOML, never as plain text in it. Verification runs on the blocking pool: an
//! Argon2 check costs tens of milliseconds, and rumqttd serves every connection of a listener on
//! one current-thread runtime. A failed login answers only after a pause, which makes guessing
//! over the network slow without holding a thread.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use subtle::ConstantTimeEq;
use tracing::warn;

use crate::config::BrokerUser;
use crate::metrics::Counter;

/// How long a refused login waits before the connection is closed.
const FAILURE_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
enum Secret {
    File(PathBuf),
    Hash(String),
}

/// The accounts of the broker, plus the start-up probe's own one-time login.
#[derive(Debug)]
pub struct Accounts {
    users: HashMap<String, Secret>,
    probe: (String, String),
    failures: Arc<Counter>,
}

/// The user name of the gateway's own start-up probe.
pub const PROBE_USER: &str = "updraft-startup-probe";

impl Accounts {
    /// `None` when no users are configured: the broker then takes anonymous clients.
    pub fn new(users: &std::collections::BTreeMap<String, BrokerUser>, failures: Arc<Counter>) -> Option<Arc<Self>> {
        if users.is_empty() {
            return None;
        }
        let users = users
            .iter()
            .filter_map(|(name, u)| {
                let secret = match (&u.password_file, &u.password_hash) {
                    (Some(f), _) => Secret::File(f.clone()),
                    (None, Some(h)) => Secret::Hash(h.clone()),
                    (None, None) => return None,
                };
                Some((name.clone(), secret))
            })
            .collect();
        // A fresh random password per process: the probe can log in, nobody else can guess it.
        let probe = (PROBE_USER.to_owned(), format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)));
        Some(Arc::new(Accounts { users, probe, failures }))
    }

    /// The probe's login (user, password).
    pub fn probe_login(&self) -> (&str, &str) {
        (&self.probe.0, &self.probe.1)
    }

    /// Checks one login. Blocking: file reads and Argon2.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        if user == self.probe.0 {
            return bool::from(password.as_bytes().ct_eq(self.probe.1.as_bytes()));
        }
        match self.users.get(user) {
            Some(Secret::File(f)) => match crate::sinks::tls::read_secret(f) {
                Ok(expected) => !expected.is_empty() && bool::from(password.as_bytes().ct_eq(expected.as_bytes())),
                Err(e) => {
                    warn!(%user, error = %e, "Cannot read the broker user's password file; login refused.");
                    false
                }
            },
            Some(Secret::Hash(h)) => verify_hash(h, password),
            None => false,
        }
    }

    /// rumqttd's hook: verifies on the blocking pool, counts and logs refusals, pauses after one.
    pub fn install(self: &Arc<Self>, settings: &mut rumqttd::ConnectionSettings) {
        let accounts = self.clone();
        settings.set_auth_handler(move |client_id: String, user: String, password: String| {
            let accounts = accounts.clone();
            async move {
                let a = accounts.clone();
                let u = user.clone();
                let ok = tokio::task::spawn_blocking(move || a.verify(&u, &password)).await.unwrap_or(false);
                if !ok {
                    accounts.failures.inc();
                    let n = accounts.failures.get();
                    // The first refusals and then every hundredth: a guessing client must not flood the journal.
                    if n <= 10 || n % 100 == 0 {
                        warn!(%client_id, %user, refused_total = n, "MQTT login refused.");
                    }
                    tokio::time::sleep(FAILURE_PAUSE).await;
                }
                ok
            }
        });
    }
}

fn verify_hash(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => Argon2::default().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// Whether a configured hash is an Argon2 PHC string this gateway can verify.
pub fn check_hash(hash: &str) -> Result<(), String> {
    let h = PasswordHash::new(hash)
        .map_err(|e| format!("password_hash is not a PHC hash string ({e}); make one with `updraft hash-password`"))?;
    if !h.algorithm.as_str().starts_with("argon2") {
        return Err(format!(
            "password_hash uses `{}`; only Argon2 (argon2id, argon2i, argon2d) is accepted — make one with `updraft hash-password`",
            h.algorithm
        ));
    }
    Ok(())
}

/// A new Argon2id hash of `password` with a random salt from the OS, for `updraft hash-password`.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_wrong_passwords_do_not() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        check_hash(&h).unwrap();
        assert!(verify_hash(&h, "s3cret"));
        assert!(!verify_hash(&h, "s3cret "));
        assert!(check_hash("s3cret").is_err());
        assert!(check_hash("$2b$12$abcdefghijklmnopqrstuu").is_err());
    }

    #[test]
    fn password_files_and_the_probe_log_in() {
        let dir = crate::sinks::scratch_dir("auth");
        let f = dir.join("pw");
        std::fs::write(&f, "hunter2\n").unwrap();
        let users = std::collections::BTreeMap::from([
            ("hmi".to_owned(), BrokerUser { password_file: Some(f), ..Default::default() }),
            ("empty".to_owned(), BrokerUser { password_file: Some(dir.join("missing")), ..Default::default() }),
        ]);
        let a = Accounts::new(&users, Arc::default()).unwrap();
        assert!(a.verify("hmi", "hunter2"));
        assert!(!a.verify("hmi", "hunter"));
        assert!(!a.verify("nobody", "hunter2"));
        assert!(!a.verify("empty", ""));
        let (u, p) = a.probe_login();
        assert!(a.verify(u, p));
        assert!(!a.verify(u, "guess"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
