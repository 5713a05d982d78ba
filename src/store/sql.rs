//! The SQL both engines understand, and the one place that runs it: [`Db`] is a connection (or a
//! transaction) to SQLite or to PostgreSQL, taking statements written with `?1`/`?` placeholders
//! and [`Value`] parameters, and handing rows back as [`Row`]s. The store's interfaces are written
//! once against it; where the engines differ (bulk inserts, ids, locks, notifications) they ask
//! [`Db::engine`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::marker::PhantomData;

use super::StoreError;

/// A value as it goes into and comes out of a statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(value: i64) -> Value {
        Value::Integer(value)
    }
}

impl From<u32> for Value {
    fn from(value: u32) -> Value {
        Value::Integer(i64::from(value))
    }
}

impl From<bool> for Value {
    fn from(value: bool) -> Value {
        Value::Integer(i64::from(value))
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Value {
        Value::Real(value)
    }
}

impl From<String> for Value {
    fn from(value: String) -> Value {
        Value::Text(value)
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Value {
        Value::Text(value.to_string())
    }
}

impl From<&String> for Value {
    fn from(value: &String) -> Value {
        Value::Text(value.clone())
    }
}

impl From<Vec<u8>> for Value {
    fn from(value: Vec<u8>) -> Value {
        Value::Blob(value)
    }
}

impl From<&[u8]> for Value {
    fn from(value: &[u8]) -> Value {
        Value::Blob(value.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Value {
        value.map_or(Value::Null, Into::into)
    }
}

/// `[Value::from(a), Value::from(b), …]`: the parameters of a statement.
macro_rules! sql_params {
    ($($value:expr),* $(,)?) => {
        [$($crate::store::Value::from($value)),*]
    };
}
pub(crate) use sql_params;

/// A parameter borrowed from the caller's data, for statements that bind many values (bulk
/// inserts): nothing is copied until the engine takes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Param<'a> {
    Null,
    Integer(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl Value {
    fn as_param(&self) -> Param<'_> {
        match self {
            Value::Null => Param::Null,
            Value::Integer(number) => Param::Integer(*number),
            Value::Real(number) => Param::Real(*number),
            Value::Text(text) => Param::Text(text),
            Value::Blob(bytes) => Param::Blob(bytes),
        }
    }
}

impl<'a> From<Option<&'a str>> for Param<'a> {
    fn from(text: Option<&'a str>) -> Param<'a> {
        text.map_or(Param::Null, Param::Text)
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Null => ValueRef::Null,
            Param::Integer(number) => ValueRef::Integer(number),
            Param::Real(number) => ValueRef::Real(number),
            Param::Text(text) => ValueRef::Text(text.as_bytes()),
            Param::Blob(bytes) => ValueRef::Blob(bytes),
        }))
    }
}

impl postgres::types::ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        // PostgreSQL says what type each parameter has; the value is sent as that type.
        match (*self, ty) {
            (Param::Null, _) => Ok(postgres::types::IsNull::Yes),
            (Param::Integer(number), &Type::INT8) => number.to_sql(ty, out),
            (Param::Integer(number), &Type::INT4) => i32::try_from(number)?.to_sql(ty, out),
            (Param::Integer(number), &Type::INT2) => i16::try_from(number)?.to_sql(ty, out),
            (Param::Integer(number), &Type::FLOAT8) => (number as f64).to_sql(ty, out),
            (Param::Integer(number), &Type::BOOL) => (number != 0).to_sql(ty, out),
            (Param::Integer(number), _) => number.to_string().to_sql(ty, out),
            (Param::Real(number), &Type::FLOAT4) => (number as f32).to_sql(ty, out),
            (Param::Real(number), &Type::FLOAT8) => number.to_sql(ty, out),
            (Param::Real(number), _) => number.to_string().to_sql(ty, out),
            (Param::Text(text), _) => text.to_sql(ty, out),
            (Param::Blob(bytes), _) => bytes.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Integer(number) => ValueRef::Integer(*number),
            Value::Real(number) => ValueRef::Real(*number),
            Value::Text(text) => ValueRef::Text(text.as_bytes()),
            Value::Blob(bytes) => ValueRef::Blob(bytes),
        }))
    }
}

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.as_param().to_sql(ty, out)
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// Reading a column as a Rust value.
pub trait FromValue: Sized {
    fn from_value(value: Value, column: usize) -> Result<Self, StoreError>;
}

fn wrong_type(column: usize, expected: &str, found: &Value) -> StoreError {
    StoreError::Corrupt(format!(
        "column {column}: expected {expected}, found {found:?}"
    ))
}

impl FromValue for Value {
    fn from_value(value: Value, _: usize) -> Result<Value, StoreError> {
        Ok(value)
    }
}

impl FromValue for i64 {
    fn from_value(value: Value, column: usize) -> Result<i64, StoreError> {
        match value {
            Value::Integer(number) => Ok(number),
            other => Err(wrong_type(column, "an integer", &other)),
        }
    }
}

impl FromValue for u32 {
    fn from_value(value: Value, column: usize) -> Result<u32, StoreError> {
        let number = i64::from_value(value, column)?;
        u32::try_from(number)
            .map_err(|_| StoreError::Corrupt(format!("column {column}: {number} is out of range")))
    }
}

impl FromValue for f64 {
    fn from_value(value: Value, column: usize) -> Result<f64, StoreError> {
        match value {
            Value::Real(number) => Ok(number),
            Value::Integer(number) => Ok(number as f64),
            other => Err(wrong_type(column, "a number", &other)),
        }
    }
}

impl FromValue for bool {
    fn from_value(value: Value, column: usize) -> Result<bool, StoreError> {
        Ok(i64::from_value(value, column)? != 0)
    }
}

impl FromValue for String {
    fn from_value(value: Value, column: usize) -> Result<String, StoreError> {
        match value {
            Value::Text(text) => Ok(text),
            other => Err(wrong_type(column, "text", &other)),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: Value, column: usize) -> Result<Vec<u8>, StoreError> {
        match value {
            Value::Blob(bytes) => Ok(bytes),
            Value::Text(text) => Ok(text.into_bytes()),
            other => Err(wrong_type(column, "bytes", &other)),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: Value, column: usize) -> Result<Option<T>, StoreError> {
        match value {
            Value::Null => Ok(None),
            value => T::from_value(value, column).map(Some),
        }
    }
}

/// One row of a result, from either engine.
pub struct Row<'r>(RowOf<'r>);

enum RowOf<'r> {
    Sqlite(&'r rusqlite::Row<'r>),
    Postgres(&'r postgres::Row),
}

impl Row<'_> {
    /// The value of a column (0-based).
    pub fn value(&self, column: usize) -> Result<Value, StoreError> {
        match &self.0 {
            RowOf::Sqlite(row) => Ok(match row.get::<_, rusqlite::types::Value>(column)? {
                rusqlite::types::Value::Null => Value::Null,
                rusqlite::types::Value::Integer(number) => Value::Integer(number),
                rusqlite::types::Value::Real(number) => Value::Real(number),
                rusqlite::types::Value::Text(text) => Value::Text(text),
                rusqlite::types::Value::Blob(bytes) => Value::Blob(bytes),
            }),
            RowOf::Postgres(row) => postgres_value(row, column),
        }
    }

    pub fn get<T: FromValue>(&self, column: usize) -> Result<T, StoreError> {
        T::from_value(self.value(column)?, column)
    }
}

fn postgres_value(row: &postgres::Row, column: usize) -> Result<Value, StoreError> {
    use postgres::types::Type;
    let Some(described) = row.columns().get(column) else {
        return Err(StoreError::Corrupt(format!("no column {column}")));
    };
    let value = match *described.type_() {
        Type::INT8 => row.try_get::<_, Option<i64>>(column)?.map(Value::Integer),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(column)?
            .map(|number| Value::Integer(i64::from(number))),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(column)?
            .map(|number| Value::Integer(i64::from(number))),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(column)?
            .map(|flag| Value::Integer(i64::from(flag))),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(column)?.map(Value::Real),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(column)?
            .map(|number| Value::Real(f64::from(number))),
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(column)?.map(Value::Blob),
        _ => row.try_get::<_, Option<String>>(column)?.map(Value::Text),
    };
    Ok(value.unwrap_or(Value::Null))
}

/// Which engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A PostgreSQL connection with the statements it prepared, by their text.
pub(crate) struct PgConnection {
    pub client: RefCell<postgres::Client>,
    statements: RefCell<HashMap<String, postgres::Statement>>,
}

/// How many prepared statements a PostgreSQL connection keeps; past it, the cache starts over
/// (statements built for many values at once come in many lengths).
const STATEMENT_CACHE: usize = 512;

impl PgConnection {
    pub fn new(client: postgres::Client) -> PgConnection {
        PgConnection {
            client: RefCell::new(client),
            statements: RefCell::new(HashMap::new()),
        }
    }

    fn statement(&self, sql: &str) -> Result<postgres::Statement, StoreError> {
        if let Some(statement) = self.statements.borrow().get(sql) {
            return Ok(statement.clone());
        }
        let statement = self
            .client
            .borrow_mut()
            .prepare(&numbered_placeholders(sql))?;
        let mut statements = self.statements.borrow_mut();
        if statements.len() >= STATEMENT_CACHE {
            statements.clear();
        }
        statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

/// `?1` and `?` placeholders as PostgreSQL's `$1`, outside quoted text.
pub(crate) fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut next = 1;
    let mut quoted = false;
    let mut characters = sql.chars().peekable();
    while let Some(character) = characters.next() {
        if character == '\'' {
            quoted = !quoted;
            out.push(character);
        } else if character == '?' && !quoted {
            let mut digits = String::new();
            while let Some(digit) = characters.peek().filter(|next| next.is_ascii_digit()) {
                digits.push(*digit);
                characters.next();
            }
            if digits.is_empty() {
                out.push_str(&format!("${next}"));
                next += 1;
            } else {
                out.push('$');
                out.push_str(&digits);
            }
        } else {
            out.push(character);
        }
    }
    out
}

#[derive(Clone, Copy)]
pub(crate) enum Link<'c> {
    Sqlite(&'c rusqlite::Connection),
    Postgres(&'c PgConnection),
}

thread_local! {
    /// How many [`BlockingScope`]s are open on this thread.
    static BLOCKING_SCOPES: Cell<usize> = const { Cell::new(0) };
}

/// Marks the thread it is made on, for as long as it lives, as one where store work may block:
/// a `spawn_blocking` closure or a thread of its own. A `spawn_blocking` thread looks like a
/// runtime's thread to [`tokio::runtime::Handle::try_current`], so without this mark the check in
/// [`assert_may_block`] could not tell it from an async worker.
#[must_use = "the thread may block on the store only while the scope lives"]
pub struct BlockingScope {
    /// Whether this scope counts: [`BlockingScope::unless_async`] on an async thread does not.
    counted: bool,
    /// The count is per thread, so the scope must end on the thread it began on.
    _not_send: PhantomData<*const ()>,
}

impl BlockingScope {
    /// Marks this thread as one that may block on the store.
    pub fn enter() -> BlockingScope {
        BLOCKING_SCOPES.with(|scopes| scopes.set(scopes.get() + 1));
        BlockingScope {
            counted: true,
            _not_send: PhantomData,
        }
    }

    /// Marks this thread as one that may block on the store unless it is an async thread now.
    /// For code that enters a runtime only to build something that lives in it (the mail
    /// transport): inside that runtime's context every thread looks async, and the store work
    /// that follows on this same thread is no more async than it was before.
    pub fn unless_async() -> BlockingScope {
        if on_async_thread() {
            BlockingScope {
                counted: false,
                _not_send: PhantomData,
            }
        } else {
            BlockingScope::enter()
        }
    }
}

impl Drop for BlockingScope {
    fn drop(&mut self) {
        if self.counted {
            BLOCKING_SCOPES.with(|scopes| scopes.set(scopes.get().saturating_sub(1)));
        }
    }
}

/// Whether this thread runs async tasks: it is in a tokio runtime's context and no
/// [`BlockingScope`] says it may block.
fn on_async_thread() -> bool {
    tokio::runtime::Handle::try_current().is_ok() && BLOCKING_SCOPES.with(Cell::get) == 0
}

/// Panics, in debug builds, when store work is about to block an async thread: a statement there
/// stalls every task of the runtime (the daemon's loop, the HTTP server) for as long as SQLite
/// waits for its lock or PostgreSQL answers. Every statement, connection and transaction goes
/// through here, so the test suite, which runs the debug binary, checks every path it takes.
#[track_caller]
pub(crate) fn assert_may_block() {
    if cfg!(debug_assertions) && on_async_thread() {
        panic!(
            "store work on an async thread of a tokio runtime: run it through http::with_store, \
             a daemon job (spawn_blocking) or the daemon's store thread, inside a \
             store::BlockingScope"
        );
    }
}

/// A connection to the store, or a transaction on it: every statement goes through here.
pub struct Db<'c> {
    link: Link<'c>,
    /// The site this process syncs files for (see `[store] site`).
    site: &'c str,
    in_transaction: bool,
    /// The change counter this transaction moved the store to, once it changed a deal.
    pub(crate) stamped: Cell<Option<i64>>,
}

impl<'c> Db<'c> {
    pub(crate) fn new(link: Link<'c>, site: &'c str, in_transaction: bool) -> Db<'c> {
        Db {
            link,
            site,
            in_transaction,
            stamped: Cell::new(None),
        }
    }

    /// How a bulk insert begins: on SQLite `INSERT OR FAIL`, on PostgreSQL a plain `INSERT`.
    ///
    /// SQLite backs a statement that writes several rows and may abort half way with a
    /// statement journal: before the statement first changes a page, the whole page is copied
    /// there, so that an abort can undo that statement alone. A failed write here fails the whole
    /// transaction, which is then rolled back, so nothing needs undoing statement by statement:
    /// with `OR FAIL` a NOT NULL or UNIQUE violation stops at the failing row without undoing the
    /// rows before it, and the deals of an import are inserted with no journal (a table with an
    /// immediate foreign key still needs one, for the key's check at the statement's end).
    pub fn bulk_insert(&self) -> &'static str {
        match self.link {
            Link::Sqlite(_) => "INSERT OR FAIL",
            Link::Postgres(_) => "INSERT",
        }
    }

    pub fn engine(&self) -> Engine {
        match self.link {
            Link::Sqlite(_) => Engine::Sqlite,
            Link::Postgres(_) => Engine::Postgres,
        }
    }

    /// The name this process's files go by in the mirror and the file states.
    pub fn site(&self) -> &str {
        self.site
    }

    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Runs one statement; returns how many rows it changed.
    pub fn execute(&self, sql: &str, parameters: &[Value]) -> Result<usize, StoreError> {
        self.execute_with(sql, parameters)
    }

    /// [`Db::execute`] with borrowed parameters, for bulk inserts.
    pub fn execute_params(&self, sql: &str, parameters: &[Param<'_>]) -> Result<usize, StoreError> {
        self.execute_with(sql, parameters)
    }

    fn execute_with<P>(&self, sql: &str, parameters: &[P]) -> Result<usize, StoreError>
    where
        P: rusqlite::ToSql + postgres::types::ToSql + Sync,
    {
        match self.link() {
            Link::Sqlite(connection) => Ok(connection
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(parameters.iter()))?),
            Link::Postgres(connection) => {
                let statement = connection.statement(sql)?;
                let parameters: Vec<&(dyn postgres::types::ToSql + Sync)> = parameters
                    .iter()
                    .map(|value| value as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                let changed = connection
                    .client
                    .borrow_mut()
                    .execute(&statement, &parameters)?;
                Ok(usize::try_from(changed).unwrap_or(usize::MAX))
            }
        }
    }

    /// Runs statements without parameters, such as a migration.
    pub fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        match self.link() {
            Link::Sqlite(connection) => Ok(connection.execute_batch(sql)?),
            Link::Postgres(connection) => Ok(connection.client.borrow_mut().batch_execute(sql)?),
        }
    }

    /// Runs a query and maps each row.
    pub fn query<T>(
        &self,
        sql: &str,
        parameters: &[Value],
        mut map: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        match self.link() {
            Link::Sqlite(connection) => {
                let mut statement = connection.prepare_cached(sql)?;
                let mut rows = statement.query(rusqlite::params_from_iter(parameters.iter()))?;
                while let Some(row) = rows.next()? {
                    out.push(map(&Row(RowOf::Sqlite(row)))?);
                }
            }
            Link::Postgres(connection) => {
                let statement = connection.statement(sql)?;
                let parameters: Vec<&(dyn postgres::types::ToSql + Sync)> = parameters
                    .iter()
                    .map(|value| value as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                let rows = connection
                    .client
                    .borrow_mut()
                    .query(&statement, &parameters)?;
                for row in &rows {
                    out.push(map(&Row(RowOf::Postgres(row)))?);
                }
            }
        }
        Ok(out)
    }

    /// The first row of a query, mapped, if there is one.
    pub fn query_row<T>(
        &self,
        sql: &str,
        parameters: &[Value],
        map: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        Ok(self.query(sql, parameters, map)?.into_iter().next())
    }

    /// The one value a query gives (a count, a maximum).
    pub fn query_value<T: FromValue>(
        &self,
        sql: &str,
        parameters: &[Value],
    ) -> Result<T, StoreError> {
        match self.query_row(sql, parameters, |row| row.get::<T>(0))? {
            Some(value) => Ok(value),
            None => T::from_value(Value::Null, 0),
        }
    }

    /// Inserts one row into a table whose key is `id` and returns that id.
    pub fn insert_returning_id(&self, sql: &str, parameters: &[Value]) -> Result<i64, StoreError> {
        match self.link() {
            Link::Sqlite(connection) => {
                self.execute(sql, parameters)?;
                Ok(connection.last_insert_rowid())
            }
            Link::Postgres(_) => self.query_value(&format!("{sql} RETURNING id"), parameters),
        }
    }

    /// The connection, for a statement: checked not to block an async thread.
    #[track_caller]
    pub(crate) fn link(&self) -> Link<'c> {
        assert_may_block();
        self.link
    }

    /// Runs `read`, a pass that reads each page once, with SQLite's page cache held to
    /// [`SCAN_CACHE_KIB`], then gives the cache its size back. Such a pass would otherwise leave
    /// the whole cache (2 MB) full of pages no one reads again: at 100,000 rows the largest part
    /// of a one-cell sync's heap after the mirror's index. PostgreSQL keeps its cache in the
    /// server.
    pub fn with_scan_cache<T>(
        &self,
        read: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Link::Sqlite(connection) = self.link() else {
            return read();
        };
        let previous: i64 = connection.pragma_query_value(None, "cache_size", |row| row.get(0))?;
        connection.pragma_update(None, "cache_size", -SCAN_CACHE_KIB)?;
        let read = read();
        connection.pragma_update(None, "cache_size", previous)?;
        read
    }
}

/// The page cache, in KiB, of a pass that reads each page once (see [`Db::with_scan_cache`]):
/// room for the interior pages of the B-trees it walks.
pub const SCAN_CACHE_KIB: i64 = 256;

/// `(?,?,…),(?,?,…)…`: `n_rows` groups of `n_columns` placeholders.
pub fn value_groups(n_rows: usize, n_columns: usize) -> String {
    let group = format!("({})", vec!["?"; n_columns].join(","));
    vec![group; n_rows].join(",")
}

/// `n_rows` groups of numbered placeholders for a multi-row insert, where a column is either
/// `Some(k)`, the k-th value shared by every row (`?k`, bound once: the shared values come first
/// among the parameters, from 1), or `None`, a value of each row's own (numbered on after the
/// shared ones, row by row). Binding a text copies it, so a value every row repeats (the file of
/// a mirror row, the time of an import) is bound once per statement instead of once per row.
pub fn value_groups_sharing(n_rows: usize, columns: &[Option<usize>]) -> String {
    use std::fmt::Write;
    let n_shared = columns.iter().flatten().copied().max().unwrap_or(0);
    let mut groups = String::with_capacity(n_rows * columns.len() * 7);
    let mut next = n_shared + 1;
    for row_idx in 0..n_rows {
        groups.push_str(if row_idx == 0 { "(" } else { ",(" });
        for (column_idx, column) in columns.iter().enumerate() {
            if column_idx > 0 {
                groups.push(',');
            }
            let number = match column {
                Some(shared) => *shared,
                None => {
                    next += 1;
                    next - 1
                }
            };
            let _ = write!(groups, "?{number}");
        }
        groups.push(')');
    }
    groups
}

/// The text of a bulk insert, made again only when what it depends on (`K`: the number of rows,
/// which values are shared) changed: the chunks of a batch are nearly all alike, and spelling
/// out a thousand numbered placeholders per chunk cost more than binding them.
pub struct StatementText<K> {
    made_for: Option<K>,
    text: String,
}

impl<K: PartialEq> Default for StatementText<K> {
    fn default() -> StatementText<K> {
        StatementText::new()
    }
}

impl<K: PartialEq> StatementText<K> {
    pub fn new() -> StatementText<K> {
        StatementText {
            made_for: None,
            text: String::new(),
        }
    }

    /// The text for `key`, made by `make` unless it was made for the same key last time.
    pub fn get(&mut self, key: K, make: impl FnOnce() -> String) -> &str {
        if self.made_for.as_ref() != Some(&key) {
            self.text = make();
            self.made_for = Some(key);
        }
        &self.text
    }
}

/// `?,?,…`: `n` placeholders, for `IN (…)`.
pub fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_values_are_numbered_first_and_each_row_numbers_its_own_on() {
        let cases: [(usize, &[Option<usize>], &str); 4] = [
            (2, &[None, None], "(?1,?2),(?3,?4)"),
            (
                2,
                &[Some(1), None, Some(2), None],
                "(?1,?3,?2,?4),(?1,?5,?2,?6)",
            ),
            (3, &[None, Some(1)], "(?2,?1),(?3,?1),(?4,?1)"),
            (1, &[Some(1)], "(?1)"),
        ];
        for (n_rows, columns, expected) in cases {
            assert_eq!(
                value_groups_sharing(n_rows, columns),
                expected,
                "{columns:?}"
            );
        }
    }

    #[test]
    fn placeholders_are_numbered_outside_quoted_text() {
        let cases = [
            ("SELECT ?1, ?2", "SELECT $1, $2"),
            ("x IN (?,?) AND y = ?", "x IN ($1,$2) AND y = $3"),
            ("LIKE '/%?' || ?1", "LIKE '/%?' || $1"),
            (
                "state = 'ignored' AND file = ?1",
                "state = 'ignored' AND file = $1",
            ),
        ];
        for (sql, expected) in cases {
            assert_eq!(numbered_placeholders(sql), expected, "{sql}");
        }
    }
}
