//! `runner-warden completions SHELL` and `runner-warden man`: generated from the command-line
//! definitions themselves (clap_complete, clap_mangen), so they never drift from `--help`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

use super::{Cli, CompletionsArgs, ManArgs};

pub fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    clap_complete::generate(
        args.shell,
        &mut cmd,
        "runner-warden",
        &mut std::io::stdout(),
    );
    Ok(ExitCode::SUCCESS)
}

pub fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    let cmd = Cli::command();
    match &args.dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            std::io::stdout().write_all(&out)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            write_pages(cmd, dir)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// runner-warden.1 and one page per subcommand (runner-warden-run.1, …), as `man runner-warden-run`
/// expects.
fn write_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)? {
        eprintln!("wrote {}", entry?.path().display());
    }
    Ok(())
}
