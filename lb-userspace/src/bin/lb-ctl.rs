//! lb-ctl: the operator CLI. See `lb-ctl --help`.
//!
//! Exit status: 0 on success, 2 when a registry is invalid, 1 for any other failure.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_userspace::{
    config::{self, ConfigError},
    logging::error_chain,
};

#[derive(Parser)]
#[command(version, about = "lb operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Registry files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a registry file without applying it; lists every problem with `file:line:column`.
    Validate {
        /// Registry file (YAML).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Config(ConfigCommand::Validate { file }) => match config::load_file(&file) {
            Ok(reg) => {
                println!(
                    "{}: valid ({} http, {} tcp services)",
                    file.display(),
                    reg.http.len(),
                    reg.tcp.len()
                );
                ExitCode::SUCCESS
            }
            Err(e @ ConfigError::Invalid(_)) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("{}", error_chain(&e));
                ExitCode::FAILURE
            }
        },
    }
}
