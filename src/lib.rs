//! funnelsync keeps a sales team's pipeline spreadsheets (.xlsx, .csv, and .xls/.ods read-only) in
//! sync with a CRM store in SQLite. The library holds every stage of the flow, one module each;
//! the binary (`src/main.rs`) only parses the command line and dispatches. See ARCHITECTURE.md.

pub mod alerts;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod deal;
pub mod edit;
pub mod funnel;
pub mod history;
pub mod http;
pub mod mail;
pub mod mapping;
pub mod mirror;
pub mod remind;
pub mod report;
pub mod store;
pub mod sync;
pub mod text;
pub mod watch;
pub mod workbook;
pub mod writeback;
