//! Machine rows: creation with an address lease and port claims in one transaction, state
//! compare-and-set, lookups. Part of the store: the only code that speaks SQL.

use super::{MACHINE_COLS, Machine, NewMachine, Result, Store, StoreError, exposes::claim, row_to_machine};
use crate::domain::{MachineState, NetworkName, Subnet};
use crate::spec::ExposeSpec;
use rusqlite::{OptionalExtension, Transaction, params};
use sistemo_vmm::Instance;
use std::net::Ipv4Addr;
use uuid::Uuid;

impl Store {
    /// All machines, oldest first.
    pub fn machines(&self) -> Result<Vec<Machine>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {MACHINE_COLS} FROM machines ORDER BY created_at, name"
        ))?;
        let rows = st.query_map([], row_to_machine)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Machines whose `col` (one of this module's fixed column names) is `val`.
    pub(super) fn machines_where(&self, col: &'static str, val: &str) -> Result<Vec<Machine>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {MACHINE_COLS} FROM machines WHERE {col} = ?1 ORDER BY created_at, name"
        ))?;
        let rows = st.query_map([val], row_to_machine)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Machines on a network.
    pub fn machines_on(&self, network: &NetworkName) -> Result<Vec<Machine>> {
        self.machines_where("network", network.as_str())
    }

    /// Names of machines deployed from `image`, joined with `, ` (empty when none).
    pub fn machines_using_image(&self, image: &str) -> Result<String> {
        Ok(self.names_of(self.machines_where("image", image)?))
    }

    /// Names joined with `, `, for messages that name the machines in the way.
    pub(super) fn names_of(&self, ms: Vec<Machine>) -> String {
        ms.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// A machine by UUID or name (an ID wins; names are never UUID-shaped).
    pub fn machine(&self, name_or_id: &str) -> Result<Machine> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {MACHINE_COLS} FROM machines WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1"
            ))?
            .query_row([name_or_id], row_to_machine)
            .optional()?
            .ok_or_else(|| {
                StoreError::NotFound(format!(
                    "machine {name_or_id:?} does not exist (see `sistemo machine list`)"
                ))
            })
    }

    /// A machine by ID.
    pub fn machine_by_id(&self, id: Uuid) -> Result<Machine> {
        self.machine(&id.to_string())
    }

    /// Insert a machine in state `creating`, leasing an address of its network (see
    /// [`allocate_ip`]: never-used ones first) and claiming its exposes, all in one transaction.
    pub fn create_machine(&mut self, m: &NewMachine, exposes: &[ExposeSpec]) -> Result<Machine> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if tx
            .query_row("SELECT 1 FROM machines WHERE name = ?1", [&m.name], |_| Ok(()))
            .optional()?
            .is_some()
        {
            return Err(StoreError::Conflict(format!(
                "machine name {:?} is already taken",
                m.name.as_str()
            )));
        }
        let subnet: Subnet = tx
            .query_row("SELECT subnet FROM networks WHERE name = ?1", [&m.network], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| {
                StoreError::NotFound(format!("network {:?} does not exist", m.network.as_str()))
            })?;
        let ip = allocate_ip(&tx, &m.network, subnet)?;
        let id = m.id.to_string();
        let slot = free_slot(&tx)?;
        tx.execute(
            "INSERT INTO machines(id, name, image, state, network, ip, vcpus, memory_mib, storage_bytes, restart, vmm_slot)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                id,
                m.name,
                m.image,
                MachineState::Creating,
                m.network,
                u32::from(ip),
                m.vcpus,
                m.memory_mib,
                m.storage_bytes,
                m.restart,
                slot
            ],
        )?;
        for e in exposes {
            claim(&tx, &id, e)?;
        }
        let row = tx.query_row(
            &format!("SELECT {MACHINE_COLS} FROM machines WHERE id = ?1"),
            [&id],
            row_to_machine,
        )?;
        tx.commit()?;
        Ok(row)
    }

    /// Compare-and-set a machine's state (clearing its error); fails with
    /// [`StoreError::WrongState`] when it is in none of `from`.
    pub fn transition(&self, id: Uuid, from: &[MachineState], to: MachineState) -> Result<()> {
        let id = id.to_string();
        let placeholders = (0..from.len())
            .map(|i| format!("?{}", i + 3))
            .collect::<Vec<_>>()
            .join(",");
        let mut p: Vec<&dyn rusqlite::ToSql> = vec![&id, &to];
        for f in from {
            p.push(f);
        }
        let n = self.conn.execute(
            &format!(
                "UPDATE machines SET state = ?2, error = NULL WHERE id = ?1 AND state IN ({placeholders})"
            ),
            p.as_slice(),
        )?;
        if n == 0 {
            let m = self.machine(&id)?;
            return Err(StoreError::WrongState {
                name: m.name,
                expected: from.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" or "),
                actual: m.state,
            });
        }
        Ok(())
    }

    /// Set the state unconditionally (the caller holds the machine's lock); `error` says why
    /// a machine is in state `error` and is cleared otherwise.
    pub fn set_state(&self, id: Uuid, state: MachineState, error: Option<&str>) -> Result<()> {
        self.conn.execute(
            "UPDATE machines SET state = ?2, error = ?3 WHERE id = ?1",
            params![id.to_string(), state, error],
        )?;
        Ok(())
    }

    /// Record the machine's disk size once it is created.
    pub fn set_storage(&self, id: Uuid, bytes: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE machines SET storage_bytes = ?2 WHERE id = ?1",
            params![id.to_string(), bytes],
        )?;
        Ok(())
    }

    /// Record (or clear) the running VMM instance.
    pub fn set_instance(&self, id: Uuid, instance: Option<&Instance>) -> Result<()> {
        let json = instance
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Sql(super::conv(e)))?;
        self.conn.execute(
            "UPDATE machines SET instance = ?2 WHERE id = ?1",
            params![id.to_string(), json],
        )?;
        Ok(())
    }

    /// Delete a machine with its exposes, claims and IP lease; the address is remembered as
    /// released, so it is handed out again only after every never-used one.
    pub fn delete_machine(&mut self, id: Uuid) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR REPLACE INTO released_ips(network, ip, seq)
             SELECT network, ip, (SELECT COALESCE(MAX(seq), 0) + 1 FROM released_ips)
             FROM machines WHERE id = ?1",
            [id.to_string()],
        )?;
        tx.execute("DELETE FROM machines WHERE id = ?1", [id.to_string()])?;
        tx.commit()?;
        Ok(())
    }
}

/// Usable host addresses of a subnet for machines: from .2 to the last before broadcast.
pub(super) fn host_range(subnet: Subnet) -> std::ops::RangeInclusive<u32> {
    let base = u32::from(subnet.net().network());
    let bcast = u32::from(subnet.net().broadcast());
    (base + 2)..=(bcast.saturating_sub(1))
}

/// The lowest slot no machine holds (its VMM's uid is derived from it; see
/// `sistemo_vmm::MachineSpec::slot`), found through the unique index.
fn free_slot(tx: &Transaction<'_>) -> Result<u32> {
    let slot: u32 = tx.query_row(
        "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM machines WHERE vmm_slot = 0) THEN 0
         ELSE (SELECT MIN(a.vmm_slot) + 1 FROM machines a
               WHERE NOT EXISTS (SELECT 1 FROM machines b WHERE b.vmm_slot = a.vmm_slot + 1)) END",
        [],
        |r| r.get(0),
    )?;
    if slot >= sistemo_vmm::MACHINE_SLOTS {
        return Err(StoreError::Conflict(format!(
            "this host holds {} machines already, the most it can (allowed: fewer than {})",
            slot,
            sistemo_vmm::MACHINE_SLOTS
        )));
    }
    Ok(slot)
}

/// An address for a new machine: the lowest never-used one from .2 (neither leased nor
/// released), else the least recently released one. A released address may still be in
/// flows, caches and clients' minds of the old holder, so it comes back last. Both are found by
/// the indexes (no row is loaded into the process); the lease drops the address from
/// `released_ips`.
fn allocate_ip(tx: &Transaction<'_>, network: &NetworkName, subnet: Subnet) -> Result<Ipv4Addr> {
    let range = host_range(subnet);
    let (first, last) = (*range.start(), *range.end());
    // The first used address that has no used successor, plus one (or .2 when unused).
    let fresh: Option<u32> = tx.query_row(
        "WITH used(ip) AS (
            SELECT ip FROM machines WHERE network = ?1 AND ip >= ?2
            UNION ALL SELECT ip FROM released_ips WHERE network = ?1 AND ip >= ?2)
         SELECT CASE
            WHEN NOT EXISTS (SELECT 1 FROM machines WHERE network = ?1 AND ip = ?2)
             AND NOT EXISTS (SELECT 1 FROM released_ips WHERE network = ?1 AND ip = ?2) THEN ?2
            ELSE (SELECT MIN(u.ip) + 1 FROM used u
                  WHERE NOT EXISTS (SELECT 1 FROM machines x WHERE x.network = ?1 AND x.ip = u.ip + 1)
                    AND NOT EXISTS (SELECT 1 FROM released_ips r WHERE r.network = ?1 AND r.ip = u.ip + 1))
         END",
        params![network, first],
        |r| r.get(0),
    )?;
    let ip = match fresh.filter(|c| range.contains(c)) {
        Some(ip) => ip,
        None => tx
            .query_row(
                "SELECT r.ip FROM released_ips r WHERE r.network = ?1 AND r.ip BETWEEN ?2 AND ?3
                   AND NOT EXISTS (SELECT 1 FROM machines m WHERE m.network = ?1 AND m.ip = r.ip)
                 ORDER BY r.seq LIMIT 1",
                params![network, first, last],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::Exhausted {
                network: network.clone(),
                subnet,
            })?,
    };
    tx.execute(
        "DELETE FROM released_ips WHERE network = ?1 AND ip = ?2",
        params![network, ip],
    )?;
    Ok(Ipv4Addr::from(ip))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{machine, store};
    use super::*;
    use crate::store::Network;

    #[test]
    fn ip_sequential_and_released_ones_not_reused_while_fresh_ones_remain() {
        let mut s = store();
        let a = s.create_machine(&machine("a"), &[]).unwrap();
        let b = s.create_machine(&machine("b"), &[]).unwrap();
        let c = s.create_machine(&machine("c"), &[]).unwrap();
        assert_eq!(
            (a.ip, b.ip, c.ip),
            (
                "10.200.0.2".parse().unwrap(),
                "10.200.0.3".parse().unwrap(),
                "10.200.0.4".parse().unwrap()
            )
        );
        s.delete_machine(b.id).unwrap();
        let d = s.create_machine(&machine("d"), &[]).unwrap();
        assert_eq!(
            d.ip.to_string(),
            "10.200.0.5",
            "a released address is not reused first"
        );
        s.delete_machine(a.id).unwrap();
        let e = s.create_machine(&machine("e"), &[]).unwrap();
        assert_eq!(e.ip.to_string(), "10.200.0.6", "nor one released at .2");
    }

    fn tiny(s: &mut Store) {
        s.create_network(&Network {
            name: "tiny".parse().unwrap(),
            bridge: "t0".parse().unwrap(),
            subnet: "10.9.0.0/29".parse().unwrap(),
        })
        .unwrap();
    }

    fn on_tiny(name: &str) -> NewMachine {
        let mut m = machine(name);
        m.network = "tiny".parse().unwrap();
        m
    }

    #[test]
    fn released_ips_come_back_least_recently_released_first() {
        let mut s = Store::in_memory().unwrap();
        tiny(&mut s);
        // .2 to .6: five addresses
        let ms: Vec<Machine> = (0..5)
            .map(|i| s.create_machine(&on_tiny(&format!("x{i}")), &[]).unwrap())
            .collect();
        // released in the order .5, .2, .4
        for i in [3, 0, 2] {
            s.delete_machine(ms[i].id).unwrap();
        }
        let next = |s: &mut Store, n: &str| s.create_machine(&on_tiny(n), &[]).unwrap().ip.to_string();
        assert_eq!(next(&mut s, "y0"), "10.9.0.5", "least recently released first");
        assert_eq!(next(&mut s, "y1"), "10.9.0.2");
        // .2 is released again: it goes to the back of the queue, behind .4
        let y1 = s.machine("y1").unwrap();
        s.delete_machine(y1.id).unwrap();
        assert_eq!(next(&mut s, "y2"), "10.9.0.4");
        assert_eq!(next(&mut s, "y3"), "10.9.0.2");
        assert!(matches!(
            s.create_machine(&on_tiny("z"), &[]),
            Err(StoreError::Exhausted { .. })
        ));
    }

    #[test]
    fn a_fresh_address_above_released_ones_wins() {
        let mut s = Store::in_memory().unwrap();
        tiny(&mut s);
        let a = s.create_machine(&on_tiny("a"), &[]).unwrap();
        let b = s.create_machine(&on_tiny("b"), &[]).unwrap();
        s.delete_machine(a.id).unwrap();
        s.delete_machine(b.id).unwrap();
        // everything leased is gone; .4 was never used
        assert_eq!(
            s.create_machine(&on_tiny("c"), &[]).unwrap().ip.to_string(),
            "10.9.0.4"
        );
    }

    #[test]
    fn exhausted_subnet() {
        let mut s = Store::in_memory().unwrap();
        s.create_network(&Network {
            name: "tiny".parse().unwrap(),
            bridge: "t0".parse().unwrap(),
            subnet: "10.9.0.0/29".parse().unwrap(),
        })
        .unwrap();
        for i in 0..5 {
            let mut m = machine(&format!("x{i}"));
            m.network = "tiny".parse().unwrap();
            assert_eq!(
                s.create_machine(&m, &[]).unwrap().ip.to_string(),
                format!("10.9.0.{}", i + 2)
            );
        }
        let mut m = machine("y");
        m.network = "tiny".parse().unwrap();
        assert!(matches!(
            s.create_machine(&m, &[]),
            Err(StoreError::Exhausted { .. })
        ));
    }

    #[test]
    fn cas_transition_and_error_reason() {
        let mut s = store();
        let a = s.create_machine(&machine("a"), &[]).unwrap();
        s.transition(a.id, &[MachineState::Creating], MachineState::Running)
            .unwrap();
        let e = s
            .transition(a.id, &[MachineState::Stopped], MachineState::Running)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "machine a is running, not stopped");
        s.set_state(a.id, MachineState::Error, Some("qemu died")).unwrap();
        let m = s.machine("a").unwrap();
        assert_eq!(
            (m.state, m.error.as_deref()),
            (MachineState::Error, Some("qemu died"))
        );
        s.transition(a.id, &[MachineState::Error], MachineState::Starting)
            .unwrap();
        assert_eq!(
            s.machine("a").unwrap().error,
            None,
            "a transition clears the reason"
        );
    }

    #[test]
    fn an_id_is_never_shadowed_by_a_name() {
        let mut s = store();
        let a = s.create_machine(&machine("a"), &[]).unwrap();
        assert_eq!(s.machine(&a.id.to_string()).unwrap().name.as_str(), "a");
        assert!(s.machine("nope").unwrap_err().to_string().contains("\"nope\""));
    }
}
