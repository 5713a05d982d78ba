//! funnelsync keeps a sales team's pipeline spreadsheets (.xlsx, .csv, and .xls/.ods read-only) in
//! sync with a CRM store (SQLite, or PostgreSQL shared by several daemons). The library holds every stage of the flow, one module each;
//! the binary (`src/main.rs`) only parses the command line and dispatches. See ARCHITECTURE.md.
//!
//! Only `cli` is public: it is what the binary calls. Every other module is the crate's own, so
//! the compiler reports what nothing uses; [`internals`] is the little that the benchmark and the
//! scenario tests reach for inside.

pub(crate) mod alerts;
pub mod cli;
pub(crate) mod clock;
pub(crate) mod config;
pub(crate) mod daemon;
pub(crate) mod deal;
pub(crate) mod edit;
pub(crate) mod funnel;
pub(crate) mod history;
pub(crate) mod http;
pub(crate) mod mail;
pub(crate) mod mapping;
pub(crate) mod remind;
pub(crate) mod report;
pub(crate) mod store;
pub(crate) mod sync;
pub(crate) mod systemd;
pub(crate) mod text;
pub(crate) mod watch;
pub(crate) mod workbook;
pub(crate) mod writeback;

/// What `examples/bench.rs` times phase by phase (reading, mapping, the store's bulk writes, the
/// write-back, a whole sync) and what `tests/it` needs of the library itself, under the paths of
/// the modules they come from. Not an API: hidden from the documentation, it changes whenever the
/// benchmark or the tests do.
#[doc(hidden)]
pub mod internals {
    pub mod config {
        pub use crate::config::{Config, DEFAULT_LISTEN};
    }
    pub mod deal {
        pub use crate::deal::{encode_row, ExtraMap, Field, FieldMap, FieldValue, RowJson};
    }
    pub mod mapping {
        pub use crate::mapping::{locate_header, map_rows};
    }
    pub mod store {
        pub use crate::store::{
            ChangeKind, ChangeRecord, CrmStore, DealFilter, NewDeal, Store, SyncRun,
        };
        pub mod mirror {
            pub use crate::store::mirror::{
                load_all_rows, save_head, upsert_row_refs, MirrorHead, MirrorRow, MirrorRowRef,
            };
        }
    }
    pub mod sync {
        pub use crate::sync::{file_key, sync_file, FileReport, WriteBack};
    }
    pub mod watch {
        pub use crate::watch::{fingerprint, source_files};
    }
    pub mod workbook {
        pub use crate::workbook::{count_guarded_cells, open_file, read_sheet, SheetStream};
        pub mod xml_guard {
            pub use crate::workbook::xml_guard::{check_part, Bounds};
        }
    }
    pub mod writeback {
        pub use crate::writeback::{plan, write, RowOutcome};
    }
}
