//! The module layers of ARCHITECTURE.md, checked against the source: a module that imports one on
//! its own line or above (a cycle in the making) fails here, as does a module the layers leave out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers as ARCHITECTURE.md's "Layers" block lists them, top first: each line's module names
/// (before the description).
fn layers() -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let section = text
        .split("## Layers")
        .nth(1)
        .expect("ARCHITECTURE.md has a Layers section");
    let block = section
        .split("```text")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the Layers section has a text block");
    block
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let names = line.split("   ").next().unwrap_or("");
            names
                .split(',')
                .map(|name| name.trim().to_string())
                .filter(|name| !name.is_empty())
                .collect()
        })
        .collect()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The top-level modules a piece of source names as `crate::module`, in a path or a `use`
/// group, comments left out.
fn modules_named(code: &str) -> BTreeSet<String> {
    let code: String = code
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut named = BTreeSet::new();
    for (position, _) in code.match_indices("crate::") {
        let rest = &code[position + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or("");
            named.extend(
                group
                    .split(',')
                    .filter_map(|path| path.trim().split("::").next())
                    .map(|name| name.trim().to_string())
                    .filter(|name| !name.is_empty()),
            );
        } else {
            let name: String = rest
                .chars()
                .take_while(|character| character.is_ascii_alphanumeric() || *character == '_')
                .collect();
            named.insert(name);
        }
    }
    named
}

/// Every `.rs` file below `folder`.
fn rust_files(folder: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(folder).expect("list src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
}

/// The top-level modules each module's files name as `crate::module`, comments left out.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("below src");
        let first = relative
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let code = std::fs::read_to_string(&file).expect("read source");
        let used = imports.entry(module.clone()).or_default();
        used.extend(modules_named(&code));
        used.remove(&module);
    }
    imports
}

#[test]
fn every_module_imports_only_modules_in_lower_layers() {
    let layers = layers();
    let mut layer_of: BTreeMap<String, usize> = BTreeMap::new();
    for (depth, line) in layers.iter().enumerate() {
        for module in line {
            assert!(
                layer_of.insert(module.clone(), depth).is_none(),
                "{module} is listed twice in ARCHITECTURE.md's layers"
            );
        }
    }
    let imports = imports();
    let mut violations = Vec::new();
    for (module, used) in &imports {
        let Some(&depth) = layer_of.get(module) else {
            violations.push(format!("{module} is not in ARCHITECTURE.md's layers"));
            continue;
        };
        for other in used {
            match layer_of.get(other) {
                None => violations.push(format!(
                    "{module} uses {other}, which is not in ARCHITECTURE.md's layers"
                )),
                // Layers are listed top first: a lower layer has a larger depth.
                Some(&other_depth) if other_depth <= depth => violations.push(format!(
                    "{module} (line {}) uses {other} (line {}): a module may use only those below it",
                    depth + 1,
                    other_depth + 1
                )),
                Some(_) => {}
            }
        }
    }
    for module in layer_of.keys() {
        if !imports.contains_key(module) {
            violations.push(format!(
                "ARCHITECTURE.md's layers list {module}, which is not a module in src/"
            ));
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// The `super::` paths in `code` (a file at module depth `file_depth`, `src/http/api.rs` being 2)
/// that climb out of its top-level module, where the layer check, which reads `crate::` paths,
/// would not see them. An inline `mod name {` opened above a path lets it climb one more.
fn paths_climbing_out(code: &str, file_depth: usize) -> Vec<String> {
    let mut found = Vec::new();
    let mut n_inline_modules = 0;
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let trimmed = line.trim_start();
        if (trimmed.starts_with("mod ") || trimmed.starts_with("pub mod "))
            && trimmed.ends_with('{')
        {
            n_inline_modules += 1;
        }
        for (position, _) in line.match_indices("super::") {
            // Count each chain once, from its first `super::`.
            if line[..position].ends_with("super::") {
                continue;
            }
            let n_supers = line[position..]
                .as_bytes()
                .chunks(7)
                .take_while(|chunk| *chunk == b"super::")
                .count();
            if n_supers + 1 > file_depth + n_inline_modules {
                found.push(line.trim().to_string());
            }
        }
    }
    found
}

#[test]
fn no_path_climbs_out_of_its_top_level_module_with_super() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut violations = Vec::new();
    for path in files {
        let relative = path.strip_prefix(root().join("src")).expect("under src");
        let n_components = relative.components().count();
        let file_depth = if relative.ends_with("mod.rs") {
            n_components - 1
        } else if relative == Path::new("lib.rs") || relative == Path::new("main.rs") {
            // The crate root.
            0
        } else {
            n_components
        };
        let code = std::fs::read_to_string(&path).expect("read source");
        for line in paths_climbing_out(&code, file_depth) {
            violations.push(format!("{}: {line}", relative.display()));
        }
    }
    assert!(
        violations.is_empty(),
        "use crate:: paths to reach another module:\n{}",
        violations.join("\n")
    );
    // The check sees what it must: from src/sync/file.rs (depth 2) one `super::` stays in `sync`,
    // two reach the crate root.
    assert!(paths_climbing_out("use super::diff;", 2).is_empty());
    assert_eq!(paths_climbing_out("use super::super::store;", 2).len(), 1);
    assert!(paths_climbing_out("mod tests {\n use super::super::diff;", 2).is_empty());
}

#[test]
fn the_check_sees_an_import_in_every_form() {
    // The check above is only as good as its reading of the source.
    let code = "//! Uses crate::cli in a comment only.\n\
                use crate::deal::{Deal, Field};\n\
                use crate::{config::Config, store};\n\
                fn f() { crate::watch::open_by(path); } // crate::daemon\n\
                /// See [`crate::report`].\n";
    let expected: BTreeSet<String> = ["config", "deal", "store", "watch"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(modules_named(code), expected);
}

#[test]
fn a_module_with_submodules_lives_in_its_folder_as_mod_rs() {
    // One module-file style throughout: `workbook/mod.rs`, never `workbook.rs` beside `workbook/`.
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let beside_their_folder: Vec<String> = files
        .iter()
        .filter(|file| file.with_extension("").is_dir())
        .map(|file| file.display().to_string())
        .collect();
    assert!(
        beside_their_folder.is_empty(),
        "move these into their folder as mod.rs: {beside_their_folder:?}"
    );
}

/// The SQL statements (string literals that start with a statement keyword) of the `.rs` files
/// below `folder` (or of the one file), with the file each is in.
fn sql_statements(path: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    if path.is_dir() {
        rust_files(path, &mut files);
    } else {
        files.push(path.to_path_buf());
    }
    let mut statements = Vec::new();
    for file in files {
        let code = std::fs::read_to_string(&file).expect("read source");
        for literal in code.split('"').skip(1).step_by(2) {
            let upper = literal.trim_start().to_ascii_uppercase();
            if ["SELECT ", "INSERT ", "UPDATE ", "DELETE ", "WITH "]
                .iter()
                .any(|keyword| upper.starts_with(keyword))
            {
                statements.push((file.display().to_string(), upper));
            }
        }
    }
    statements
}

/// The CRM tables: what a shared PostgreSQL store would hold instead of this SQLite file.
const CRM_TABLES: [&str; 5] = [
    "DEALS",
    "STAGE_HISTORY",
    "SYNC_RUNS",
    "CHANGES",
    "CONFLICTS",
];

fn names_a_table(statement: &str, tables: &[&str]) -> bool {
    statement
        .split(|character: char| !character.is_ascii_alphanumeric() && character != '_')
        .any(|word| tables.contains(&word))
}

#[test]
fn the_sync_reaches_crm_data_only_through_crm_store() {
    // ARCHITECTURE.md: the sync code touches CRM data only through `CrmStore`; the mirror's own
    // tables are local state.
    let offending: Vec<(String, String)> = sql_statements(&root().join("src/sync"))
        .into_iter()
        .filter(|(_, statement)| names_a_table(statement, &CRM_TABLES))
        .collect();
    assert!(
        offending.is_empty(),
        "SQL on CRM tables in sync: {offending:?}"
    );
}

#[test]
fn the_command_line_and_the_api_change_the_store_only_through_edit() {
    // ARCHITECTURE.md: nothing in `http` or `cli` writes to the store but through `edit` (and
    // the library functions it calls).
    let mut offending = sql_statements(&root().join("src/http"));
    offending.extend(sql_statements(&root().join("src/cli.rs")));
    offending.retain(|(_, statement)| {
        ["INSERT ", "UPDATE ", "DELETE "]
            .iter()
            .any(|keyword| statement.starts_with(keyword))
    });
    assert!(
        offending.is_empty(),
        "SQL writes in cli or http: {offending:?}"
    );
}

#[test]
fn the_source_checks_see_sql_in_string_literals() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("probe.rs");
    std::fs::write(
        &file,
        "fn f() { c.execute(\"UPDATE sync_runs SET message = ?1\", []); let x = \"deals\"; }",
    )
    .expect("write");
    let statements = sql_statements(&file);
    assert_eq!(statements.len(), 1, "{statements:?}");
    assert!(names_a_table(&statements[0].1, &CRM_TABLES));
    assert!(!names_a_table("SELECT * FROM MIRROR_ROWS", &CRM_TABLES));
}
