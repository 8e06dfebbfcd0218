//! A machine's I/O rate limits (`machine_io`), fixed at deploy and applied at every boot.

use super::{Result, Store};
use rusqlite::{OptionalExtension, params};
use sistemo_vmm::IoLimits;
use uuid::Uuid;

impl Store {
    /// Record machine `id`'s limits (no row when unlimited).
    pub fn set_io(&self, id: Uuid, io: &IoLimits) -> Result<()> {
        let id = id.to_string();
        if io.is_unlimited() {
            self.conn
                .execute("DELETE FROM machine_io WHERE machine_id = ?1", [id])?;
            return Ok(());
        }
        self.conn.execute(
            "INSERT OR REPLACE INTO machine_io(machine_id, download_mbps, upload_mbps, iops, disk_bw_mbps)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, io.download_mbps, io.upload_mbps, io.iops, io.disk_bw_mbps],
        )?;
        Ok(())
    }

    /// Record machine `id`'s CPU cap (`None`: none).
    pub fn set_cpu_limit(&self, id: Uuid, cpu: Option<crate::domain::CpuLimit>) -> Result<()> {
        self.conn.execute(
            "UPDATE machines SET cpu_limit_milli = ?2 WHERE id = ?1",
            params![id.to_string(), cpu.map_or(0, |c| c.milli())],
        )?;
        Ok(())
    }

    /// Machine `id`'s limits (none recorded: unlimited).
    pub fn io_of(&self, id: Uuid) -> Result<IoLimits> {
        Ok(self
            .conn
            .query_row(
                "SELECT download_mbps, upload_mbps, iops, disk_bw_mbps FROM machine_io WHERE machine_id = ?1",
                [id.to_string()],
                |r| {
                    Ok(IoLimits {
                        download_mbps: r.get(0)?,
                        upload_mbps: r.get(1)?,
                        iops: r.get(2)?,
                        disk_bw_mbps: r.get(3)?,
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{machine, store};
    use super::*;

    #[test]
    fn limits_are_kept_per_machine_and_go_with_it() {
        let mut s = store();
        let m = s.create_machine(&machine("web"), &[]).unwrap();
        assert_eq!(s.io_of(m.id).unwrap(), IoLimits::default());
        let io = IoLimits {
            download_mbps: 100,
            upload_mbps: 20,
            iops: 300,
            disk_bw_mbps: 8,
        };
        s.set_io(m.id, &io).unwrap();
        assert_eq!(s.io_of(m.id).unwrap(), io);
        assert_eq!(s.machine_by_id(m.id).unwrap().cpu_limit, None);
        let half = crate::domain::CpuLimit::from_milli(500);
        s.set_cpu_limit(m.id, half).unwrap();
        assert_eq!(s.machine_by_id(m.id).unwrap().cpu_limit, half);
        s.delete_machine(m.id).unwrap();
        let left: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM machine_io", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "the row goes with its machine");
    }
}
