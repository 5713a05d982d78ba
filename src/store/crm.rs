//! [`CrmStore`] over [`Db`]: deals, their stage history, runs, changes and conflicts, in SQL both
//! engines run. Bulk creation writes many rows a statement; on PostgreSQL the new deals' ids are
//! drawn from the sequence first, so that each row knows its id before it is written.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::sql::sql_params;
use super::sql::{
    placeholders, value_groups, value_groups_sharing, Db, Engine, Param, Row, StatementText, Value,
};
use super::{
    parse_timestamp, timestamp, ChangeKind, ChangeRecord, ConflictRecord, CrmStore, DealFilter,
    NewDeal, RunCounts, StageChange, StoreError, SyncRun,
};
use crate::deal::{Deal, DealId, ExtraMap, Field, FieldKind, FieldMap, FieldValue};

/// How many rows one multi-row INSERT takes: well under SQLite's limit on bound values, large
/// enough that the cost of a statement is spread thin.
pub(super) const ROWS_PER_INSERT: usize = 64;

/// How many values one `IN (…)` list takes.
pub(super) const IN_CHUNK: usize = 500;

/// The channel PostgreSQL notifies with the new change counter when a transaction that changed
/// deals commits: the trigger of the second PostgreSQL migration sends it whenever the counter
/// moves, so every writer notifies, whatever code (or admin) moved it.
pub const CHANGES_CHANNEL: &str = "funnelsync_changes";

/// The columns a deal is read from, in this order: the id, every field (in `Field::ALL` order,
/// names from the closed enum), then the deal's own columns.
fn deal_columns() -> String {
    let fields: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
    format!(
        "id, {}, extra, created_at, updated_at, stage_entered_at, archived_at",
        fields.join(", ")
    )
}

/// Where the deal's own columns start in [`deal_columns`].
const AFTER_FIELDS: usize = Field::ALL.len() + 1;

pub(super) fn field_value(value: Value) -> Option<FieldValue> {
    match value {
        Value::Text(text) => Some(FieldValue::Text(text)),
        Value::Real(number) => Some(FieldValue::Amount(number)),
        Value::Integer(number) => Some(FieldValue::Amount(number as f64)),
        _ => None,
    }
}

fn to_value(value: Option<&FieldValue>) -> Value {
    match value {
        Some(FieldValue::Text(text)) => Value::Text(text.clone()),
        Some(FieldValue::Amount(amount)) => Value::Real(*amount),
        None => Value::Null,
    }
}

/// A deal's extra fields as the JSON text the store keeps.
fn encode_extra(extra: &ExtraMap) -> Result<String, StoreError> {
    serde_json::to_string(extra).map_err(|source| StoreError::Encode {
        what: "the extra fields of a deal",
        source,
    })
}

fn deal_from_row(row: &Row<'_>) -> Result<Deal, StoreError> {
    let mut fields = FieldMap::new();
    for (offset, field) in Field::ALL.iter().enumerate() {
        if let Some(value) = field_value(row.value(offset + 1)?) {
            fields.insert(*field, value);
        }
    }
    let id: DealId = row.get(0)?;
    let extra_text: String = row.get(AFTER_FIELDS)?;
    let stage_entered_at: Option<String> = row.get(AFTER_FIELDS + 3)?;
    let archived_at: Option<String> = row.get(AFTER_FIELDS + 4)?;
    Ok(Deal {
        id,
        fields,
        extra: serde_json::from_str(&extra_text)
            .map_err(|source| StoreError::damaged(format!("extra fields of deal {id}"), source))?,
        created_at: parse_timestamp(&row.get::<String>(AFTER_FIELDS + 1)?)?,
        updated_at: parse_timestamp(&row.get::<String>(AFTER_FIELDS + 2)?)?,
        stage_entered_at: stage_entered_at
            .as_deref()
            .map(parse_timestamp)
            .transpose()?,
        archived_at: archived_at.as_deref().map(parse_timestamp).transpose()?,
    })
}

fn change_from_row(row: &Row<'_>) -> Result<ChangeRecord, StoreError> {
    let kind: String = row.get(3)?;
    Ok(ChangeRecord {
        id: row.get(0)?,
        run_id: row.get(1)?,
        deal_id: row.get(2)?,
        kind: ChangeKind::from_name(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("change kind \"{kind}\"")))?,
        field: row.get(4)?,
        old_value: row.get(5)?,
        new_value: row.get(6)?,
    })
}

fn ids(db: &Db<'_>, sql: &str, parameters: &[Value]) -> Result<HashSet<DealId>, StoreError> {
    Ok(db
        .query(sql, parameters, |row| row.get::<DealId>(0))?
        .into_iter()
        .collect())
}

impl Db<'_> {
    /// Moves the store's change counter on for a change to deals and returns its new value, which
    /// the changed deals record. Within a transaction the counter moves once, however many deals
    /// change; outside one, once per change. On PostgreSQL a trigger on the counter's row
    /// notifies [`CHANGES_CHANNEL`] with it, which reaches the daemons when the change commits.
    fn stamp(&self) -> Result<i64, StoreError> {
        if let Some(version) = self.stamped.get() {
            return Ok(version);
        }
        let version: i64 = self.query_value(
            "UPDATE store_meta SET version = version + 1 WHERE id = 1 RETURNING version",
            &[],
        )?;
        if self.in_transaction() {
            self.stamped.set(Some(version));
        }
        Ok(version)
    }

    fn query_deals(&self, sql: &str, parameters: &[Value]) -> Result<Vec<Deal>, StoreError> {
        self.query(sql, parameters, deal_from_row)
    }

    /// The stage changes the `filter` (a `WHERE` clause over `stage_history`, or nothing) picks,
    /// oldest first.
    fn stage_changes(
        &self,
        filter: &str,
        parameters: &[Value],
    ) -> Result<Vec<StageChange>, StoreError> {
        self.query(
            &format!("SELECT deal_id, from_stage, to_stage, at, source, start_known FROM stage_history {filter} ORDER BY at, id"),
            parameters,
            |row| {
                Ok(StageChange {
                    deal_id: row.get(0)?,
                    from_stage: row.get(1)?,
                    to_stage: row.get(2)?,
                    at: parse_timestamp(&row.get::<String>(3)?)?,
                    source: row.get(4)?,
                    start_known: row.get(5)?,
                })
            },
        )
    }

    /// Ids for `n` new deals: on SQLite the rows take the next ids as they are inserted; on
    /// PostgreSQL they are drawn from the sequence first.
    fn new_deal_ids(&self, n: usize) -> Result<Option<Vec<DealId>>, StoreError> {
        if self.engine() == Engine::Sqlite {
            return Ok(None);
        }
        Ok(Some(self.query(
            "SELECT nextval(pg_get_serial_sequence('deals', 'id')) FROM generate_series(1, ?1)",
            &sql_params![n as i64],
            |row| row.get::<DealId>(0),
        )?))
    }
}

impl CrmStore for Db<'_> {
    fn deals_by_ids(&self, ids: &[DealId]) -> Result<HashMap<DealId, Deal>, StoreError> {
        let mut found = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(IN_CHUNK) {
            let sql = format!(
                "SELECT {} FROM deals WHERE id IN ({})",
                deal_columns(),
                placeholders(chunk.len())
            );
            let parameters: Vec<Value> = chunk.iter().map(|id| Value::Integer(*id)).collect();
            for deal in self.query_deals(&sql, &parameters)? {
                found.insert(deal.id, deal);
            }
        }
        Ok(found)
    }

    fn any_changed_since(&self, ids: &[DealId], version: i64) -> Result<bool, StoreError> {
        let mut unique = ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        for chunk in unique.chunks(IN_CHUNK) {
            let sql = format!(
                "SELECT count(*) FROM deals WHERE id IN ({}) AND changed_version <= ?",
                placeholders(chunk.len())
            );
            let mut parameters: Vec<Value> = chunk.iter().map(|id| Value::Integer(*id)).collect();
            parameters.push(Value::Integer(version));
            let n_unchanged: i64 = self.query_value(&sql, &parameters)?;
            // A deal missing here was deleted: that is a change too.
            if n_unchanged != chunk.len() as i64 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn live_deal_fields(&self, fields: &[Field]) -> Result<Vec<(DealId, FieldMap)>, StoreError> {
        // Column names come from the closed Field enum, never from input.
        let columns: Vec<&str> = fields.iter().map(|field| field.name()).collect();
        let sql = if columns.is_empty() {
            "SELECT id FROM deals WHERE archived_at IS NULL".to_string()
        } else {
            format!(
                "SELECT id, {} FROM deals WHERE archived_at IS NULL",
                columns.join(", ")
            )
        };
        self.query(&sql, &[], |row| {
            let mut values = FieldMap::new();
            for (offset, field) in fields.iter().enumerate() {
                if let Some(value) = field_value(row.value(offset + 1)?) {
                    values.insert(*field, value);
                }
            }
            Ok((row.get::<DealId>(0)?, values))
        })
    }

    fn ids_changed_since(&self, version: i64) -> Result<HashSet<DealId>, StoreError> {
        ids(
            self,
            "SELECT id FROM deals WHERE changed_version > ?1 UNION ALL SELECT deal_id FROM deal_tombstones WHERE version > ?1",
            &sql_params![version],
        )
    }

    fn deal_versions(&self, ids: &[DealId]) -> Result<HashMap<DealId, i64>, StoreError> {
        let mut versions = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(IN_CHUNK) {
            let sql = format!(
                "SELECT id, changed_version FROM deals WHERE id IN ({})",
                placeholders(chunk.len())
            );
            let parameters: Vec<Value> = chunk.iter().map(|id| Value::Integer(*id)).collect();
            for (id, version) in self.query(&sql, &parameters, |row| {
                Ok((row.get::<DealId>(0)?, row.get::<i64>(1)?))
            })? {
                versions.insert(id, version);
            }
        }
        Ok(versions)
    }

    fn find_ids_by_values(
        &self,
        field: Field,
        values: &[FieldValue],
    ) -> Result<HashMap<String, DealId>, StoreError> {
        // An amount column holds numbers only: a text never matches one.
        let values: Vec<&FieldValue> = values
            .iter()
            .filter(|value| field.kind() != FieldKind::Amount || value.as_text().is_none())
            .collect();
        let mut found = HashMap::new();
        for chunk in values.chunks(IN_CHUNK) {
            // Column names come from the closed Field enum, never from input.
            let sql = format!(
                "SELECT id, {column} FROM deals WHERE {column} IN ({}) ORDER BY archived_at IS NOT NULL, id",
                placeholders(chunk.len()),
                column = field.name()
            );
            let parameters: Vec<Value> = chunk.iter().map(|value| to_value(Some(value))).collect();
            for (id, value) in self.query(&sql, &parameters, |row| {
                Ok((row.get::<DealId>(0)?, row.value(1)?))
            })? {
                let text = match field_value(value) {
                    Some(FieldValue::Text(text)) => text,
                    Some(amount) => amount.to_string(),
                    None => continue,
                };
                found.entry(text).or_insert(id);
            }
        }
        Ok(found)
    }

    fn create_deals(&self, deals: &[NewDeal<'_>]) -> Result<Vec<DealId>, StoreError> {
        let mut ids = Vec::with_capacity(deals.len());
        if deals.is_empty() {
            return Ok(ids);
        }
        let version = self.stamp()?;
        let field_names: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
        // The deals of a batch share one instant, so each time is formatted once; the values are
        // bound borrowed, not copied into owned parameters first.
        let mut stamps: Vec<(DateTime<Utc>, String)> = Vec::new();
        let mut stamp_of = |at: DateTime<Utc>| -> usize {
            match stamps.iter().position(|(known, _)| *known == at) {
                Some(position) => position,
                None => {
                    stamps.push((at, timestamp(at)));
                    stamps.len() - 1
                }
            }
        };
        struct Times {
            now: usize,
            entered: Option<usize>,
            history_at: usize,
        }
        let times: Vec<Times> = deals
            .iter()
            .map(|deal| Times {
                now: stamp_of(deal.now),
                entered: deal.stage_entered_at.map(&mut stamp_of),
                history_at: stamp_of(deal.stage_entered_at.unwrap_or(deal.now)),
            })
            .collect();
        // Extras arrive encoded when the sync has encoded them already (as it hashed the row).
        let encoded: Vec<Option<String>> = deals
            .iter()
            .map(|deal| match deal.extra_json {
                Some(_) => Ok(None),
                None => encode_extra(deal.extra).map(Some),
            })
            .collect::<Result<_, _>>()?;
        let mut deal_statement = StatementText::new();
        let mut history_statement = StatementText::new();
        for (chunk_idx, chunk) in deals.chunks(ROWS_PER_INSERT).enumerate() {
            let first_idx = chunk_idx * ROWS_PER_INSERT;
            let drawn = self.new_deal_ids(chunk.len())?;
            // The change counter is the same for every deal, and so, as a rule, is the time:
            // each is bound once for the statement (see `value_groups_sharing`).
            let shared_now = times[first_idx..first_idx + chunk.len()]
                .iter()
                .all(|deal_times| deal_times.now == times[first_idx].now)
                .then(|| stamps[times[first_idx].now].1.as_str());
            let mut columns: Vec<Option<usize>> = Vec::new();
            if drawn.is_some() {
                columns.push(None);
            }
            columns.extend(field_names.iter().map(|_| None));
            let now_column = shared_now.map(|_| 2);
            columns.extend([None, now_column, now_column, None, Some(1)]);
            let mut values: Vec<Param<'_>> = Vec::with_capacity(chunk.len() * columns.len());
            values.push(Param::Integer(version));
            if let Some(now_text) = shared_now {
                values.push(Param::Text(now_text));
            }
            for (offset, deal) in chunk.iter().enumerate() {
                let deal_idx = first_idx + offset;
                if let Some(drawn) = &drawn {
                    values.push(Param::Integer(drawn[offset]));
                }
                let now_text = stamps[times[deal_idx].now].1.as_str();
                values.extend(Field::ALL.iter().map(|field| match deal.fields.get(field) {
                    Some(FieldValue::Text(text)) => Param::Text(text),
                    Some(FieldValue::Amount(amount)) => Param::Real(*amount),
                    None => Param::Null,
                }));
                values.push(Param::Text(
                    deal.extra_json
                        .or(encoded[deal_idx].as_deref())
                        .unwrap_or("{}"),
                ));
                if shared_now.is_none() {
                    values.push(Param::Text(now_text));
                    values.push(Param::Text(now_text));
                }
                let has_stage = deal
                    .fields
                    .get(&Field::Stage)
                    .and_then(FieldValue::as_text)
                    .is_some();
                let entered = times[deal_idx].entered.filter(|_| has_stage);
                values.push(entered.map_or(Param::Null, |position| {
                    Param::Text(stamps[position].1.as_str())
                }));
            }
            // Column names come from the closed Field enum, never from input.
            let sql = deal_statement.get(
                (chunk.len(), drawn.is_some(), shared_now.is_some()),
                || {
                    format!(
                        "{} INTO deals ({}{}, extra, created_at, updated_at, stage_entered_at, changed_version) VALUES {}",
                        self.bulk_insert(),
                        if drawn.is_some() { "id, " } else { "" },
                        field_names.join(", "),
                        value_groups_sharing(chunk.len(), &columns)
                    )
                },
            );
            self.execute_params(sql, &values)?;
            drop(values);
            let chunk_ids: Vec<DealId> = match drawn {
                Some(drawn) => drawn,
                None => {
                    // One statement inserts its rows one after the other, each taking the next id.
                    let last: i64 = self.query_value("SELECT last_insert_rowid()", &[])?;
                    let first = last - chunk.len() as i64 + 1;
                    (0..chunk.len())
                        .map(|offset| first + offset as i64)
                        .collect()
                }
            };
            let mut history: Vec<Param<'_>> = Vec::new();
            for (offset, (deal, id)) in chunk.iter().zip(&chunk_ids).enumerate() {
                ids.push(*id);
                if let Some(stage) = deal.fields.get(&Field::Stage).and_then(FieldValue::as_text) {
                    // Without a known entry time the history still says where the deal was first
                    // seen, marked so that time in stage does not count from there.
                    history.extend([
                        Param::Integer(*id),
                        Param::Null,
                        Param::Text(stage),
                        Param::Text(stamps[times[first_idx + offset].history_at].1.as_str()),
                        Param::Text(deal.origin),
                        Param::Integer(i64::from(deal.stage_entered_at.is_some())),
                    ]);
                }
            }
            if !history.is_empty() {
                let sql = history_statement.get(history.len() / 6, || {
                    format!(
                        "{} INTO stage_history (deal_id, from_stage, to_stage, at, source, start_known) VALUES {}",
                        self.bulk_insert(),
                        value_groups(history.len() / 6, 6)
                    )
                });
                self.execute_params(sql, &history)?;
            }
        }
        Ok(ids)
    }

    fn create_deal(
        &self,
        fields: &FieldMap,
        extra: &ExtraMap,
        origin: &str,
        now: DateTime<Utc>,
        stage_entered_at: Option<DateTime<Utc>>,
    ) -> Result<DealId, StoreError> {
        let ids = self.create_deals(&[NewDeal {
            fields,
            extra,
            extra_json: None,
            origin,
            now,
            stage_entered_at,
        }])?;
        ids.first()
            .copied()
            .ok_or_else(|| StoreError::Corrupt("no id for a new deal".to_string()))
    }

    fn update_deal(
        &self,
        id: DealId,
        changes: &[(Field, Option<FieldValue>)],
        extra_changes: &[(String, Option<String>)],
        origin: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if changes.is_empty() && extra_changes.is_empty() {
            return Ok(());
        }
        // The counter first: on PostgreSQL its row is the writers' lock, taken before any deal's.
        let version = self.stamp()?;
        let now_text = timestamp(now);
        let old_stage: Option<String> = self
            .query_row(
                "SELECT stage FROM deals WHERE id = ?1",
                &sql_params![id],
                |row| row.get::<Option<String>>(0),
            )?
            .flatten();
        for (field, value) in changes {
            // Column names come from the closed Field enum, never from input.
            let sql = format!("UPDATE deals SET {} = ?1 WHERE id = ?2", field.name());
            self.execute(&sql, &[to_value(value.as_ref()), Value::Integer(id)])?;
            if *field == Field::Stage {
                let new_stage = value.as_ref().and_then(FieldValue::as_text);
                if let Some(new_stage) =
                    new_stage.filter(|new_stage| old_stage.as_deref() != Some(*new_stage))
                {
                    self.execute(
                        "INSERT INTO stage_history (deal_id, from_stage, to_stage, at, source) VALUES (?1, ?2, ?3, ?4, ?5)",
                        &sql_params![id, old_stage.as_deref(), new_stage, now_text.as_str(), origin],
                    )?;
                    self.execute(
                        "UPDATE deals SET stage_entered_at = ?1 WHERE id = ?2",
                        &sql_params![now_text.as_str(), id],
                    )?;
                }
            }
        }
        if !extra_changes.is_empty() {
            let extra_text: String =
                self.query_value("SELECT extra FROM deals WHERE id = ?1", &sql_params![id])?;
            let mut extra: ExtraMap = serde_json::from_str(&extra_text).map_err(|source| {
                StoreError::damaged(format!("extra fields of deal {id}"), source)
            })?;
            for (key, value) in extra_changes {
                match value {
                    Some(value) => extra.insert(key.clone(), value.clone()),
                    None => extra.remove(key),
                };
            }
            let extra_text = encode_extra(&extra)?;
            self.execute(
                "UPDATE deals SET extra = ?1 WHERE id = ?2",
                &sql_params![extra_text, id],
            )?;
        }
        self.execute(
            "UPDATE deals SET updated_at = ?1, changed_version = ?3 WHERE id = ?2",
            &sql_params![now_text, id, version],
        )?;
        Ok(())
    }

    fn set_archived(
        &self,
        id: DealId,
        archived: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let now_text = timestamp(now);
        let is_archived: Option<bool> = self.query_row(
            "SELECT archived_at IS NOT NULL FROM deals WHERE id = ?1",
            &sql_params![id],
            |row| row.get::<bool>(0),
        )?;
        if is_archived != Some(!archived) {
            return Ok(false);
        }
        let version = self.stamp()?;
        let changed = if archived {
            self.execute(
                "UPDATE deals SET archived_at = ?1, updated_at = ?1, changed_version = ?3 WHERE id = ?2 AND archived_at IS NULL",
                &sql_params![now_text, id, version],
            )?
        } else {
            self.execute(
                "UPDATE deals SET archived_at = NULL, updated_at = ?1, changed_version = ?3 WHERE id = ?2 AND archived_at IS NOT NULL",
                &sql_params![now_text, id, version],
            )?
        };
        Ok(changed > 0)
    }

    fn delete_deal(&self, id: DealId) -> Result<bool, StoreError> {
        let exists: Option<i64> = self.query_row(
            "SELECT id FROM deals WHERE id = ?1",
            &sql_params![id],
            |row| row.get::<i64>(0),
        )?;
        if exists.is_none() {
            return Ok(false);
        }
        let version = self.stamp()?;
        let deleted = self.execute("DELETE FROM deals WHERE id = ?1", &sql_params![id])? > 0;
        if deleted {
            // The files that showed it must hear of it.
            self.execute(
                "INSERT INTO deal_tombstones (deal_id, version) VALUES (?1, ?2) \
                 ON CONFLICT (deal_id) DO UPDATE SET version = excluded.version",
                &sql_params![id, version],
            )?;
        }
        Ok(deleted)
    }

    fn list_deals(&self, filter: &DealFilter) -> Result<Vec<Deal>, StoreError> {
        let mut sql = format!("SELECT {} FROM deals WHERE 1 = 1", deal_columns());
        let mut parameters: Vec<Value> = Vec::new();
        if !filter.include_archived {
            sql.push_str(" AND archived_at IS NULL");
        }
        if let Some(stage) = &filter.stage {
            parameters.push(Value::from(stage));
            sql.push_str(&format!(" AND lower(stage) = lower(?{})", parameters.len()));
        }
        if let Some(owner) = &filter.owner {
            parameters.push(Value::from(owner.trim()));
            sql.push_str(&format!(
                " AND lower(trim(owner)) = lower(?{})",
                parameters.len()
            ));
        }
        sql.push_str(" ORDER BY id");
        self.query_deals(&sql, &parameters)
    }

    fn record_changes(&self, run_id: i64, changes: &[ChangeRecord]) -> Result<(), StoreError> {
        let mut statement = StatementText::new();
        for chunk in changes.chunks(ROWS_PER_INSERT) {
            // The run, and as a rule the kind (an import's are all creations), are bound once.
            let shared_kind = chunk
                .iter()
                .all(|change| change.kind == chunk[0].kind)
                .then(|| chunk[0].kind.name());
            let mut values: Vec<Param<'_>> = Vec::with_capacity(chunk.len() * 5 + 2);
            values.push(Param::Integer(run_id));
            if let Some(kind) = shared_kind {
                values.push(Param::Text(kind));
            }
            for change in chunk {
                values.push(Param::Integer(change.deal_id));
                if shared_kind.is_none() {
                    values.push(Param::Text(change.kind.name()));
                }
                values.extend([
                    Param::from(change.field.as_deref()),
                    Param::from(change.old_value.as_deref()),
                    Param::from(change.new_value.as_deref()),
                ]);
            }
            let kind_column = shared_kind.map(|_| 2);
            let sql = statement.get((chunk.len(), kind_column), || {
                format!(
                    "{} INTO changes (run_id, deal_id, kind, field, old_value, new_value) VALUES {}",
                    self.bulk_insert(),
                    value_groups_sharing(
                        chunk.len(),
                        &[Some(1), None, kind_column, None, None, None]
                    )
                )
            });
            self.execute_params(sql, &values)?;
        }
        Ok(())
    }

    fn changes_of_run(&self, run_id: i64) -> Result<Vec<ChangeRecord>, StoreError> {
        self.query(
            "SELECT id, run_id, deal_id, kind, field, old_value, new_value FROM changes WHERE run_id = ?1 ORDER BY id",
            &sql_params![run_id],
            change_from_row,
        )
    }

    fn later_changes(
        &self,
        run_id: i64,
        deal_id: DealId,
        field: Option<&str>,
    ) -> Result<Vec<ChangeRecord>, StoreError> {
        self.query(
            "SELECT id, run_id, deal_id, kind, field, old_value, new_value FROM changes \
             WHERE run_id > ?1 AND deal_id = ?2 AND (CAST(?3 AS TEXT) IS NULL OR field = ?3 OR field IS NULL) ORDER BY id",
            &sql_params![run_id, deal_id, field],
            change_from_row,
        )
    }

    fn run(&self, run_id: i64) -> Result<Option<SyncRun>, StoreError> {
        Ok(self
            .runs_where("WHERE id = ?1", &sql_params![run_id])?
            .pop())
    }

    fn restore_deal(&self, deal: &Deal) -> Result<(), StoreError> {
        let extra = encode_extra(&deal.extra)?;
        let optional_time =
            |at: Option<DateTime<Utc>>| at.map_or(Value::Null, |at| Value::Text(timestamp(at)));
        let mut values: Vec<Value> = vec![Value::Integer(deal.id)];
        values.extend(
            Field::ALL
                .iter()
                .map(|field| to_value(deal.fields.get(field))),
        );
        values.extend([
            Value::Text(extra),
            Value::Text(timestamp(deal.created_at)),
            Value::Text(timestamp(deal.updated_at)),
            optional_time(deal.stage_entered_at),
            optional_time(deal.archived_at),
        ]);
        values.push(Value::Integer(self.stamp()?));
        self.execute(
            &format!(
                "INSERT INTO deals ({}, changed_version) VALUES ({})",
                deal_columns(),
                placeholders(values.len())
            ),
            &values,
        )?;
        Ok(())
    }

    fn stage_history(&self, id: DealId) -> Result<Vec<StageChange>, StoreError> {
        self.stage_changes("WHERE deal_id = ?1", &sql_params![id])
    }

    fn all_stage_history(&self) -> Result<Vec<StageChange>, StoreError> {
        self.stage_changes("", &[])
    }

    fn note_on_run(
        &self,
        run_id: i64,
        status: Option<&str>,
        message: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE sync_runs SET status = coalesce(?1, status), message = ?2 WHERE id = ?3",
            &sql_params![status, message, run_id],
        )?;
        Ok(())
    }

    fn finish_run(&self, run_id: i64, run: &SyncRun) -> Result<(), StoreError> {
        let counts = &run.counts;
        self.execute(
            "UPDATE sync_runs SET finished_at = ?1, status = ?2, n_created = ?3, n_updated = ?4, n_archived = ?5, \
             n_deleted = ?6, n_unchanged = ?7, n_errors = ?8, n_warnings = ?9, message = ?10 WHERE id = ?11",
            &sql_params![
                timestamp(run.finished_at),
                run.status.as_str(),
                counts.created as i64,
                counts.updated as i64,
                counts.archived as i64,
                counts.deleted as i64,
                counts.unchanged as i64,
                counts.errors as i64,
                counts.warnings as i64,
                run.message.clone(),
                run_id
            ],
        )?;
        Ok(())
    }

    fn record_run(&self, run: &SyncRun) -> Result<i64, StoreError> {
        let counts = &run.counts;
        // A run of a file belongs to the site that synced it; edits and undos belong to none.
        let site = run.file.starts_with('/').then(|| self.site().to_string());
        self.insert_returning_id(
            "INSERT INTO sync_runs (source, file, started_at, finished_at, status, n_created, n_updated, n_archived, \
             n_deleted, n_unchanged, n_errors, n_warnings, message, site) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            &sql_params![
                run.source.as_str(),
                run.file.as_str(),
                timestamp(run.started_at),
                timestamp(run.finished_at),
                run.status.as_str(),
                counts.created as i64,
                counts.updated as i64,
                counts.archived as i64,
                counts.deleted as i64,
                counts.unchanged as i64,
                counts.errors as i64,
                counts.warnings as i64,
                run.message.clone(),
                site,
            ],
        )
    }

    fn record_conflict(&self, conflict: &ConflictRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO conflicts (deal_id, field, base_value, sheet_value, store_value, winner, policy, source, file, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            &sql_params![
                conflict.deal_id,
                conflict.field.as_str(),
                conflict.base_value.clone(),
                conflict.sheet_value.clone(),
                conflict.store_value.clone(),
                conflict.winner.as_str(),
                conflict.policy.as_str(),
                conflict.source.as_str(),
                conflict.file.as_str(),
                timestamp(conflict.at)
            ],
        )?;
        Ok(())
    }

    fn conflicts(&self, limit: usize) -> Result<Vec<ConflictRecord>, StoreError> {
        self.query(
            "SELECT id, deal_id, field, base_value, sheet_value, store_value, winner, policy, source, file, at \
             FROM conflicts ORDER BY id DESC LIMIT ?1",
            &sql_params![limit as i64],
            |row| {
                Ok(ConflictRecord {
                    id: row.get(0)?,
                    deal_id: row.get(1)?,
                    field: row.get(2)?,
                    base_value: row.get(3)?,
                    sheet_value: row.get(4)?,
                    store_value: row.get(5)?,
                    winner: row.get(6)?,
                    policy: row.get(7)?,
                    source: row.get(8)?,
                    file: row.get(9)?,
                    at: parse_timestamp(&row.get::<String>(10)?)?,
                })
            },
        )
    }

    fn version(&self) -> Result<i64, StoreError> {
        self.query_value("SELECT version FROM store_meta WHERE id = 1", &[])
    }

    fn last_runs(&self, limit: usize) -> Result<Vec<SyncRun>, StoreError> {
        self.runs_where(
            "ORDER BY id DESC LIMIT ?1",
            &sql_params![limit.min(i64::MAX as usize) as i64],
        )
    }
}

impl Db<'_> {
    fn runs_where(&self, clause: &str, parameters: &[Value]) -> Result<Vec<SyncRun>, StoreError> {
        self.query(
            &format!(
                "SELECT id, source, file, started_at, finished_at, status, n_created, n_updated, n_archived, n_deleted, \
                 n_unchanged, n_errors, n_warnings, message FROM sync_runs {clause}"
            ),
            parameters,
            |row| {
                let count = |column: usize| -> Result<u64, StoreError> {
                    Ok(row.get::<i64>(column)?.max(0) as u64)
                };
                Ok(SyncRun {
                    id: row.get(0)?,
                    source: row.get(1)?,
                    file: row.get(2)?,
                    started_at: parse_timestamp(&row.get::<String>(3)?)?,
                    finished_at: parse_timestamp(&row.get::<String>(4)?)?,
                    status: row.get(5)?,
                    counts: RunCounts {
                        created: count(6)?,
                        updated: count(7)?,
                        archived: count(8)?,
                        deleted: count(9)?,
                        unchanged: count(10)?,
                        errors: count(11)?,
                        warnings: count(12)?,
                    },
                    message: row.get(13)?,
                })
            },
        )
    }
}
