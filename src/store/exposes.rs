//! Expose rows and their per-port claims: one machine per (address, protocol, port), enforced
//! by the primary key in one transaction. Part of the store: the only code that speaks SQL.

use super::{Result, Store, StoreError, bind_str, expose_at};
use crate::domain::{MachineName, MachineState};
use crate::spec::{ExposeSpec, HostPortSpec};
use rusqlite::{OptionalExtension, Transaction, params};
use std::net::Ipv4Addr;
use uuid::Uuid;

impl Store {
    /// The machine's exposes, in the order they were added.
    pub fn exposes_of(&self, machine_id: Uuid) -> Result<Vec<ExposeSpec>> {
        let mut st = self.conn.prepare_cached(
            "SELECT bind, proto, host_start, host_end, machine_start
             FROM exposes WHERE machine_id = ?1 ORDER BY id",
        )?;
        let rows = st.query_map([machine_id.to_string()], |r| expose_at(r, 0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every expose with its machine's name and state, for `sistemo ports`.
    pub fn all_exposes(&self) -> Result<Vec<(MachineName, MachineState, ExposeSpec)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT m.name, m.state, e.bind, e.proto, e.host_start, e.host_end, e.machine_start
             FROM exposes e JOIN machines m ON m.id = e.machine_id ORDER BY e.proto, e.host_start",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, expose_at(r, 2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Exposes of running machines with their target address: what the firewall must hold.
    pub fn active_exposes(&self) -> Result<Vec<(Ipv4Addr, ExposeSpec)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT m.ip, e.bind, e.proto, e.host_start, e.host_end, e.machine_start
             FROM exposes e JOIN machines m ON m.id = e.machine_id WHERE m.state = ?1",
        )?;
        let rows = st.query_map([MachineState::Running], |r| {
            Ok((Ipv4Addr::from(r.get::<_, u32>(0)?), expose_at(r, 1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Add exposes to a machine; all or none (a conflict names the machine holding the port).
    pub fn add_exposes(&mut self, machine_id: Uuid, specs: &[ExposeSpec]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let id = machine_id.to_string();
        for s in specs {
            claim(&tx, &id, s)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Remove the machine's exposes whose host side matches `h` exactly or lies inside it;
    /// returns the removed specs (empty means nothing matched).
    pub fn remove_exposes(&mut self, machine_id: Uuid, h: &HostPortSpec) -> Result<Vec<ExposeSpec>> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let found: Vec<(i64, ExposeSpec)> = {
            let mut st = tx.prepare_cached(
                "SELECT id, bind, proto, host_start, host_end, machine_start
                 FROM exposes WHERE machine_id = ?1 AND proto = ?2 AND host_start >= ?3 AND host_end <= ?4",
            )?;
            st.query_map(
                params![
                    machine_id.to_string(),
                    h.proto.as_str(),
                    h.ports.start().get(),
                    h.ports.end().get()
                ],
                |r| Ok((r.get(0)?, expose_at(r, 1)?)),
            )?
            .collect::<rusqlite::Result<_>>()?
        };
        let found: Vec<_> = found
            .into_iter()
            .filter(|(_, s)| h.bind.is_none() || s.host.bind == h.bind)
            .collect();
        for (id, _) in &found {
            tx.execute("DELETE FROM exposes WHERE id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(found.into_iter().map(|(_, s)| s).collect())
    }
}

/// Claim every host port of `s` for `machine_id`, or fail naming the holder.
/// A wildcard binding conflicts with any specific one on that port and vice versa.
pub(super) fn claim(tx: &Transaction<'_>, machine_id: &str, s: &ExposeSpec) -> Result<()> {
    let bind = bind_str(s.host.bind);
    let proto = s.host.proto.as_str();
    let holder: Option<(String, u16, String)> = tx
        .prepare_cached(
            "SELECT m.name, c.port, c.bind FROM port_claims c
             JOIN exposes e ON e.id = c.expose_id JOIN machines m ON m.id = e.machine_id
             WHERE c.proto = ?1 AND c.port BETWEEN ?2 AND ?3 AND (c.bind = ?4 OR c.bind = '' OR ?4 = '')
             LIMIT 1",
        )?
        .query_row(
            params![proto, s.host.ports.start().get(), s.host.ports.end().get(), bind],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((name, port, b)) = holder {
        let at = if b.is_empty() {
            String::new()
        } else {
            format!("{b}:")
        };
        return Err(StoreError::Conflict(format!(
            "host port {at}{port}/{proto} is already exposed by machine {name:?} (one machine per host port; unexpose it there first)"
        )));
    }
    tx.execute(
        "INSERT INTO exposes(machine_id, bind, proto, host_start, host_end, machine_start) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![machine_id, bind, proto, s.host.ports.start().get(), s.host.ports.end().get(), s.machine.start().get()],
    )?;
    let id = tx.last_insert_rowid();
    let mut ins =
        tx.prepare_cached("INSERT INTO port_claims(proto, port, bind, expose_id) VALUES (?1, ?2, ?3, ?4)")?;
    for p in s.host.ports.ports() {
        ins.execute(params![proto, p, bind, id])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{machine, store};

    #[test]
    fn conflicts_name_the_holder() {
        let mut s = store();
        let a = s
            .create_machine(&machine("web"), &["8000-8010".parse().unwrap()])
            .unwrap();
        let b = s.create_machine(&machine("api"), &[]).unwrap();
        let e = s
            .add_exposes(b.id, &["8005:80".parse().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("8005/tcp") && e.contains("\"web\""), "{e}");
        // udp is a different port space
        s.add_exposes(b.id, &["8005/udp".parse().unwrap()]).unwrap();
        // wildcard vs bound
        s.add_exposes(b.id, &["127.0.0.1:9000:80".parse().unwrap()])
            .unwrap();
        assert!(s.add_exposes(a.id, &["9000".parse().unwrap()]).is_err());
        s.add_exposes(a.id, &["127.0.0.2:9000:80".parse().unwrap()])
            .unwrap();
        // all or nothing
        assert!(
            s.add_exposes(a.id, &["7000".parse().unwrap(), "8005/udp".parse().unwrap()])
                .is_err()
        );
        assert!(
            s.exposes_of(a.id)
                .unwrap()
                .iter()
                .all(|e| e.host.ports.start().get() != 7000)
        );
        // unexpose
        let removed = s.remove_exposes(b.id, &"8005/udp".parse().unwrap()).unwrap();
        assert_eq!(removed.len(), 1);
        assert!(
            s.remove_exposes(b.id, &"8005/udp".parse().unwrap())
                .unwrap()
                .is_empty()
        );
        // delete releases claims
        s.delete_machine(a.id).unwrap();
        s.add_exposes(b.id, &["8000".parse().unwrap()]).unwrap();
    }
}
