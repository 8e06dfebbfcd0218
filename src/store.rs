//! The state store: the only code that speaks SQL. SQLite in WAL mode with numbered migrations.
//! Holds networks, machines (with their IP lease), exposes and their per-port claims, and history.

use crate::spec::{ExposeSpec, HostPortSpec, PortRange, Protocol};
use ipnet::Ipv4Net;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::Path;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A name or port is already taken.
    #[error("{0}")]
    Conflict(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The network has no free address left.
    #[error("network {network} ({subnet}) has no free address left")]
    Exhausted {
        /// Network name.
        network: String,
        /// Its subnet.
        subnet: Ipv4Net,
    },
    /// A state transition was refused because the machine is in another state.
    #[error("machine {name} is {actual}, not {expected}")]
    WrongState {
        /// Machine name.
        name: String,
        /// State the operation needs.
        expected: String,
        /// State it is in.
        actual: String,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

/// Numbered migrations; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "CREATE TABLE networks (
        name TEXT PRIMARY KEY,
        bridge TEXT NOT NULL UNIQUE,
        subnet TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now'))
     );
     CREATE TABLE machines (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        image TEXT NOT NULL,
        state TEXT NOT NULL,
        network TEXT NOT NULL REFERENCES networks(name),
        ip INTEGER NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        storage_bytes INTEGER NOT NULL,
        instance TEXT,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now'))
     );
     CREATE UNIQUE INDEX machines_network_ip ON machines(network, ip);
     CREATE TABLE exposes (
        id INTEGER PRIMARY KEY,
        machine_id TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
        bind TEXT NOT NULL DEFAULT '',
        proto TEXT NOT NULL,
        host_start INTEGER NOT NULL,
        host_end INTEGER NOT NULL,
        machine_start INTEGER NOT NULL
     );
     CREATE INDEX exposes_machine ON exposes(machine_id);
     CREATE TABLE port_claims (
        proto TEXT NOT NULL,
        port INTEGER NOT NULL,
        bind TEXT NOT NULL,
        expose_id INTEGER NOT NULL REFERENCES exposes(id) ON DELETE CASCADE,
        PRIMARY KEY (proto, port, bind)
     ) WITHOUT ROWID;
     CREATE INDEX port_claims_expose ON port_claims(expose_id);
     CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
        uid INTEGER,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        result TEXT NOT NULL
     );",
];

/// A named network: a bridge and a subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Name (`default` for the built-in one).
    pub name: String,
    /// Bridge interface.
    pub bridge: String,
    /// Subnet; the bridge holds its first host address.
    pub subnet: Ipv4Net,
}

impl Network {
    /// The gateway: the subnet's first host address, held by the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }
}

/// A machine as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// UUID.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Image reference it was deployed from.
    pub image: String,
    /// `creating`, `running`, `stopped`, `error`.
    pub state: String,
    /// Network name.
    pub network: String,
    /// Leased address (kept across stop/start/restart, released on delete).
    pub ip: Ipv4Addr,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk size in bytes.
    pub storage_bytes: u64,
    /// The running VMM, as JSON of `sistemo_vmm::Instance`.
    pub instance: Option<String>,
    /// Creation time (UTC).
    pub created_at: String,
}

/// One stored expose of a machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Expose {
    /// Row id.
    pub id: i64,
    /// Owning machine.
    pub machine_id: String,
    /// The spec.
    pub spec: ExposeSpec,
}

/// An expose joined with what the firewall needs to render it.
#[derive(Debug, Clone)]
pub struct ActiveExpose {
    /// The spec.
    pub spec: ExposeSpec,
    /// Target machine address.
    pub ip: Ipv4Addr,
}

/// One audit-log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Time (UTC, RFC 3339).
    pub at: String,
    /// Caller's uid from the socket's peer credentials, if known.
    pub uid: Option<u32>,
    /// Action, e.g. `machine.expose`.
    pub action: String,
    /// What it acted on.
    pub target: String,
    /// `ok` or the error.
    pub result: String,
}

/// The store: one SQLite connection (the daemon serialises access behind a mutex).
pub struct Store {
    conn: Connection,
}

fn bind_str(b: Option<Ipv4Addr>) -> String {
    b.map(|a| a.to_string()).unwrap_or_default()
}

fn row_to_machine(r: &rusqlite::Row<'_>) -> rusqlite::Result<Machine> {
    Ok(Machine {
        id: r.get(0)?,
        name: r.get(1)?,
        image: r.get(2)?,
        state: r.get(3)?,
        network: r.get(4)?,
        ip: Ipv4Addr::from(r.get::<_, u32>(5)?),
        vcpus: r.get(6)?,
        memory_mib: r.get(7)?,
        storage_bytes: r.get(8)?,
        instance: r.get(9)?,
        created_at: r.get(10)?,
    })
}

const MACHINE_COLS: &str =
    "id, name, image, state, network, ip, vcpus, memory_mib, storage_bytes, instance, created_at";

fn row_to_expose(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, String, ExposeSpec)> {
    let bind: String = r.get(2)?;
    let proto: String = r.get(3)?;
    let (hs, he, ms): (u16, u16, u16) = (r.get(4)?, r.get(5)?, r.get(6)?);
    let conv = |e: String| rusqlite::Error::ToSqlConversionFailure(e.into());
    let host = PortRange::new(hs.try_into().map_err(conv)?, he.try_into().map_err(conv)?)
        .ok_or_else(|| conv("bad range".into()))?;
    let mend = ms + (he - hs);
    let machine = PortRange::new(ms.try_into().map_err(conv)?, mend.try_into().map_err(conv)?)
        .ok_or_else(|| conv("bad range".into()))?;
    Ok((
        r.get(0)?,
        r.get(1)?,
        ExposeSpec {
            host: HostPortSpec {
                bind: if bind.is_empty() { None } else { bind.parse().ok() },
                ports: host,
                proto: proto.parse().map_err(conv)?,
            },
            machine,
        },
    ))
}

impl Store {
    /// Open (or create) the database at `path`, in WAL mode, and run pending migrations.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory store, for unit tests.
    pub fn in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let tx = conn.transaction()?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", i + 1)?;
        }
        tx.commit()?;
        Ok(Store { conn })
    }

    /// `PRAGMA integrity_check` result (`ok` when healthy).
    pub fn integrity(&self) -> Result<String> {
        Ok(self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }

    // ---- networks ----

    /// All networks, by name.
    pub fn networks(&self) -> Result<Vec<Network>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT name, bridge, subnet FROM networks ORDER BY name")?;
        let rows = st.query_map([], |r| {
            let s: String = r.get(2)?;
            Ok(Network {
                name: r.get(0)?,
                bridge: r.get(1)?,
                subnet: s
                    .parse()
                    .map_err(|e: ipnet::AddrParseError| rusqlite::Error::ToSqlConversionFailure(e.into()))?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One network by name.
    pub fn network(&self, name: &str) -> Result<Network> {
        self.networks()?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| {
                StoreError::NotFound(format!(
                    "network {name:?} does not exist (see `sistemo network list`)"
                ))
            })
    }

    /// Create a network; the caller has checked the name and overlaps with host routes.
    pub fn create_network(&self, n: &Network) -> Result<()> {
        for o in self.networks()? {
            if o.name == n.name {
                return Err(StoreError::Conflict(format!(
                    "network {:?} already exists",
                    n.name
                )));
            }
            if o.subnet.contains(&n.subnet.network()) || n.subnet.contains(&o.subnet.network()) {
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
            params![n.name, n.bridge, n.subnet.to_string()],
        )?;
        Ok(())
    }

    /// Change a network's subnet (and bridge); refused, naming them, when machines would not fit.
    pub fn set_network_subnet(&self, name: &str, bridge: &str, subnet: Ipv4Net) -> Result<()> {
        let misfits: Vec<String> = self
            .machines()?
            .into_iter()
            .filter(|m| m.network == name && !host_range(subnet).contains(&u32::from(m.ip)))
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
            params![name, subnet.to_string(), bridge],
        )?;
        Ok(())
    }

    /// Delete a network; refused while machines use it.
    pub fn delete_network(&self, name: &str) -> Result<()> {
        let users: Vec<String> = self
            .machines()?
            .into_iter()
            .filter(|m| m.network == name)
            .map(|m| m.name)
            .collect();
        if !users.is_empty() {
            return Err(StoreError::Conflict(format!(
                "network {name:?} is used by machine(s) {}; delete them first",
                users.join(", ")
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

    // ---- machines ----

    /// All machines, oldest first.
    pub fn machines(&self) -> Result<Vec<Machine>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {MACHINE_COLS} FROM machines ORDER BY created_at, name"
        ))?;
        let rows = st.query_map([], row_to_machine)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A machine by name or UUID.
    pub fn machine(&self, name_or_id: &str) -> Result<Machine> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {MACHINE_COLS} FROM machines WHERE name = ?1 OR id = ?1"
            ))?
            .query_row([name_or_id], row_to_machine)
            .optional()?
            .ok_or_else(|| {
                StoreError::NotFound(format!(
                    "machine {name_or_id:?} does not exist (see `sistemo machine list`)"
                ))
            })
    }

    /// Insert a machine in state `creating`, leasing the lowest free address of its network
    /// (from .2) and claiming its exposes, all in one transaction.
    pub fn create_machine(&mut self, m: &Machine, exposes: &[ExposeSpec]) -> Result<Machine> {
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
                m.name
            )));
        }
        let subnet: String = tx
            .query_row("SELECT subnet FROM networks WHERE name = ?1", [&m.network], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("network {:?} does not exist", m.network)))?;
        let subnet: Ipv4Net = subnet
            .parse()
            .map_err(|e: ipnet::AddrParseError| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
        let ip = allocate_ip(&tx, &m.network, subnet)?;
        tx.execute(
            "INSERT INTO machines(id, name, image, state, network, ip, vcpus, memory_mib, storage_bytes)
             VALUES (?1, ?2, ?3, 'creating', ?4, ?5, ?6, ?7, ?8)",
            params![
                m.id,
                m.name,
                m.image,
                m.network,
                u32::from(ip),
                m.vcpus,
                m.memory_mib,
                m.storage_bytes
            ],
        )?;
        for e in exposes {
            claim(&tx, &m.id, e)?;
        }
        let row = tx.query_row(
            &format!("SELECT {MACHINE_COLS} FROM machines WHERE id = ?1"),
            [&m.id],
            row_to_machine,
        )?;
        tx.commit()?;
        Ok(row)
    }

    /// Compare-and-set a machine's state; fails with [`StoreError::WrongState`] when it is not `from`.
    pub fn transition(&self, id: &str, from: &[&str], to: &str) -> Result<()> {
        let placeholders = (0..from.len())
            .map(|i| format!("?{}", i + 3))
            .collect::<Vec<_>>()
            .join(",");
        let mut p: Vec<&dyn rusqlite::ToSql> = vec![&id, &to];
        for f in from {
            p.push(f);
        }
        let n = self.conn.execute(
            &format!("UPDATE machines SET state = ?2 WHERE id = ?1 AND state IN ({placeholders})"),
            p.as_slice(),
        )?;
        if n == 0 {
            let m = self.machine(id)?;
            return Err(StoreError::WrongState {
                name: m.name,
                expected: from.join(" or "),
                actual: m.state,
            });
        }
        Ok(())
    }

    /// Set the state unconditionally (used when the manager already holds the machine's lock).
    pub fn set_state(&self, id: &str, state: &str) -> Result<()> {
        self.conn
            .execute("UPDATE machines SET state = ?2 WHERE id = ?1", params![id, state])?;
        Ok(())
    }

    /// Record the machine's disk size once it is created.
    pub fn set_storage(&self, id: &str, bytes: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE machines SET storage_bytes = ?2 WHERE id = ?1",
            params![id, bytes],
        )?;
        Ok(())
    }

    /// Record (or clear) the running VMM instance.
    pub fn set_instance(&self, id: &str, instance: Option<&str>) -> Result<()> {
        self.conn.execute(
            "UPDATE machines SET instance = ?2 WHERE id = ?1",
            params![id, instance],
        )?;
        Ok(())
    }

    /// Delete a machine with its exposes, claims and IP lease.
    pub fn delete_machine(&self, id: &str) -> Result<()> {
        self.conn.execute("DELETE FROM machines WHERE id = ?1", [id])?;
        Ok(())
    }

    // ---- exposes ----

    /// The machine's exposes, in the order they were added.
    pub fn exposes_of(&self, machine_id: &str) -> Result<Vec<Expose>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, machine_id, bind, proto, host_start, host_end, machine_start
             FROM exposes WHERE machine_id = ?1 ORDER BY id",
        )?;
        let rows = st.query_map([machine_id], row_to_expose)?;
        rows.map(|r| {
            r.map(|(id, machine_id, spec)| Expose { id, machine_id, spec })
                .map_err(Into::into)
        })
        .collect()
    }

    /// Every expose with its machine's name and state, for `sistemo ports`.
    pub fn all_exposes(&self) -> Result<Vec<(String, String, ExposeSpec)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT e.id, m.name, e.bind, e.proto, e.host_start, e.host_end, e.machine_start, m.state
             FROM exposes e JOIN machines m ON m.id = e.machine_id ORDER BY e.proto, e.host_start",
        )?;
        let rows = st.query_map([], |r| {
            let (_, name, spec) = row_to_expose(r)?;
            Ok((name, r.get::<_, String>(7)?, spec))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Exposes of running machines with their target address: what the firewall must hold.
    pub fn active_exposes(&self) -> Result<Vec<ActiveExpose>> {
        let mut st = self.conn.prepare_cached(
            "SELECT e.id, e.machine_id, e.bind, e.proto, e.host_start, e.host_end, e.machine_start, m.ip
             FROM exposes e JOIN machines m ON m.id = e.machine_id WHERE m.state = 'running'",
        )?;
        let rows = st.query_map([], |r| {
            let (_, _, spec) = row_to_expose(r)?;
            Ok(ActiveExpose {
                spec,
                ip: Ipv4Addr::from(r.get::<_, u32>(7)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Add exposes to a machine; all or none (a conflict names the machine holding the port).
    pub fn add_exposes(&mut self, machine_id: &str, specs: &[ExposeSpec]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for s in specs {
            claim(&tx, machine_id, s)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Remove the machine's exposes whose host side matches `h` exactly or lies inside it;
    /// returns the removed specs (empty means nothing matched).
    pub fn remove_exposes(&mut self, machine_id: &str, h: &HostPortSpec) -> Result<Vec<ExposeSpec>> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let found: Vec<(i64, String, ExposeSpec)> = {
            let mut st = tx.prepare_cached(
                "SELECT id, machine_id, bind, proto, host_start, host_end, machine_start
                 FROM exposes WHERE machine_id = ?1 AND proto = ?2 AND host_start >= ?3 AND host_end <= ?4",
            )?;
            st.query_map(
                params![
                    machine_id,
                    h.proto.as_str(),
                    h.ports.start().get(),
                    h.ports.end().get()
                ],
                row_to_expose,
            )?
            .collect::<rusqlite::Result<_>>()?
        };
        let found: Vec<_> = found
            .into_iter()
            .filter(|(_, _, s)| h.bind.is_none() || s.host.bind == h.bind)
            .collect();
        for (id, _, _) in &found {
            tx.execute("DELETE FROM exposes WHERE id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(found.into_iter().map(|(_, _, s)| s).collect())
    }

    // ---- history ----

    /// Append an audit entry.
    pub fn record(&self, uid: Option<u32>, action: &str, target: &str, result: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO history(uid, action, target, result) VALUES (?1, ?2, ?3, ?4)",
            params![uid, action, target, result],
        )?;
        Ok(())
    }

    /// The newest entries first, filtered.
    pub fn history(
        &self,
        limit: u32,
        action: Option<&str>,
        target: Option<&str>,
    ) -> Result<Vec<HistoryEntry>> {
        let mut st = self.conn.prepare_cached(
            "SELECT at, uid, action, target, result FROM history
             WHERE (?1 IS NULL OR action = ?1 OR action LIKE ?1 || '.%') AND (?2 IS NULL OR target = ?2)
             ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = st.query_map(params![action, target, limit], |r| {
            Ok(HistoryEntry {
                at: r.get(0)?,
                uid: r.get(1)?,
                action: r.get(2)?,
                target: r.get(3)?,
                result: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// Usable host addresses of a subnet for machines: from .2 to the last before broadcast.
fn host_range(subnet: Ipv4Net) -> std::ops::RangeInclusive<u32> {
    let base = u32::from(subnet.network());
    let bcast = u32::from(subnet.broadcast());
    (base + 2)..=(bcast.saturating_sub(1))
}

/// Lowest free address from .2, found by the index (no row is loaded into the process).
fn allocate_ip(tx: &Transaction<'_>, network: &str, subnet: Ipv4Net) -> Result<Ipv4Addr> {
    let range = host_range(subnet);
    let first = *range.start();
    let candidate: u32 = tx.query_row(
        "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM machines WHERE network = ?1 AND ip = ?2) THEN ?2
         ELSE (SELECT m.ip + 1 FROM machines m WHERE m.network = ?1 AND m.ip >= ?2
               AND NOT EXISTS (SELECT 1 FROM machines x WHERE x.network = ?1 AND x.ip = m.ip + 1)
               ORDER BY m.ip LIMIT 1) END",
        params![network, first],
        |r| r.get(0),
    )?;
    if !range.contains(&candidate) {
        return Err(StoreError::Exhausted {
            network: network.to_string(),
            subnet,
        });
    }
    Ok(Ipv4Addr::from(candidate))
}

/// Claim every host port of `s` for `machine_id`, or fail naming the holder.
/// A wildcard binding conflicts with any specific one on that port and vice versa.
fn claim(tx: &Transaction<'_>, machine_id: &str, s: &ExposeSpec) -> Result<()> {
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

impl Protocol {
    /// All protocols.
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        let s = Store::in_memory().unwrap();
        s.create_network(&Network {
            name: "default".into(),
            bridge: "sistemo0".into(),
            subnet: "10.200.0.0/16".parse().unwrap(),
        })
        .unwrap();
        s
    }

    fn machine(name: &str) -> Machine {
        Machine {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.into(),
            image: "debian".into(),
            state: String::new(),
            network: "default".into(),
            ip: Ipv4Addr::UNSPECIFIED,
            vcpus: 1,
            memory_mib: 512,
            storage_bytes: 1 << 30,
            instance: None,
            created_at: String::new(),
        }
    }

    #[test]
    fn ip_sequential_and_reused() {
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
        s.delete_machine(&b.id).unwrap();
        let d = s.create_machine(&machine("d"), &[]).unwrap();
        assert_eq!(d.ip, b.ip, "freed address is reused");
        let e = s.create_machine(&machine("e"), &[]).unwrap();
        assert_eq!(e.ip.to_string(), "10.200.0.5");
    }

    #[test]
    fn exhausted_subnet() {
        let mut s = Store::in_memory().unwrap();
        s.create_network(&Network {
            name: "tiny".into(),
            bridge: "t0".into(),
            subnet: "10.9.0.0/30".parse().unwrap(),
        })
        .unwrap();
        let mut m = machine("x");
        m.network = "tiny".into();
        assert_eq!(s.create_machine(&m, &[]).unwrap().ip.to_string(), "10.9.0.2");
        let mut m = machine("y");
        m.network = "tiny".into();
        assert!(matches!(
            s.create_machine(&m, &[]),
            Err(StoreError::Exhausted { .. })
        ));
    }

    #[test]
    fn conflicts_name_the_holder() {
        let mut s = store();
        let a = s
            .create_machine(&machine("web"), &["8000-8010".parse().unwrap()])
            .unwrap();
        let b = s.create_machine(&machine("api"), &[]).unwrap();
        let e = s
            .add_exposes(&b.id, &["8005:80".parse().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("8005/tcp") && e.contains("\"web\""), "{e}");
        // udp is a different port space
        s.add_exposes(&b.id, &["8005/udp".parse().unwrap()]).unwrap();
        // wildcard vs bound
        s.add_exposes(&b.id, &["127.0.0.1:9000:80".parse().unwrap()])
            .unwrap();
        assert!(s.add_exposes(&a.id, &["9000".parse().unwrap()]).is_err());
        s.add_exposes(&a.id, &["127.0.0.2:9000:80".parse().unwrap()])
            .unwrap();
        // all or nothing
        assert!(
            s.add_exposes(&a.id, &["7000".parse().unwrap(), "8005/udp".parse().unwrap()])
                .is_err()
        );
        assert!(
            s.exposes_of(&a.id)
                .unwrap()
                .iter()
                .all(|e| e.spec.host.ports.start().get() != 7000)
        );
        // unexpose
        let removed = s.remove_exposes(&b.id, &"8005/udp".parse().unwrap()).unwrap();
        assert_eq!(removed.len(), 1);
        assert!(
            s.remove_exposes(&b.id, &"8005/udp".parse().unwrap())
                .unwrap()
                .is_empty()
        );
        // delete releases claims
        s.delete_machine(&a.id).unwrap();
        s.add_exposes(&b.id, &["8000".parse().unwrap()]).unwrap();
    }

    #[test]
    fn subnet_change_names_misfits() {
        let mut s = store();
        s.create_machine(&machine("web"), &[]).unwrap();
        let e = s
            .set_network_subnet("default", "sistemo0", "10.201.0.0/24".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("web (10.200.0.2)"), "{e}");
        s.set_network_subnet("default", "sistemo0", "10.200.0.0/24".parse().unwrap())
            .unwrap();
    }

    #[test]
    fn cas_transition() {
        let mut s = store();
        let a = s.create_machine(&machine("a"), &[]).unwrap();
        s.transition(&a.id, &["creating"], "running").unwrap();
        let e = s
            .transition(&a.id, &["stopped"], "running")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "machine a is running, not stopped");
    }
}
