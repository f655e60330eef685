//! The `sotu-delta` binary: runs the command line and exits with its status (0; 1: the
//! operation failed; 2: bad usage).

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(sotu_delta::cli::main(std::env::args_os()))
}
