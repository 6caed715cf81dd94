//! `diffit-server`: parse the command line, run the subcommand (`diffit_server::cli`).

use clap::Parser;

fn main() {
    if let Err(e) = diffit_server::cli::run(diffit_server::cli::Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
