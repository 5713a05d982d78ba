//! The one integration test binary: user scenarios against the real `funnelsync` binary, real
//! spreadsheets in temp folders and a real SQLite store.

mod architecture;
mod browser;
mod command_line;
mod config_cli;
mod crash;
mod daemon;
mod funnel;
mod hardening;
mod harness;
mod http;
mod in_place;
mod remind;
mod safety;
mod shared_store;
mod store_login;
mod streaming;
mod sync_cli;
mod two_way;
