//! fwmark-trace's entry point: everything is in the library (`cli::main`).
fn main() -> std::process::ExitCode {
    fwmark_trace::main()
}
