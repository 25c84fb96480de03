use clap::Parser;

fn main() {
    wick::backend::device::init_threads();
    let cli = wick::cli::Cli::parse();
    // Run on a worker of rayon's pool, so the thread doing the serial work between parallel
    // kernels is one of the pool's threads: with as many threads as cores, idle workers never
    // compete with it for a core.
    match rayon::scope(|_| wick::cli::run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
