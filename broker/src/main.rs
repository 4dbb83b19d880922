//! `vgpu-sandbox`: the binary users install. As the broker it parses the command line,
//! binds the vhost-user socket, re-executes itself as the renderer-worker and the
//! device-frontend, wires their channels and supervises them. With `--internal-role` it is
//! one of those children.

mod check_host;
mod child;
mod cli;
mod logger;
mod metrics;
mod relay;
mod restart;
mod serve;
mod spawn;
mod spawner;
mod supervise;
mod virgl_probe;

use std::process::ExitCode;

use clap::Parser;
use protocol::bootstrap::ROLE_FLAG;

/// Mesa's shader cache writes under the user's cache directory; a jailed renderer cannot
/// open files, and a cache shared between VMs would be a channel between them.
const MESA_SHADER_CACHE_DISABLE: &str = "MESA_SHADER_CACHE_DISABLE";

fn main() -> ExitCode {
    // First thing, while this process has one thread (no other can read the environment
    // concurrently); the children inherit it.
    std::env::set_var(MESA_SHADER_CACHE_DISABLE, "true");
    if std::env::args_os().nth(1).is_some_and(|a| a == ROLE_FLAG) {
        return child::main();
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line, as a VMM manager's log wants it; --help has the rest.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "vgpu-sandbox: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("vgpu-sandbox: error: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: cli::Cli) -> Result<ExitCode, String> {
    if cli.serve.print_capabilities {
        println!("{}", cli::capabilities_json());
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(cli::Sub::ProbeVirgl) = cli.command {
        return Ok(match cli::probe_virgl() {
            Ok(capsets) => {
                println!("capsets {capsets}");
                ExitCode::SUCCESS
            }
            Err(why) => {
                println!("{why}");
                ExitCode::from(1)
            }
        });
    }
    if let Some(cli::Sub::CheckHost) = cli.command {
        return Ok(check_host::run(&cli.serve));
    }
    if let Some(cli::Sub::GenAssets { dir }) = &cli.command {
        cli::gen_assets(dir)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(cli::Sub::Demo(args)) = cli.command {
        logger::init(
            "broker",
            cli.serve.name.as_deref().unwrap_or("demo"),
            cli.serve.log_level,
        );
        let bin = std::env::current_exe().map_err(|e| format!("locating this binary: {e}"))?;
        let opts = vgpu_tests::DemoOptions {
            frames: args.frames,
            width: args.output.width,
            height: args.output.height,
        };
        let mut out = std::io::stdout();
        return vgpu_tests::run_demo(&bin, &opts, &mut out)
            .map(|_| ExitCode::SUCCESS)
            .map_err(|e| format!("demo failed: {e}"));
    }
    serve::serve(cli.serve).map(|code| ExitCode::from(code as u8))
}
