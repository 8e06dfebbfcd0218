//! Which template a machine was restored from (`machine_templates`): `machine status` shows it;
//! no row means the machine booted cold.

use super::{Result, Store};
use rusqlite::{OptionalExtension, params};
use uuid::Uuid;

/// The table, appended to the store's migrations.
pub(super) const MIGRATION: &str = "CREATE TABLE machine_templates (
        machine_id TEXT PRIMARY KEY REFERENCES machines(id) ON DELETE CASCADE,
        template TEXT NOT NULL
     ) WITHOUT ROWID;";

impl Store {
    /// Record that machine `id` was restored from template `key` (`None`: it booted cold).
    pub fn set_template(&self, id: Uuid, key: Option<&str>) -> Result<()> {
        match key {
            Some(k) => self.conn.execute(
                "INSERT OR REPLACE INTO machine_templates(machine_id, template) VALUES (?1, ?2)",
                params![id.to_string(), k],
            )?,
            None => self.conn.execute(
                "DELETE FROM machine_templates WHERE machine_id = ?1",
                [id.to_string()],
            )?,
        };
        Ok(())
    }

    /// The template machine `id` was restored from, if any.
    pub fn template_of(&self, id: Uuid) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT template FROM machine_templates WHERE machine_id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{machine, store};

    #[test]
    fn a_machine_remembers_its_template_until_it_is_deleted() {
        let mut s = store();
        let m = s.create_machine(&machine("web"), &[]).unwrap();
        assert_eq!(s.template_of(m.id).unwrap(), None);
        s.set_template(m.id, Some("abc")).unwrap();
        assert_eq!(s.template_of(m.id).unwrap().as_deref(), Some("abc"));
        s.delete_machine(m.id).unwrap();
        assert_eq!(s.template_of(m.id).unwrap(), None);
    }
}
