//! The state store: the only code that speaks SQL. SQLite in WAL mode with numbered migrations;
//! rows come out typed. Networks, machines (with IP lease), exposes with per-port claims, history,
//! accounts (users, API tokens, sessions).

mod accounts;
mod exposes;
mod io_limits;
mod machines;
mod networks;
mod volumes;
mod warm;

pub use accounts::{Account, Role, SessionRow, TokenRow};
pub use networks::{Caller, HistoryRow};
pub use volumes::{Attachment, NewAttachment, Volume, VolumeFormat, VolumeKind};

use crate::domain::{IfName, MachineName, MachineState, NetworkName, RestartPolicy, Subnet};
use crate::spec::{ExposeSpec, HostPortSpec, PortRange};
use rusqlite::Connection;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use sistemo_vmm::Instance;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database")]
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
        network: NetworkName,
        /// Its subnet.
        subnet: Subnet,
    },
    /// A state transition was refused because the machine is in another state.
    #[error("machine {name} is {actual}, not {expected}")]
    WrongState {
        /// Machine name.
        name: MachineName,
        /// States the operation needs, joined with `or`.
        expected: String,
        /// State it is in.
        actual: MachineState,
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
    // 2: why a machine is in state `error`
    "ALTER TABLE machines ADD COLUMN error TEXT;",
    // 3: addresses given back, so they are handed out again last (least recently released first)
    "CREATE TABLE released_ips (
        network TEXT NOT NULL,
        ip INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (network, ip)
     ) WITHOUT ROWID;
     CREATE INDEX released_ips_seq ON released_ips(network, seq);",
    // 4: where a TCP API caller connected from
    "ALTER TABLE history ADD COLUMN remote TEXT;",
    // 5: what happens when a machine's VMM ends by itself
    "ALTER TABLE machines ADD COLUMN restart TEXT NOT NULL DEFAULT 'no';",
    // 6: volumes and snapshots (files in data_dir/volumes), and their attachments to machines;
    // a volume cannot be deleted while attached, a machine's delete takes only its attachments
    "CREATE TABLE volumes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        format TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        source TEXT,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now'))
     );
     CREATE TABLE volume_attachments (
        volume_id TEXT NOT NULL REFERENCES volumes(id),
        machine_id TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        mount TEXT,
        readonly INTEGER NOT NULL DEFAULT 0,
        root INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (volume_id, machine_id)
     ) WITHOUT ROWID;
     CREATE INDEX volume_attachments_machine ON volume_attachments(machine_id);",
    // 6 (accounts): users, API tokens and browser sessions; who made each change
    accounts::MIGRATION,
    // 6: a machine's I/O rate limits, fixed at deploy (0: no limit); no row: none
    "CREATE TABLE machine_io (
        machine_id TEXT PRIMARY KEY REFERENCES machines(id) ON DELETE CASCADE,
        download_mbps INTEGER NOT NULL,
        upload_mbps INTEGER NOT NULL,
        iops INTEGER NOT NULL,
        disk_bw_mbps INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 8: the template a machine was restored from
    warm::MIGRATION,
    // 9: a number per machine, unique while it exists (its VMM's own uid is derived from it)
    "ALTER TABLE machines ADD COLUMN vmm_slot INTEGER;
     UPDATE machines SET vmm_slot = (SELECT COUNT(*) FROM machines m2 WHERE m2.rowid < machines.rowid);
     CREATE UNIQUE INDEX machines_vmm_slot ON machines(vmm_slot);",
    // 10: volumes a machine clone or snapshot is still making (hidden; swept at start)
    volumes::PENDING_MIGRATION,
    // 11: machines made before MACs were derived from the IP lease keep their ID-derived MAC
    // (a running one keeps its link's address across the upgrade)
    "ALTER TABLE machines ADD COLUMN legacy_mac INTEGER NOT NULL DEFAULT 0;
     UPDATE machines SET legacy_mac = 1;",
    // 12: a machine's CPU cap (`--cpu-limit`), thousandths of a CPU; 0: none
    "ALTER TABLE machines ADD COLUMN cpu_limit_milli INTEGER NOT NULL DEFAULT 0;",
];

/// A named network: a bridge and a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Name (`default` for the built-in one).
    pub name: NetworkName,
    /// Bridge interface.
    pub bridge: IfName,
    /// Subnet; the bridge holds its first host address.
    pub subnet: Subnet,
}

impl Network {
    /// The gateway: the subnet's first host address, held by the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.net().network()) + 1)
    }
}

/// A machine as stored.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Its ID.
    pub id: uuid::Uuid,
    /// Unique name.
    pub name: MachineName,
    /// Image reference it was deployed from.
    pub image: String,
    /// Lifecycle state.
    pub state: MachineState,
    /// Why it is in state `error`.
    pub error: Option<String>,
    /// What happens when its VMM ends by itself.
    pub restart: RestartPolicy,
    /// Its network.
    pub network: NetworkName,
    /// Leased address (kept across stop/start/restart, released on delete).
    pub ip: Ipv4Addr,
    /// Virtual CPUs the guest sees.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk size in bytes (0 for backends without disks).
    pub storage_bytes: u64,
    /// The running VMM, while there is one.
    pub instance: Option<Instance>,
    /// Creation time (UTC, RFC 3339).
    pub created_at: String,
    /// Its slot: no other machine has it while this one exists (see `MachineSpec::slot`).
    pub vmm_slot: u32,
    /// Made before MACs were derived from the IP lease: its MAC is derived from its ID.
    pub legacy_mac: bool,
    /// Its CPU cap (`--cpu-limit`), if any.
    pub cpu_limit: Option<crate::domain::CpuLimit>,
}

/// What a new machine row needs; the store leases its address.
#[derive(Debug, Clone)]
pub struct NewMachine {
    /// Its ID.
    pub id: uuid::Uuid,
    /// Unique name.
    pub name: MachineName,
    /// Image reference.
    pub image: String,
    /// Network to lease an address on.
    pub network: NetworkName,
    /// Virtual CPUs the guest sees.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk size in bytes, when known.
    pub storage_bytes: u64,
    /// What happens when its VMM ends by itself.
    pub restart: RestartPolicy,
}

/// The store: one SQLite connection.
pub struct Store {
    conn: Connection,
}

/// The store behind a lock, shared by the services. Each lock is held for one store call or a
/// few; never across an await.
pub struct SharedStore(Mutex<Store>);

impl SharedStore {
    /// Share `store`.
    pub fn new(store: Store) -> SharedStore {
        SharedStore(Mutex::new(store))
    }

    /// The store, locked (a panic while locked does not poison it for others).
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn conv(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.into())
}

/// Text columns holding a parsed type.
macro_rules! sql_text {
    ($($t:ty),*) => {$(
        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.to_string()))
            }
        }
        impl FromSql for $t {
            fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
                v.as_str()?.parse().map_err(|e| FromSqlError::Other(Box::new(e)))
            }
        }
    )*};
}
sql_text!(
    MachineState,
    MachineName,
    NetworkName,
    IfName,
    Subnet,
    RestartPolicy
);

const MACHINE_COLS: &str = "id, name, image, state, network, ip, vcpus, memory_mib, storage_bytes, instance, created_at, error, restart, vmm_slot, legacy_mac, cpu_limit_milli";

fn row_to_machine(r: &rusqlite::Row<'_>) -> rusqlite::Result<Machine> {
    let id: String = r.get(0)?;
    let instance: Option<String> = r.get(9)?;
    Ok(Machine {
        id: id.parse().map_err(conv)?,
        name: r.get(1)?,
        image: r.get(2)?,
        state: r.get(3)?,
        network: r.get(4)?,
        ip: Ipv4Addr::from(r.get::<_, u32>(5)?),
        vcpus: r.get(6)?,
        memory_mib: r.get(7)?,
        storage_bytes: r.get(8)?,
        // An instance that no longer parses is treated as gone: the VMM is not adopted.
        instance: instance.and_then(|s| serde_json::from_str(&s).ok()),
        created_at: r.get(10)?,
        error: r.get(11)?,
        restart: r.get(12)?,
        vmm_slot: r.get(13)?,
        legacy_mac: r.get(14)?,
        cpu_limit: crate::domain::CpuLimit::from_milli(r.get(15)?),
    })
}

/// Columns `bind, proto, host_start, host_end, machine_start` from `at` on, as a spec.
fn expose_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<ExposeSpec> {
    let bind: String = r.get(at)?;
    let proto: String = r.get(at + 1)?;
    let (hs, he, ms): (u16, u16, u16) = (r.get(at + 2)?, r.get(at + 3)?, r.get(at + 4)?);
    let range = |a: u16, b: u16| {
        PortRange::new(a.try_into().map_err(conv)?, b.try_into().map_err(conv)?)
            .ok_or_else(|| conv("bad port range"))
    };
    Ok(ExposeSpec {
        host: HostPortSpec {
            bind: if bind.is_empty() {
                None
            } else {
                Some(bind.parse().map_err(conv)?)
            },
            ports: range(hs, he)?,
            proto: proto.parse().map_err(conv)?,
        },
        machine: range(ms, ms + (he - hs))?,
    })
}

fn bind_str(b: Option<Ipv4Addr>) -> String {
    b.map(|a| a.to_string()).unwrap_or_default()
}

impl Store {
    /// Open (or create) the database at `path`, in WAL mode, and run pending migrations.
    pub fn open(path: &Path) -> Result<Store> {
        Self::init(Connection::open(path)?)
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
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn store() -> Store {
        let s = Store::in_memory().unwrap();
        s.create_network(&Network {
            name: "default".parse().unwrap(),
            bridge: "sistemo0".parse().unwrap(),
            subnet: "10.200.0.0/16".parse().unwrap(),
        })
        .unwrap();
        s
    }

    pub(crate) fn machine(name: &str) -> NewMachine {
        NewMachine {
            id: uuid::Uuid::new_v4(),
            name: name.parse().unwrap(),
            image: "debian".into(),
            network: "default".parse().unwrap(),
            vcpus: 1,
            memory_mib: 512,
            storage_bytes: 1 << 30,
            restart: RestartPolicy::No,
        }
    }

    #[test]
    fn migrations_upgrade_a_version_1_database() {
        let dir = std::env::temp_dir().join(format!("sistemo-store-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute_batch(
                "INSERT INTO networks(name, bridge, subnet) VALUES ('default','sistemo0','10.200.0.0/16');
                 INSERT INTO machines(id,name,image,state,network,ip,vcpus,memory_mib,storage_bytes)
                 VALUES ('6f1c3c1e-0d2b-4a53-9d7e-3f5f0b4c2a11','web','debian','running','default',
                         167903234,1,512,0);",
            )
            .unwrap();
        }
        let s = Store::open(&p).unwrap();
        let m = s.machine("web").unwrap();
        assert_eq!((m.state, m.error.as_deref()), (MachineState::Running, None));
        assert_eq!(m.ip.to_string(), "10.2.0.2");
        assert_eq!(m.vmm_slot, 0, "machines of older versions get slots");
        assert!(
            m.legacy_mac,
            "machines of older versions keep their ID-derived MAC"
        );
        let mut s = s;
        let new = s.create_machine(&machine("new"), &[]).unwrap();
        assert!(!new.legacy_mac, "new machines' MACs come from their lease");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn slots_are_unique_and_the_lowest_free_comes_back() {
        let mut s = store();
        let ms: Vec<Machine> = ["a", "b", "c"]
            .iter()
            .map(|n| s.create_machine(&machine(n), &[]).unwrap())
            .collect();
        assert_eq!(ms.iter().map(|m| m.vmm_slot).collect::<Vec<_>>(), [0, 1, 2]);
        s.delete_machine(ms[1].id).unwrap();
        assert_eq!(s.create_machine(&machine("d"), &[]).unwrap().vmm_slot, 1);
        assert_eq!(s.create_machine(&machine("e"), &[]).unwrap().vmm_slot, 3);
        s.delete_machine(ms[0].id).unwrap();
        assert_eq!(s.create_machine(&machine("f"), &[]).unwrap().vmm_slot, 0);
    }
}
