use clap::Parser;

fn main() {
    wick::device::init_threads();
    let cli = wick::cli::Cli::parse();
    match wick::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
