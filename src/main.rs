//! The `funnelsync` binary: parse the command line, set up logging, dispatch to the library.

use std::process::ExitCode;

use clap::Parser;
use funnelsync::cli::{self, Cli, Command, DealsCommand, StoreCommand, TokenCommand};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}

/// The error and its causes in one line, each cause said once: many errors already name their
/// cause in their own message ("cannot create …: File exists"), so a cause whose text the line
/// already ends with is not repeated.
fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// Output piped into `head` that stops reading is not an error worth a message.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io_error| io_error.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // A token is made before there is a config to put it in.
    if let Command::Token(TokenCommand::New { name, role, rep }) = &cli.command {
        return cli::token_new(name, role, rep.as_deref());
    }
    let config = match cli::load_config(&cli) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    let default_level = if matches!(cli.command, Command::Run | Command::Serve) {
        "info"
    } else {
        "warn"
    };
    init_logging(config.log_level.as_deref(), default_level);
    let now = cli.now.unwrap_or_else(chrono::Utc::now);
    match &cli.command {
        Command::CheckConfig => cli::check_config(&config),
        Command::Sync(args) => cli::sync(&config, args),
        Command::Deals(DealsCommand::List(args)) => cli::deals_list(&config, args, now),
        Command::Deals(DealsCommand::Set { id, assignments }) => {
            cli::deals_set(&config, *id, assignments)
        }
        Command::Deals(DealsCommand::Move { id, stage }) => cli::deals_move(&config, *id, stage),
        Command::Conflicts(args) => cli::conflicts(&config, args),
        Command::Remind(args) => cli::remind(&config, args, now),
        Command::Funnel(args) => cli::funnel(&config, args, now),
        Command::History(args) => cli::history(&config, args),
        Command::Undo(args) => cli::undo(&config, args),
        Command::Errors(args) => cli::errors(&config, args),
        Command::Status(args) => cli::status(&config, args),
        Command::Serve => cli::serve(config),
        Command::Token(TokenCommand::New { name, role, rep }) => {
            cli::token_new(name, role, rep.as_deref())
        }
        Command::Store(StoreCommand::Migrate) => cli::store_migrate(&config),
        Command::Store(StoreCommand::Copy { to }) => cli::store_copy(&config, to),
        Command::Run => cli::run(config),
    }
}

/// Logs go to stderr; `RUST_LOG` wins over the config's `log_level`. Under systemd (stderr is the
/// journal, as `JOURNAL_STREAM` says) lines carry no colours and no time stamps: the journal adds
/// its own.
fn init_logging(config_level: Option<&str>, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .ok()
        .or_else(|| {
            config_level.and_then(|level| tracing_subscriber::EnvFilter::try_new(level).ok())
        })
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default_level));
    let to_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if to_journal {
        builder
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}
