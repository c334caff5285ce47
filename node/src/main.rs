use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tiersync::cli::Cli::parse();
    match tiersync::cli::main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", tiersync::cli::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
