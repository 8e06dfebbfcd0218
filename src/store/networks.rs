//! Network rows (name, bridge, subnet; no two overlap) and the audit log.
//! Part of the store: the only code that speaks SQL.

use super::{Network, Result, Store, StoreError};

/// Who made a change: the uid of a Unix-socket caller, or the address of a TCP API caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The caller's uid, from the socket's peer credentials.
    pub uid: Option<u32>,
    /// The TCP API caller's address.
    pub remote: Option<String>,
    /// Who: `user alice`, `token ci`, or the local account of the socket's uid.
    pub actor: Option<String>,
}
use crate::domain::{IfName, NetworkName, Subnet};
use rusqlite::params;

impl Store {
    /// All networks, by name.
    pub fn networks(&self) -> Result<Vec<Network>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT name, bridge, subnet FROM networks ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(Network {
                name: r.get(0)?,
                bridge: r.get(1)?,
                subnet: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One network by name.
    pub fn network(&self, name: &str) -> Result<Network> {
        self.networks()?
            .into_iter()
            .find(|n| n.name == *name)
            .ok_or_else(|| {
                StoreError::NotFound(format!(
                    "network {name:?} does not exist (see `sistemo network list`)"
                ))
            })
    }

    /// Create a network; refused when its name, bridge or subnet is taken by another network.
    /// (Overlaps with host routes are the caller's to check: they are not in the database.)
    pub fn create_network(&self, n: &Network) -> Result<()> {
        for o in self.networks()? {
            if o.name == n.name {
                return Err(StoreError::Conflict(format!(
                    "network {:?} already exists",
                    n.name.as_str()
                )));
            }
            if o.subnet.overlaps(n.subnet.net()) {
                return Err(StoreError::Conflict(format!(
                    "subnet {} overlaps network {} ({}); choose a subnet that does not",
                    n.subnet, o.name, o.subnet
                )));
            }
            if o.bridge == n.bridge {
                return Err(StoreError::Conflict(format!(
                    "bridge {} is used by network {}",
                    n.bridge, o.name
                )));
            }
        }
        self.conn.execute(
            "INSERT INTO networks(name, bridge, subnet) VALUES (?1, ?2, ?3)",
            params![n.name, n.bridge, n.subnet],
        )?;
        Ok(())
    }

    /// Change a network's subnet (and bridge); refused, naming them, when machines would not fit.
    pub fn set_network_subnet(&self, name: &NetworkName, bridge: &IfName, subnet: Subnet) -> Result<()> {
        let misfits: Vec<String> = self
            .machines_on(name)?
            .into_iter()
            .filter(|m| !super::machines::host_range(subnet).contains(&u32::from(m.ip)))
            .map(|m| format!("{} ({})", m.name, m.ip))
            .collect();
        if !misfits.is_empty() {
            return Err(StoreError::Conflict(format!(
                "subnet {subnet} for network {name} does not contain machine(s) {}; delete them first or keep the old subnet",
                misfits.join(", ")
            )));
        }
        self.conn.execute(
            "UPDATE networks SET subnet = ?2, bridge = ?3 WHERE name = ?1",
            params![name, subnet, bridge],
        )?;
        Ok(())
    }

    /// Delete a network; refused, naming them, while machines use it.
    pub fn delete_network(&self, name: &str) -> Result<()> {
        let users = self.names_of(self.machines_where("network", name)?);
        if !users.is_empty() {
            return Err(StoreError::Conflict(format!(
                "network {name:?} is used by machine(s) {users}; delete them first"
            )));
        }
        if self
            .conn
            .execute("DELETE FROM networks WHERE name = ?1", [name])?
            == 0
        {
            return Err(StoreError::NotFound(format!("network {name:?} does not exist")));
        }
        Ok(())
    }

    // ---- history ----

    /// Append an audit entry by a caller (`uid` on the socket, `remote` on the TCP API),
    /// keeping at most `keep` entries (the oldest go).
    pub fn record(&self, caller: &Caller, action: &str, target: &str, result: &str, keep: u32) -> Result<()> {
        self.conn.execute(
            "INSERT INTO history(uid, remote, action, target, result, actor) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![caller.uid, caller.remote, action, target, result, caller.actor],
        )?;
        // Cheap by the primary key; runs on every write so the log never grows past `keep`.
        self.conn.execute(
            "DELETE FROM history WHERE id <= (SELECT max(id) FROM history) - ?1",
            [keep],
        )?;
        Ok(())
    }

    /// The newest entries first; `action` matches exactly or as a prefix (`machine`).
    pub fn history(
        &self,
        limit: u32,
        offset: u32,
        action: Option<&str>,
        target: Option<&str>,
    ) -> Result<Vec<HistoryRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT at, uid, action, target, result, remote, actor FROM history
             WHERE (?1 IS NULL OR action = ?1 OR action LIKE ?1 || '.%') AND (?2 IS NULL OR target = ?2)
             ORDER BY id DESC LIMIT ?3 OFFSET ?4",
        )?;
        let rows = st.query_map(params![action, target, limit, offset], |r| {
            Ok(HistoryRow {
                at: r.get(0)?,
                uid: r.get(1)?,
                action: r.get(2)?,
                target: r.get(3)?,
                result: r.get(4)?,
                remote: r.get(5)?,
                actor: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// One audit-log entry as stored.
#[derive(Debug, Clone)]
pub struct HistoryRow {
    /// Time (UTC, RFC 3339).
    pub at: String,
    /// The caller's uid (the Unix socket's peer credentials), if known.
    pub uid: Option<u32>,
    /// A TCP API caller's address.
    pub remote: Option<String>,
    /// Who: `user alice`, `token ci`, or the local account behind the uid.
    pub actor: Option<String>,
    /// Action, e.g. `machine.expose`.
    pub action: String,
    /// What it acted on.
    pub target: String,
    /// `ok` or the error.
    pub result: String,
}

#[cfg(test)]
mod tests {
    use super::super::tests::{machine, store};

    #[test]
    fn subnet_change_names_misfits() {
        let mut s = store();
        s.create_machine(&machine("web"), &[]).unwrap();
        let (def, br) = ("default".parse().unwrap(), "sistemo0".parse().unwrap());
        let e = s
            .set_network_subnet(&def, &br, "10.201.0.0/24".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("web (10.200.0.2)"), "{e}");
        s.set_network_subnet(&def, &br, "10.200.0.0/24".parse().unwrap())
            .unwrap();
    }

    #[test]
    fn history_keeps_the_newest_entries() {
        let s = store();
        let c = super::Caller {
            uid: None,
            remote: Some("10.0.0.9:41234".into()),
            actor: None,
        };
        for i in 0..10 {
            s.record(&c, "machine.exec", &format!("t{i}"), "ok", 4).unwrap();
        }
        let h = s.history(100, 0, None, None).unwrap();
        assert_eq!(
            h.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(),
            ["t9", "t8", "t7", "t6"]
        );
        assert_eq!(h[0].remote.as_deref(), Some("10.0.0.9:41234"));
        let page: Vec<_> = s
            .history(2, 1, None, None)
            .unwrap()
            .into_iter()
            .map(|e| e.target)
            .collect();
        assert_eq!(page, ["t8", "t7"], "--offset skips the newest");
    }

    #[test]
    fn networks_in_use_are_kept_naming_their_machines() {
        let mut s = store();
        s.create_machine(&machine("web"), &[]).unwrap();
        let e = s.delete_network("default").unwrap_err().to_string();
        assert!(e.contains("web"), "{e}");
    }
}
