//! A fleet: many memds, each named, with its address and the files that
//! hold its tokens. `cargo xtask libvirt start` keeps one in
//! `.memd/fleet.json` as it starts domains; `memctl --fleet FILE` runs the
//! read-only views across it.
//!
//! ```json
//! {"members": [{"name": "memd-1", "addr": "127.0.0.1:5601",
//!               "token_file": "/path/token", "operator_token_file": "/path/operator-token"}]}
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{Client, Error, Options, Result};

/// One memd of a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name (a libvirt domain's name).
    pub name: String,
    /// Its control address.
    pub addr: String,
    /// The file holding its client token.
    pub token_file: PathBuf,
    /// The file holding its operator token.
    pub operator_token_file: PathBuf,
}

/// The members of a fleet, in the file's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    pub members: Vec<Member>,
}

impl Fleet {
    /// Reads a fleet file; a missing file is an empty fleet.
    pub fn load(path: &Path) -> Result<Fleet> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Fleet::default()),
            Err(e) => return Err(Error::Fleet(format!("{}: {e}", path.display()))),
        };
        let bad = |why: &str| Error::Fleet(format!("{}: {why}", path.display()));
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let members = v["members"]
            .as_array()
            .ok_or_else(|| bad("no \"members\" array"))?
            .iter()
            .map(|m| {
                let field = |k: &str| {
                    m[k].as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad(&format!("a member without \"{k}\"")))
                };
                Ok(Member {
                    name: field("name")?,
                    addr: field("addr")?,
                    token_file: field("token_file")?.into(),
                    operator_token_file: field("operator_token_file")?.into(),
                })
            })
            .collect::<Result<Vec<Member>>>()?;
        Ok(Fleet { members })
    }

    /// Writes the fleet file, mode 0600 (it names where tokens are), whole:
    /// a temporary file beside it renamed over it.
    pub fn save(&self, path: &Path) -> Result<()> {
        let members: Vec<Value> = self
            .members
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "addr": m.addr,
                    "token_file": m.token_file,
                    "operator_token_file": m.operator_token_file,
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&json!({ "members": members }))
            .map_err(|e| Error::Fleet(e.to_string()))?;
        let io = |e: std::io::Error| Error::Fleet(format!("{}: {e}", path.display()));
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Adds `member`, replacing one of the same name.
    pub fn put(&mut self, member: Member) {
        self.members.retain(|m| m.name != member.name);
        self.members.push(member);
    }

    /// Removes the member named `name`; whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.members.len();
        self.members.retain(|m| m.name != name);
        self.members.len() != before
    }
}

impl Member {
    /// Its client token and its operator token, read from their files.
    pub fn tokens(&self) -> Result<(String, String)> {
        let read = |file: &Path| {
            std::fs::read_to_string(file)
                .map(|t| t.trim().to_string())
                .map_err(|e| Error::Fleet(format!("{}: {e}", file.display())))
        };
        Ok((read(&self.token_file)?, read(&self.operator_token_file)?))
    }

    /// Connects once with its client token (`operator` false) or its
    /// operator token, each read waiting `timeout` at most: a memd that is
    /// down is not retried.
    pub fn connect(&self, operator: bool, timeout: Duration) -> Result<Client> {
        let (client, op) = self.tokens()?;
        let mut opts = Options::new(self.addr.clone(), if operator { op } else { client });
        opts.ready_timeout = Duration::ZERO;
        opts.io_timeout = Some(timeout);
        Client::connect(&opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_file_round_trips_and_members_are_named_once() {
        let dir = std::env::temp_dir().join(format!("memd-fleet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fleet.json");
        assert_eq!(
            Fleet::load(&path).unwrap(),
            Fleet::default(),
            "missing: empty"
        );
        let member = |name: &str, port: u16| Member {
            name: name.into(),
            addr: format!("127.0.0.1:{port}"),
            token_file: dir.join(name).join("token"),
            operator_token_file: dir.join(name).join("operator-token"),
        };
        let mut f = Fleet::default();
        f.put(member("a", 1));
        f.put(member("b", 2));
        f.put(member("a", 3));
        assert_eq!(f.members, [member("b", 2), member("a", 3)]);
        f.save(&path).unwrap();
        assert_eq!(Fleet::load(&path).unwrap(), f);
        assert!(f.remove("b") && !f.remove("b"));
        std::fs::write(&path, "{\"members\": [{\"name\": \"x\"}]}").unwrap();
        assert!(Fleet::load(&path).is_err(), "a member without an address");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
