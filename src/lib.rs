//! funnelsync keeps a sales team's pipeline spreadsheets (.xlsx, .csv, and .xls/.ods read-only) in
//! sync with a CRM store (SQLite, or PostgreSQL shared by several daemons). The library holds every stage of the flow, one module each;
//! the binary (`src/main.rs`) only parses the command line and dispatches. See ARCHITECTURE.md.

pub(crate) mod alerts;
pub mod cli;
pub(crate) mod clock;
pub mod config;
pub mod daemon;
pub mod deal;
pub(crate) mod edit;
pub(crate) mod funnel;
pub(crate) mod history;
pub(crate) mod http;
pub(crate) mod mail;
pub mod mapping;
pub(crate) mod remind;
pub(crate) mod report;
pub mod store;
pub mod sync;
pub(crate) mod systemd;
pub(crate) mod text;
pub mod watch;
pub mod workbook;
pub mod writeback;
