//! `rope-attn`: inspect a model's RoPE schedule and its context extension.
//!
//! Each subcommand is one module with a `HELP` text and a `run(&[String]) -> Result<(), String>`;
//! [`COMMANDS`] is the dispatch table, so a new subcommand is one module plus one line there.
//! Every error goes to stderr and exits with code 2.

mod args;
mod bench;
mod decay;
mod freqs;
mod load;
#[cfg(feature = "plot")]
mod plot;

use std::process::ExitCode;

/// A subcommand: name, one-line summary, help text, entry point.
struct Command {
    name: &'static str,
    summary: &'static str,
    help: &'static str,
    run: fn(&[String]) -> Result<(), String>,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "freqs",
        summary: "the schedule of a config.json: inv_freq, wavelengths, ratio to plain RoPE, decay",
        help: freqs::HELP,
        run: freqs::run,
    },
    Command {
        name: "decay",
        summary: "RoPE's long-range decay table, one column per config",
        help: decay::HELP,
        run: decay::run,
    },
    Command {
        name: "bench",
        summary: "time the kernels against their baselines (GPU); the CPU reference without one",
        help: bench::HELP,
        run: bench::run,
    },
    #[cfg(feature = "plot")]
    Command {
        name: "plot",
        summary: "SVG + PNG charts: decay curves, position-only score heatmaps (RoPE / ALiBi)",
        help: plot::HELP,
        run: plot::run,
    },
];

fn usage() -> String {
    let mut s = String::from(
        "rope-attn — inspect a model's RoPE schedule and context extension\n\n\
         USAGE:\n    rope-attn <COMMAND> [ARGS...]\n    rope-attn <COMMAND> --help\n\nCOMMANDS:\n",
    );
    for c in COMMANDS {
        s.push_str(&format!("    {:<8}{}\n", c.name, c.summary));
    }
    s.push_str("    help    this text, or `rope-attn help COMMAND`\n");
    if !cfg!(feature = "plot") {
        s.push_str("\n(built without the `plot` feature: no `plot` command)\n");
    }
    s.push_str("\nCONFIG is a Hugging Face config.json. Errors go to stderr with exit code 2.\n");
    s
}

fn find(name: &str) -> Result<&'static Command, String> {
    COMMANDS.iter().find(|c| c.name == name).ok_or_else(|| format!("unknown command `{name}` (see `rope-attn --help`)"))
}

fn dispatch(argv: &[String]) -> Result<(), String> {
    match argv.first().map(String::as_str) {
        None => Err(format!("no command given\n\n{}", usage())),
        Some("-h" | "--help") => {
            print!("{}", usage());
            Ok(())
        }
        Some("help") => match argv.get(1) {
            None => {
                print!("{}", usage());
                Ok(())
            }
            Some(name) => {
                print!("{}", find(name)?.help);
                Ok(())
            }
        },
        Some(name) => (find(name)?.run)(&argv[1..]),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    match dispatch(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("rope-attn: error: {msg}");
            ExitCode::from(2)
        }
    }
}
