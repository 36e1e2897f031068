//! The `tollgate` command line: run the proxy, check config, manage keys
//! and customers, show usage. One module per command under `cli/`.

use std::process::ExitCode;

use clap::Parser;

mod cli;

/// mimalloc: fewer cycles per request than glibc's malloc under Pingora's
/// many small allocations (measured in benches/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tollgate::logging::init();
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
