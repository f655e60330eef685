//! The `sotu-delta` binary: parses arguments, runs, and maps failures to exit codes
//! (1: the operation failed, 2: bad usage).

use std::process::ExitCode;

fn main() -> ExitCode {
    match sotu_delta::cli::run(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(usage) = e.downcast_ref::<sotu_delta::cli::UsageError>() {
                eprintln!("sotu-delta: usage error: {usage}");
                return ExitCode::from(2);
            }
            eprintln!("sotu-delta: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
