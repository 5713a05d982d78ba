//! The store's schema, per engine, as versioned migrations: SQLite's history (counted by
//! `PRAGMA user_version`) and PostgreSQL's (counted in `schema_version`). Each list only grows.

/// SQLite's migrations, in order; `PRAGMA user_version` says how many have run.
pub const SQLITE_MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deals (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    company          TEXT,
    contact          TEXT,
    email            TEXT,
    phone            TEXT,
    stage            TEXT,
    amount           REAL,
    currency         TEXT,
    owner            TEXT,
    next_step        TEXT,
    last_contact     TEXT,
    expected_close   TEXT,
    extra            TEXT NOT NULL DEFAULT '{}',
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    stage_entered_at TEXT,
    archived_at      TEXT
);
CREATE INDEX deals_email ON deals(email);
CREATE INDEX deals_owner ON deals(owner);
CREATE INDEX deals_stage ON deals(stage);

CREATE TABLE stage_history (
    id         INTEGER PRIMARY KEY,
    deal_id    INTEGER NOT NULL REFERENCES deals(id) ON DELETE CASCADE,
    from_stage TEXT,
    to_stage   TEXT NOT NULL,
    at         TEXT NOT NULL,
    source     TEXT NOT NULL
);
CREATE INDEX stage_history_deal ON stage_history(deal_id, at);

CREATE TABLE sync_runs (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    status      TEXT NOT NULL,
    n_created   INTEGER NOT NULL DEFAULT 0,
    n_updated   INTEGER NOT NULL DEFAULT 0,
    n_archived  INTEGER NOT NULL DEFAULT 0,
    n_deleted   INTEGER NOT NULL DEFAULT 0,
    n_unchanged INTEGER NOT NULL DEFAULT 0,
    n_errors    INTEGER NOT NULL DEFAULT 0,
    n_warnings  INTEGER NOT NULL DEFAULT 0,
    message     TEXT
);
CREATE INDEX sync_runs_file ON sync_runs(file, id);

CREATE TABLE mirror_files (
    file         TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    sheet        TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    header_row   INTEGER NOT NULL,
    headers      TEXT NOT NULL,
    synced_at    TEXT NOT NULL
);

CREATE TABLE mirror_rows (
    file       TEXT NOT NULL REFERENCES mirror_files(file) ON DELETE CASCADE,
    deal_id    INTEGER NOT NULL,
    row_number INTEGER NOT NULL,
    row_hash   TEXT NOT NULL,
    fields     TEXT NOT NULL,
    extras     TEXT NOT NULL,
    PRIMARY KEY (file, deal_id)
);

CREATE TABLE row_errors (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    sheet       TEXT,
    row_number  INTEGER,
    column_name TEXT,
    value       TEXT,
    severity    TEXT NOT NULL,
    message     TEXT NOT NULL,
    run_id      INTEGER NOT NULL REFERENCES sync_runs(id) ON DELETE CASCADE,
    seen_at     TEXT NOT NULL
);
CREATE INDEX row_errors_file ON row_errors(file);
"#,
    r#"
CREATE TABLE file_status (
    file          TEXT PRIMARY KEY,
    source        TEXT NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_retry_at TEXT,
    last_error    TEXT,
    updated_at    TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE conflicts (
    id          INTEGER PRIMARY KEY,
    deal_id     INTEGER NOT NULL,
    field       TEXT NOT NULL,
    base_value  TEXT,
    sheet_value TEXT,
    store_value TEXT,
    winner      TEXT NOT NULL,
    policy      TEXT NOT NULL,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    at          TEXT NOT NULL
);
CREATE INDEX conflicts_deal ON conflicts(deal_id);

-- A counter that every change to a deal moves on, whoever makes it (the daemon, the CLI, another
-- process): the daemon polls it to learn that files need writing back.
CREATE TABLE store_meta (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT INTO store_meta (id, version) VALUES (1, 0);
CREATE TRIGGER deals_inserted AFTER INSERT ON deals BEGIN UPDATE store_meta SET version = version + 1; END;
CREATE TRIGGER deals_updated AFTER UPDATE ON deals BEGIN UPDATE store_meta SET version = version + 1; END;
CREATE TRIGGER deals_deleted AFTER DELETE ON deals BEGIN UPDATE store_meta SET version = version + 1; END;
"#,
    r#"
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    recipient       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    subject         TEXT NOT NULL,
    text_body       TEXT NOT NULL,
    html_body       TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    give_up_at      TEXT NOT NULL,
    sent_at         TEXT,
    last_error      TEXT
);
CREATE INDEX outbox_status ON outbox(status);

CREATE TABLE reminders (
    id         INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES outbox(id) ON DELETE CASCADE,
    deal_id    INTEGER NOT NULL,
    stall_key  TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    day        TEXT NOT NULL,
    at         TEXT NOT NULL
);
CREATE INDEX reminders_stall ON reminders(stall_key, kind);

CREATE TABLE remind_runs (
    id         INTEGER PRIMARY KEY,
    due_at     TEXT NOT NULL,
    ran_at     TEXT NOT NULL,
    n_messages INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE outbox ADD COLUMN attachment_name TEXT;
ALTER TABLE outbox ADD COLUMN attachment BLOB;
CREATE TABLE report_snapshots (
    id     INTEGER PRIMARY KEY,
    at     TEXT NOT NULL,
    stages TEXT NOT NULL
);
"#,
    r#"
-- Every change a run applied, so it can be listed and undone.
CREATE TABLE changes (
    id        INTEGER PRIMARY KEY,
    run_id    INTEGER NOT NULL REFERENCES sync_runs(id) ON DELETE CASCADE,
    deal_id   INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    field     TEXT,
    old_value TEXT,
    new_value TEXT
);
CREATE INDEX changes_run ON changes(run_id);
CREATE INDEX changes_deal ON changes(deal_id, field);
CREATE TABLE alerts (
    id      INTEGER PRIMARY KEY,
    subject TEXT NOT NULL,
    key     TEXT NOT NULL,
    at      TEXT NOT NULL
);
CREATE INDEX alerts_key ON alerts(key, at);
"#,
    r#"
-- What a file's last sync depended on besides its content: the source's settings and, for files
-- that write back, the store's change counter. Equal content and equal both: nothing to do.
ALTER TABLE mirror_files ADD COLUMN config_hash TEXT;
ALTER TABLE mirror_files ADD COLUMN store_version INTEGER;
"#,
    r#"
-- Rows with errors that the last sync could not recognise and that cannot be the row of a deal
-- whose row went missing (they were there beside it): a JSON array of their hashes.
ALTER TABLE mirror_files ADD COLUMN known_error_rows TEXT;

-- The day a deal entered its stage as a sheet says it (or as funnelsync saw it happen), and the
-- day it was created as a sheet says it.
ALTER TABLE deals ADD COLUMN stage_since TEXT;
ALTER TABLE deals ADD COLUMN created_on TEXT;
-- Whether a stage change's time is when it happened (1) or only when funnelsync first saw the
-- deal there (0: a deal imported without a stage-since date).
ALTER TABLE stage_history ADD COLUMN start_known INTEGER NOT NULL DEFAULT 1;

-- The store's change counter as each deal's last change left it: a file shows a changed deal when
-- one of its deals changed after the counter its last sync saw.
ALTER TABLE deals ADD COLUMN changed_version INTEGER NOT NULL DEFAULT 0;
CREATE INDEX deals_changed_version ON deals(changed_version);
CREATE INDEX mirror_rows_deal ON mirror_rows(deal_id);

-- When each file was last looked at (a pass that found it unchanged is not a run), and how its
-- last write-back went.
ALTER TABLE mirror_files ADD COLUMN checked_at TEXT;
ALTER TABLE mirror_files ADD COLUMN write_back TEXT;
ALTER TABLE mirror_files ADD COLUMN write_back_message TEXT;

-- Row errors of a sync that changed nothing belong to no run.
CREATE TABLE row_errors_new (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    sheet       TEXT,
    row_number  INTEGER,
    column_name TEXT,
    value       TEXT,
    severity    TEXT NOT NULL,
    message     TEXT NOT NULL,
    run_id      INTEGER REFERENCES sync_runs(id) ON DELETE CASCADE,
    seen_at     TEXT NOT NULL
);
INSERT INTO row_errors_new SELECT id, source, file, sheet, row_number, column_name, value, severity, message, run_id, seen_at FROM row_errors;
DROP TABLE row_errors;
ALTER TABLE row_errors_new RENAME TO row_errors;
CREATE INDEX row_errors_file ON row_errors(file);
"#,
    r#"
-- The change counter moves once per transaction that changes deals (the code stamps the deals it
-- changes with the new value), not once per row through triggers: a trigger on every insert made
-- a bulk import open a statement journal per row.
DROP TRIGGER IF EXISTS deals_inserted;
DROP TRIGGER IF EXISTS deals_updated;
DROP TRIGGER IF EXISTS deals_deleted;
"#,
    r#"
-- A hash of each mirror row's cells as written (the key column left out): a row that hashes as it
-- did at the last sync is not cleaned again. Unknown (NULL) for rows from before, and for rows
-- whose cells the write-back changed: those are cleaned once more.
ALTER TABLE mirror_rows ADD COLUMN raw_hash INTEGER;
-- The store's change counter when the file was last synced, and the counter the file shows the
-- store as of (kept while a write-back is owed): deals changed after it are looked at again.
ALTER TABLE mirror_files ADD COLUMN synced_version INTEGER;
ALTER TABLE mirror_files ADD COLUMN shown_version INTEGER;
-- Deleted deals with the change counter of their deletion, so that a sync can tell a row whose
-- deal is gone without looking every deal up.
CREATE TABLE deal_tombstones (deal_id INTEGER PRIMARY KEY, version INTEGER NOT NULL);
"#,
    r#"
-- Several daemons can share one store, each syncing the files of its own site: the mirror, the
-- row errors and the file states are keyed by site and file. A store from before has one site,
-- the default one.
CREATE TABLE mirror_files_new (
    site             TEXT NOT NULL DEFAULT 'local',
    file             TEXT NOT NULL,
    source           TEXT NOT NULL,
    sheet            TEXT NOT NULL,
    content_hash     TEXT NOT NULL,
    header_row       INTEGER NOT NULL,
    headers          TEXT NOT NULL,
    synced_at        TEXT NOT NULL,
    config_hash      TEXT,
    store_version    INTEGER,
    known_error_rows TEXT,
    checked_at       TEXT,
    write_back       TEXT,
    write_back_message TEXT,
    synced_version   INTEGER,
    shown_version    INTEGER,
    PRIMARY KEY (site, file)
);
INSERT INTO mirror_files_new (file, source, sheet, content_hash, header_row, headers, synced_at, config_hash, store_version,
    known_error_rows, checked_at, write_back, write_back_message, synced_version, shown_version)
SELECT file, source, sheet, content_hash, header_row, headers, synced_at, config_hash, store_version,
    known_error_rows, checked_at, write_back, write_back_message, synced_version, shown_version FROM mirror_files;
CREATE TABLE mirror_rows_new (
    site       TEXT NOT NULL DEFAULT 'local',
    file       TEXT NOT NULL,
    deal_id    INTEGER NOT NULL,
    row_number INTEGER NOT NULL,
    row_hash   TEXT NOT NULL,
    fields     TEXT NOT NULL,
    extras     TEXT NOT NULL,
    raw_hash   INTEGER,
    PRIMARY KEY (site, file, deal_id),
    -- Renaming mirror_files_new below makes this name the renamed table.
    FOREIGN KEY (site, file) REFERENCES mirror_files_new(site, file) ON DELETE CASCADE
);
INSERT INTO mirror_rows_new (file, deal_id, row_number, row_hash, fields, extras, raw_hash)
SELECT file, deal_id, row_number, row_hash, fields, extras, raw_hash FROM mirror_rows;
DROP TABLE mirror_rows;
DROP TABLE mirror_files;
ALTER TABLE mirror_files_new RENAME TO mirror_files;
ALTER TABLE mirror_rows_new RENAME TO mirror_rows;
CREATE INDEX mirror_rows_deal ON mirror_rows(deal_id);

CREATE TABLE file_status_new (
    site          TEXT NOT NULL DEFAULT 'local',
    file          TEXT NOT NULL,
    source        TEXT NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_retry_at TEXT,
    last_error    TEXT,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (site, file)
);
INSERT INTO file_status_new (file, source, state, attempts, next_retry_at, last_error, updated_at)
SELECT file, source, state, attempts, next_retry_at, last_error, updated_at FROM file_status;
DROP TABLE file_status;
ALTER TABLE file_status_new RENAME TO file_status;

ALTER TABLE row_errors ADD COLUMN site TEXT NOT NULL DEFAULT 'local';
DROP INDEX row_errors_file;
CREATE INDEX row_errors_file ON row_errors(site, file);
-- The site whose daemon synced the file a run is about (none for command-line edits and undos).
ALTER TABLE sync_runs ADD COLUMN site TEXT;
UPDATE sync_runs SET site = 'local' WHERE file LIKE '/%';

ALTER TABLE report_snapshots ADD COLUMN due_at TEXT;

-- Work done once per due time for the whole store, whichever daemon did it.
CREATE TABLE job_runs (
    job    TEXT NOT NULL,
    due_at TEXT NOT NULL,
    ran_at TEXT NOT NULL,
    PRIMARY KEY (job, due_at)
);
"#,
    r#"
-- Indexes no query can use go: the deal list's stage and owner filters compare lower(stage) and
-- lower(trim(owner)), and the funnel and the metrics count stages over every live deal; each
-- index cost an import a B-tree insert per deal.
DROP INDEX IF EXISTS deals_owner;
DROP INDEX IF EXISTS deals_stage;
"#,
];

/// PostgreSQL's migrations, in order; the `schema_version` table says how many have run. The
/// first is SQLite's schema as of its eleventh migration, in PostgreSQL's words: the same tables
/// and columns, so that a store can be copied from one to the other.
pub const POSTGRES_MIGRATIONS: &[&str] = &[
    // 1: the tables.
    r#"
CREATE TABLE deals (
    id               BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    company          TEXT,
    contact          TEXT,
    email            TEXT,
    phone            TEXT,
    stage            TEXT,
    amount           DOUBLE PRECISION,
    currency         TEXT,
    owner            TEXT,
    next_step        TEXT,
    last_contact     TEXT,
    expected_close   TEXT,
    extra            TEXT NOT NULL DEFAULT '{}',
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    stage_entered_at TEXT,
    archived_at      TEXT,
    stage_since      TEXT,
    created_on       TEXT,
    changed_version  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX deals_email ON deals(email);
CREATE INDEX deals_owner ON deals(owner);
CREATE INDEX deals_stage ON deals(stage);
CREATE INDEX deals_changed_version ON deals(changed_version);

CREATE TABLE stage_history (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    deal_id     BIGINT NOT NULL REFERENCES deals(id) ON DELETE CASCADE,
    from_stage  TEXT,
    to_stage    TEXT NOT NULL,
    at          TEXT NOT NULL,
    source      TEXT NOT NULL,
    start_known BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX stage_history_deal ON stage_history(deal_id, at);

CREATE TABLE sync_runs (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    status      TEXT NOT NULL,
    n_created   BIGINT NOT NULL DEFAULT 0,
    n_updated   BIGINT NOT NULL DEFAULT 0,
    n_archived  BIGINT NOT NULL DEFAULT 0,
    n_deleted   BIGINT NOT NULL DEFAULT 0,
    n_unchanged BIGINT NOT NULL DEFAULT 0,
    n_errors    BIGINT NOT NULL DEFAULT 0,
    n_warnings  BIGINT NOT NULL DEFAULT 0,
    message     TEXT,
    site        TEXT
);
CREATE INDEX sync_runs_file ON sync_runs(file, id);

CREATE TABLE mirror_files (
    site             TEXT NOT NULL,
    file             TEXT NOT NULL,
    source           TEXT NOT NULL,
    sheet            TEXT NOT NULL,
    content_hash     TEXT NOT NULL,
    header_row       BIGINT NOT NULL,
    headers          TEXT NOT NULL,
    synced_at        TEXT NOT NULL,
    config_hash      TEXT,
    store_version    BIGINT,
    known_error_rows TEXT,
    checked_at       TEXT,
    write_back       TEXT,
    write_back_message TEXT,
    synced_version   BIGINT,
    shown_version    BIGINT,
    PRIMARY KEY (site, file)
);

CREATE TABLE mirror_rows (
    site       TEXT NOT NULL,
    file       TEXT NOT NULL,
    deal_id    BIGINT NOT NULL,
    row_number BIGINT NOT NULL,
    row_hash   TEXT NOT NULL,
    fields     TEXT NOT NULL,
    extras     TEXT NOT NULL,
    raw_hash   BIGINT,
    PRIMARY KEY (site, file, deal_id),
    FOREIGN KEY (site, file) REFERENCES mirror_files(site, file) ON DELETE CASCADE
);
CREATE INDEX mirror_rows_deal ON mirror_rows(deal_id);

CREATE TABLE row_errors (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    sheet       TEXT,
    row_number  BIGINT,
    column_name TEXT,
    value       TEXT,
    severity    TEXT NOT NULL,
    message     TEXT NOT NULL,
    run_id      BIGINT REFERENCES sync_runs(id) ON DELETE CASCADE,
    seen_at     TEXT NOT NULL,
    site        TEXT NOT NULL
);
CREATE INDEX row_errors_file ON row_errors(site, file);

CREATE TABLE file_status (
    site          TEXT NOT NULL,
    file          TEXT NOT NULL,
    source        TEXT NOT NULL,
    state         TEXT NOT NULL,
    attempts      BIGINT NOT NULL DEFAULT 0,
    next_retry_at TEXT,
    last_error    TEXT,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (site, file)
);

CREATE TABLE conflicts (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    deal_id     BIGINT NOT NULL,
    field       TEXT NOT NULL,
    base_value  TEXT,
    sheet_value TEXT,
    store_value TEXT,
    winner      TEXT NOT NULL,
    policy      TEXT NOT NULL,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    at          TEXT NOT NULL
);
CREATE INDEX conflicts_deal ON conflicts(deal_id);

CREATE TABLE store_meta (id BIGINT PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
INSERT INTO store_meta (id, version) VALUES (1, 0);

CREATE TABLE outbox (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    recipient       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    subject         TEXT NOT NULL,
    text_body       TEXT NOT NULL,
    html_body       TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    give_up_at      TEXT NOT NULL,
    sent_at         TEXT,
    last_error      TEXT,
    attachment_name TEXT,
    attachment      BYTEA
);
CREATE INDEX outbox_status ON outbox(status);

CREATE TABLE reminders (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    message_id BIGINT NOT NULL REFERENCES outbox(id) ON DELETE CASCADE,
    deal_id    BIGINT NOT NULL,
    stall_key  TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    day        TEXT NOT NULL,
    at         TEXT NOT NULL
);
CREATE INDEX reminders_stall ON reminders(stall_key, kind);

CREATE TABLE remind_runs (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    due_at     TEXT NOT NULL,
    ran_at     TEXT NOT NULL,
    n_messages BIGINT NOT NULL
);

CREATE TABLE report_snapshots (
    id     BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at     TEXT NOT NULL,
    stages TEXT NOT NULL,
    due_at TEXT
);

CREATE TABLE changes (
    id        BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    run_id    BIGINT NOT NULL REFERENCES sync_runs(id) ON DELETE CASCADE,
    deal_id   BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    field     TEXT,
    old_value TEXT,
    new_value TEXT
);
CREATE INDEX changes_run ON changes(run_id);
CREATE INDEX changes_deal ON changes(deal_id, field);

CREATE TABLE alerts (
    id      BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    subject TEXT NOT NULL,
    key     TEXT NOT NULL,
    at      TEXT NOT NULL
);
CREATE INDEX alerts_key ON alerts(key, at);

CREATE TABLE deal_tombstones (deal_id BIGINT PRIMARY KEY, version BIGINT NOT NULL);

CREATE TABLE job_runs (
    job    TEXT NOT NULL,
    due_at TEXT NOT NULL,
    ran_at TEXT NOT NULL,
    PRIMARY KEY (job, due_at)
);
"#,
    // 2: the change channel is fed by the store itself. Every transaction that changes deals
    // moves the change counter (`store_meta.version`), and this trigger notifies
    // `funnelsync_changes` with the new value; PostgreSQL delivers it when the transaction
    // commits (and never when it rolls back), to every connection that listens.
    r#"
CREATE FUNCTION funnelsync_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('funnelsync_changes', NEW.version::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER store_meta_notify_change
    AFTER UPDATE OF version ON store_meta
    FOR EACH ROW
    WHEN (NEW.version IS DISTINCT FROM OLD.version)
    EXECUTE FUNCTION funnelsync_notify_change();
"#,
    // 3: as SQLite's twelfth migration, the indexes no query uses go.
    r#"
DROP INDEX IF EXISTS deals_owner;
DROP INDEX IF EXISTS deals_stage;
"#,
];

/// The tables of a store, in an order in which each one's references come before it: the order
/// `store copy` copies them in. Each with the columns it is copied by, its key first.
pub const TABLES: &[(&str, &str)] = &[
    ("deals", "id, company, contact, email, phone, stage, amount, currency, owner, next_step, last_contact, expected_close, extra, created_at, updated_at, stage_entered_at, archived_at, stage_since, created_on, changed_version"),
    ("stage_history", "id, deal_id, from_stage, to_stage, at, source, start_known"),
    ("sync_runs", "id, source, file, started_at, finished_at, status, n_created, n_updated, n_archived, n_deleted, n_unchanged, n_errors, n_warnings, message, site"),
    ("changes", "id, run_id, deal_id, kind, field, old_value, new_value"),
    ("conflicts", "id, deal_id, field, base_value, sheet_value, store_value, winner, policy, source, file, at"),
    ("deal_tombstones", "deal_id, version"),
    ("mirror_files", "site, file, source, sheet, content_hash, header_row, headers, synced_at, config_hash, store_version, known_error_rows, checked_at, write_back, write_back_message, synced_version, shown_version"),
    ("mirror_rows", "site, file, deal_id, row_number, row_hash, fields, extras, raw_hash"),
    ("row_errors", "id, source, file, sheet, row_number, column_name, value, severity, message, run_id, seen_at, site"),
    ("file_status", "site, file, source, state, attempts, next_retry_at, last_error, updated_at"),
    ("outbox", "id, recipient, kind, subject, text_body, html_body, created_at, status, attempts, next_attempt_at, give_up_at, sent_at, last_error, attachment_name, attachment"),
    ("reminders", "id, message_id, deal_id, stall_key, recipient, kind, day, at"),
    ("remind_runs", "id, due_at, ran_at, n_messages"),
    ("report_snapshots", "id, at, stages, due_at"),
    ("alerts", "id, subject, key, at"),
    ("job_runs", "job, due_at, ran_at"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trigger_notifies_the_channel_the_daemons_listen_on() {
        let notifying: Vec<&&str> = POSTGRES_MIGRATIONS
            .iter()
            .filter(|migration| migration.contains("pg_notify("))
            .collect();
        assert_eq!(notifying.len(), 1);
        assert!(notifying[0].contains(&format!(
            "pg_notify('{}', NEW.version::text)",
            super::super::CHANGES_CHANNEL
        )));
    }
}
