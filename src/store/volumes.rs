//! Volume rows (volumes and snapshots) and their attachments to machines: one read-write
//! attachment at a time, read-only ones shared. Part of the store: the only code that speaks SQL.

use super::{Result, Store, StoreError, conv};
use crate::domain::{Invalid, MachineName, MachineState, VolumeName};
use rusqlite::{OptionalExtension, params};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// What a volume row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// A volume: attachable, resizable.
    Volume,
    /// A snapshot: frozen, never attached; cloned into new volumes.
    Snapshot,
}

/// What a volume holds when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    /// An ext4 file system (made with `mkfs.ext4`, no mount); resize grows it.
    Ext4,
    /// Zeros: the guest formats it.
    Raw,
}

macro_rules! text_enum {
    ($t:ident, $what:literal, $allowed:literal, $($v:ident => $s:literal),*) => {
        impl $t {
            /// The name used in the API and the database.
            pub fn as_str(self) -> &'static str {
                match self { $($t::$v => $s),* }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = Invalid;
            fn from_str(s: &str) -> std::result::Result<Self, Invalid> {
                match s {
                    $($s => Ok($t::$v),)*
                    _ => Err(Invalid(format!(concat!($what, " {:?} is not known (allowed: ", $allowed, ")"), s))),
                }
            }
        }
    };
}
text_enum!(VolumeKind, "volume kind", "volume, snapshot", Volume => "volume", Snapshot => "snapshot");
text_enum!(VolumeFormat, "volume format", "ext4, raw", Ext4 => "ext4", Raw => "raw");

/// A volume (or snapshot) as stored. Its file is `data_dir/volumes/ID.raw`.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Its ID (names its file).
    pub id: Uuid,
    /// Unique name among volumes and snapshots.
    pub name: VolumeName,
    /// Volume or snapshot.
    pub kind: VolumeKind,
    /// ext4 or raw.
    pub format: VolumeFormat,
    /// Size in bytes (the file's length).
    pub size_bytes: u64,
    /// What it was made from (a volume, snapshot or machine), if anything.
    pub source: Option<String>,
    /// Creation time (UTC, RFC 3339).
    pub created_at: String,
}

/// A volume attached to a machine.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// The volume.
    pub volume: Volume,
    /// The machine's ID.
    pub machine_id: Uuid,
    /// The machine's name.
    pub machine: MachineName,
    /// The machine's state.
    pub machine_state: MachineState,
    /// Where the guest's init mounts it (`None`: not mounted).
    pub mount: Option<String>,
    /// Attached read-only.
    pub readonly: bool,
    /// The machine boots from it (its root disk).
    pub root: bool,
}

/// What a new attachment asks for.
#[derive(Debug, Clone)]
pub struct NewAttachment {
    /// Volume name or ID.
    pub volume: String,
    /// Mount point in the guest.
    pub mount: Option<String>,
    /// Read-only.
    pub readonly: bool,
    /// The machine's root disk.
    pub root: bool,
    /// A pending volume may be attached: the machine clone that made it deploys.
    pub pending_ok: bool,
}

/// Migration: `pending` marks a volume a machine clone or snapshot is still making. It is not
/// listed or found by name; the operation commits it when done, or start-up sweeps it (a fresh
/// copy, never user data) unless a machine that finished deploying uses it.
pub const PENDING_MIGRATION: &str = "ALTER TABLE volumes ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;";

const VOLUME_COLS: &str = "v.id, v.name, v.kind, v.format, v.size_bytes, v.source, v.created_at";

fn row_to_volume(r: &rusqlite::Row<'_>) -> rusqlite::Result<Volume> {
    let id: String = r.get(0)?;
    let text = |i: usize| -> rusqlite::Result<String> { r.get(i) };
    Ok(Volume {
        id: id.parse().map_err(conv)?,
        name: text(1)?.parse().map_err(conv)?,
        kind: text(2)?.parse().map_err(conv)?,
        format: text(3)?.parse().map_err(conv)?,
        size_bytes: r.get(4)?,
        source: r.get(5)?,
        created_at: r.get(6)?,
    })
}

fn row_to_attachment(r: &rusqlite::Row<'_>) -> rusqlite::Result<Attachment> {
    let mid: String = r.get(7)?;
    Ok(Attachment {
        volume: row_to_volume(r)?,
        machine_id: mid.parse().map_err(conv)?,
        machine: r.get(8)?,
        machine_state: r.get(9)?,
        mount: r.get(10)?,
        readonly: r.get(11)?,
        root: r.get(12)?,
    })
}

fn not_found(name: &str) -> StoreError {
    StoreError::NotFound(format!(
        "volume {name:?} does not exist (see `sistemo volume list`)"
    ))
}

impl Store {
    /// Every volume and snapshot, oldest first (not the pending ones).
    pub fn volumes(&self) -> Result<Vec<Volume>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {VOLUME_COLS} FROM volumes v WHERE NOT v.pending ORDER BY v.created_at, v.name"
        ))?;
        let rows = st.query_map([], row_to_volume)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The pending volumes.
    pub fn pending_volumes(&self) -> Result<Vec<Volume>> {
        let mut st = self
            .conn
            .prepare_cached(&format!("SELECT {VOLUME_COLS} FROM volumes v WHERE v.pending"))?;
        let rows = st.query_map([], row_to_volume)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A volume or snapshot by ID or name (an ID wins); not a pending one.
    pub fn volume(&self, name_or_id: &str) -> Result<Volume> {
        self.find_volume(name_or_id, false)
    }

    /// [`Store::volume`], a pending one too (what the operation making it attaches, and the
    /// names new volumes must not take).
    pub fn volume_or_pending(&self, name_or_id: &str) -> Result<Volume> {
        self.find_volume(name_or_id, true)
    }

    fn find_volume(&self, name_or_id: &str, pending: bool) -> Result<Volume> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {VOLUME_COLS} FROM volumes v WHERE (v.id = ?1 OR v.name = ?1) AND (?2 OR NOT v.pending)
                 ORDER BY v.id = ?1 DESC LIMIT 1"
            ))?
            .query_row(params![name_or_id, pending], row_to_volume)
            .optional()?
            .ok_or_else(|| not_found(name_or_id))
    }

    /// Insert a volume whose file is complete; its name must be free. A `pending` one stays
    /// hidden until [`Store::commit_volumes`].
    pub fn insert_volume(&self, v: &Volume) -> Result<Volume> {
        self.insert_volume_as(v, false)
    }

    /// [`Store::insert_volume`], pending or not.
    pub fn insert_volume_as(&self, v: &Volume, pending: bool) -> Result<Volume> {
        let taken = self
            .conn
            .query_row("SELECT 1 FROM volumes WHERE name = ?1", [v.name.as_str()], |_| {
                Ok(())
            })
            .optional()?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "volume name {:?} is already taken",
                v.name.as_str()
            )));
        }
        self.conn.execute(
            "INSERT INTO volumes(id, name, kind, format, size_bytes, source, pending) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                v.id.to_string(),
                v.name.as_str(),
                v.kind.as_str(),
                v.format.as_str(),
                v.size_bytes,
                v.source,
                pending
            ],
        )?;
        self.volume_or_pending(&v.id.to_string())
    }

    /// Make pending volumes ordinary ones, all at once.
    pub fn commit_volumes(&mut self, ids: &[Uuid]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for id in ids {
            tx.execute("UPDATE volumes SET pending = 0 WHERE id = ?1", [id.to_string()])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Delete a pending volume's row and its attachments, which may only be to machines whose
    /// deploy never finished (`creating`); false when there is no such pending volume, or a
    /// machine past its deploy uses it (it is that machine's disk now: left alone).
    pub fn delete_pending_volume(&mut self, id: Uuid) -> Result<bool> {
        if self
            .attachments_of_volume(id)?
            .iter()
            .any(|a| a.machine_state != MachineState::Creating)
        {
            return Ok(false);
        }
        let tx = self.conn.transaction()?;
        tx.execute(
            "DELETE FROM volume_attachments WHERE volume_id = (SELECT id FROM volumes WHERE id = ?1 AND pending)",
            [id.to_string()],
        )?;
        let gone = tx.execute("DELETE FROM volumes WHERE id = ?1 AND pending", [id.to_string()])? > 0;
        tx.commit()?;
        Ok(gone)
    }

    /// Record a volume's new size.
    pub fn set_volume_size(&self, id: Uuid, bytes: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE volumes SET size_bytes = ?2 WHERE id = ?1",
            params![id.to_string(), bytes],
        )?;
        Ok(())
    }

    /// Delete a volume row; refused, naming the machines, while it is attached.
    pub fn delete_volume(&mut self, id: Uuid) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let users: Vec<String> = tx
            .prepare(
                "SELECT m.name FROM volume_attachments a JOIN machines m ON m.id = a.machine_id
                 WHERE a.volume_id = ?1 ORDER BY m.name",
            )?
            .query_map([id.to_string()], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if !users.is_empty() {
            let name: String =
                tx.query_row("SELECT name FROM volumes WHERE id = ?1", [id.to_string()], |r| {
                    r.get(0)
                })?;
            return Err(StoreError::Conflict(format!(
                "volume {name} is attached to machine(s) {}; detach it first (sistemo machine volume detach MACHINE {name})",
                users.join(", ")
            )));
        }
        tx.execute("DELETE FROM volumes WHERE id = ?1", [id.to_string()])?;
        tx.commit()?;
        Ok(())
    }

    fn attachments_where(&self, cond: &str, val: &str) -> Result<Vec<Attachment>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {VOLUME_COLS}, a.machine_id, m.name, m.state, a.mount, a.readonly, a.root
             FROM volume_attachments a JOIN volumes v ON v.id = a.volume_id JOIN machines m ON m.id = a.machine_id
             WHERE {cond} = ?1 ORDER BY a.root DESC, a.seq"
        ))?;
        let rows = st.query_map([val], row_to_attachment)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A machine's volumes, the root one first, then in the order they were attached.
    pub fn attachments_of_machine(&self, machine: Uuid) -> Result<Vec<Attachment>> {
        self.attachments_where("a.machine_id", &machine.to_string())
    }

    /// The machines a volume is attached to.
    pub fn attachments_of_volume(&self, volume: Uuid) -> Result<Vec<Attachment>> {
        self.attachments_where("a.volume_id", &volume.to_string())
    }

    /// Attach volumes to a machine, all or none: each must be a volume (not a snapshot), not
    /// attached to this machine already, and free of a read-write attachment elsewhere (and,
    /// for a read-write one, of any attachment).
    pub fn attach_volumes(&mut self, machine: Uuid, new: &[NewAttachment]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mid = machine.to_string();
        for a in new {
            let v = tx
                .query_row(
                    &format!(
                        "SELECT {VOLUME_COLS} FROM volumes v WHERE (v.id = ?1 OR v.name = ?1) AND (?2 OR NOT v.pending)"
                    ),
                    params![&a.volume, a.pending_ok],
                    row_to_volume,
                )
                .optional()?
                .ok_or_else(|| not_found(&a.volume))?;
            if v.kind == VolumeKind::Snapshot {
                return Err(StoreError::Conflict(format!(
                    "{} is a snapshot and cannot be attached; clone it first (sistemo volume clone {} NEW)",
                    v.name, v.name
                )));
            }
            let others: Vec<(String, bool, String)> = tx
                .prepare_cached(
                    "SELECT m.name, a.readonly, a.machine_id FROM volume_attachments a JOIN machines m ON m.id = a.machine_id
                     WHERE a.volume_id = ?1 ORDER BY m.name",
                )?
                .query_map([v.id.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            if let Some((m, _, _)) = others.iter().find(|(_, _, id)| *id == mid) {
                return Err(StoreError::Conflict(format!(
                    "volume {} is already attached to machine {m}",
                    v.name
                )));
            }
            if let Some((m, _, _)) = others.iter().find(|(_, ro, _)| !ro) {
                return Err(StoreError::Conflict(format!(
                    "volume {} is attached read-write to machine {m}; one machine at a time may write to it (detach it there first)",
                    v.name
                )));
            }
            if !a.readonly
                && let Some((m, _, _)) = others.first()
            {
                return Err(StoreError::Conflict(format!(
                    "volume {} is attached read-only to machine {m}; a read-write attachment needs it alone (attach it with --readonly, or detach it there)",
                    v.name
                )));
            }
            tx.execute(
                "INSERT INTO volume_attachments(volume_id, machine_id, seq, mount, readonly, root)
                 VALUES (?1, ?2, (SELECT COALESCE(MAX(seq), 0) + 1 FROM volume_attachments WHERE machine_id = ?2), ?3, ?4, ?5)",
                params![v.id.to_string(), mid, a.mount, a.readonly, a.root],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Detach a volume from a machine; false when it was not attached.
    pub fn detach_volume(&self, machine: Uuid, volume: Uuid) -> Result<bool> {
        Ok(self.conn.execute(
            "DELETE FROM volume_attachments WHERE machine_id = ?1 AND volume_id = ?2",
            params![machine.to_string(), volume.to_string()],
        )? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{machine, store};
    use super::*;

    fn vol(s: &Store, name: &str, kind: VolumeKind) -> Volume {
        s.insert_volume(&Volume {
            id: Uuid::new_v4(),
            name: name.parse().unwrap(),
            kind,
            format: VolumeFormat::Ext4,
            size_bytes: 1 << 30,
            source: None,
            created_at: String::new(),
        })
        .unwrap()
    }

    fn att(v: &str, readonly: bool) -> NewAttachment {
        NewAttachment {
            volume: v.into(),
            mount: Some("/data".into()),
            readonly,
            root: false,
            pending_ok: false,
        }
    }

    #[test]
    fn one_writer_or_many_readers() {
        let mut s = store();
        let (a, b, c) = (
            s.create_machine(&machine("a"), &[]).unwrap(),
            s.create_machine(&machine("b"), &[]).unwrap(),
            s.create_machine(&machine("c"), &[]).unwrap(),
        );
        let pg = vol(&s, "pg", VolumeKind::Volume);
        vol(&s, "snap", VolumeKind::Snapshot);
        s.attach_volumes(a.id, &[att("pg", false)]).unwrap();
        let e = s
            .attach_volumes(b.id, &[att("pg", false)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("read-write to machine a"), "{e}");
        assert!(s.attach_volumes(b.id, &[att("pg", true)]).is_err());
        assert!(
            s.attach_volumes(a.id, &[att("pg", true)])
                .unwrap_err()
                .to_string()
                .contains("already")
        );
        let e = s
            .attach_volumes(b.id, &[att("snap", true)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a snapshot"), "{e}");
        let e = s.delete_volume(pg.id).unwrap_err().to_string();
        assert!(e.contains("attached to machine(s) a"), "{e}");
        assert!(s.detach_volume(a.id, pg.id).unwrap());
        s.attach_volumes(b.id, &[att("pg", true)]).unwrap();
        s.attach_volumes(c.id, &[att("pg", true)]).unwrap();
        assert!(
            s.attach_volumes(a.id, &[att("pg", false)])
                .unwrap_err()
                .to_string()
                .contains("read-only to machine b")
        );
        assert_eq!(s.attachments_of_volume(pg.id).unwrap().len(), 2);
        // a machine's delete takes its attachments, never the volume
        s.delete_machine(b.id).unwrap();
        s.delete_machine(c.id).unwrap();
        assert!(s.attachments_of_volume(pg.id).unwrap().is_empty());
        assert_eq!(s.volume("pg").unwrap().id, pg.id);
        s.delete_volume(pg.id).unwrap();
        assert!(s.volume("pg").is_err());
    }

    #[test]
    fn pending_volumes_are_hidden_until_committed() {
        let mut s = store();
        let a = s.create_machine(&machine("a"), &[]).unwrap();
        let new = |name: &str| Volume {
            id: Uuid::new_v4(),
            name: name.parse().unwrap(),
            kind: VolumeKind::Volume,
            format: VolumeFormat::Ext4,
            size_bytes: 1 << 30,
            source: None,
            created_at: String::new(),
        };
        let (p, q) = (new("p"), new("q"));
        s.insert_volume_as(&p, true).unwrap();
        s.insert_volume_as(&q, true).unwrap();
        assert!(s.volumes().unwrap().is_empty(), "not listed");
        assert!(s.volume("p").is_err(), "not found by name");
        assert!(s.volume(&p.id.to_string()).is_err(), "nor by ID");
        assert_eq!(s.volume_or_pending("p").unwrap().id, p.id);
        let e = s.insert_volume(&new("p")).unwrap_err().to_string();
        assert!(e.contains("already taken"), "its name is held: {e}");
        assert!(
            s.attach_volumes(a.id, &[att("p", false)]).is_err(),
            "only its maker attaches it"
        );
        // what the operation making it does: attach it to the machine it deploys
        let mine = NewAttachment {
            pending_ok: true,
            ..att("p", false)
        };
        s.attach_volumes(a.id, &[mine]).unwrap();
        assert_eq!(s.pending_volumes().unwrap().len(), 2);
        s.commit_volumes(&[p.id]).unwrap();
        assert_eq!(s.volume("p").unwrap().id, p.id);
        assert!(
            !s.delete_pending_volume(p.id).unwrap(),
            "a committed volume is not pending"
        );
        let r = s.insert_volume_as(&new("r"), true).unwrap();
        s.attach_volumes(
            a.id,
            &[NewAttachment {
                pending_ok: true,
                ..att("r", false)
            }],
        )
        .unwrap();
        s.set_state(a.id, MachineState::Running, None).unwrap();
        assert!(
            !s.delete_pending_volume(r.id).unwrap(),
            "a deployed machine's disk stays"
        );
        s.set_state(a.id, MachineState::Creating, None).unwrap();
        assert!(
            s.delete_pending_volume(r.id).unwrap(),
            "an interrupted deploy's goes"
        );
        assert!(s.delete_pending_volume(q.id).unwrap());
        assert!(s.volume_or_pending("q").is_err());
        let listed: Vec<_> = s.volumes().unwrap().into_iter().map(|v| v.id).collect();
        assert_eq!(listed, [p.id]);
        assert_eq!(s.attachments_of_machine(a.id).unwrap().len(), 1);
    }

    #[test]
    fn all_or_none_and_names_unique() {
        let mut s = store();
        let a = s.create_machine(&machine("a"), &[]).unwrap();
        vol(&s, "x", VolumeKind::Volume);
        assert!(
            s.attach_volumes(a.id, &[att("x", false), att("nope", false)])
                .is_err()
        );
        assert!(s.attachments_of_machine(a.id).unwrap().is_empty());
        let e = s
            .insert_volume(&Volume {
                id: Uuid::new_v4(),
                name: "x".parse().unwrap(),
                kind: VolumeKind::Volume,
                format: VolumeFormat::Raw,
                size_bytes: 1,
                source: None,
                created_at: String::new(),
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("already taken"), "{e}");
    }
}
