//! `umdevctl`: mdevctl's commands (`types`, `list`, `define`, `undefine`, `modify`,
//! `start`, `stop`, same options, same output) against umdevd's control API, plus what
//! mdevctl cannot say: a device's vfio-user socket with a ready QEMU argument (`socket`),
//! and which client holds which IOMMU group (`groups`). `completions` and `manpage` print
//! what packaging installs, generated from this command line.

mod cli;
mod output;
mod screenshot;

use std::io::Write;

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser};
use umdev_api::control::GroupEntry;
use umdev_api::{Client, Request, Response};

use cli::{Cli, Command};

fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("Unable to read file {:?}", path))?;
    serde_json::from_str(&text).with_context(|| format!("Invalid JSON in {:?}", path))
}

fn call(client: &Client, req: &Request) -> Result<Response> {
    match client.call(req)? {
        Response::Error { message, .. } => Err(anyhow!(message)),
        r => Ok(r),
    }
}

/// Prints a generated UUID (`define`/`start` without `-u`), as mdevctl does.
fn print_uuid(r: Response) -> Result<()> {
    if let Response::Uuid { uuid } = r {
        println!("{uuid}");
    }
    Ok(())
}

fn qemu_arg(path: &str) -> String {
    let v = serde_json::json!({
        "driver": "vfio-user-pci",
        "socket": {"type": "unix", "path": path},
    });
    // Keys in the order QEMU's documentation writes them.
    let obj = format!(
        "{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":{}}}}}",
        v["socket"]["path"]
    );
    format!("-device '{obj}'")
}

fn groups_text(groups: &[GroupEntry]) -> String {
    let mut s = String::new();
    for g in groups {
        let holder = match &g.owner {
            Some(h) => match (h.pid, h.uid) {
                (Some(pid), Some(uid)) => {
                    format!("held by pid {pid} uid {uid} (connection {})", h.connection)
                }
                _ => format!("held by connection {}", h.connection),
            },
            None => "free".to_owned(),
        };
        s.push_str(&format!("iommu_group {} {holder}\n", g.id));
        if let Some(p) = &g.peer_to_peer {
            s.push_str(&format!("  peer_to_peer_resource_uuid {p}\n"));
        }
        for d in &g.devices {
            s.push_str(&format!("  {d}\n"));
        }
    }
    s
}

/// A device named by its socket path, or by its UUID on the daemon at `--control`.
fn device_socket(client: &Client, name: &str) -> Result<String> {
    if std::path::Path::new(name).exists() {
        return Ok(name.to_owned());
    }
    match call(
        client,
        &Request::Socket {
            uuid: name.to_owned(),
        },
    ) {
        Ok(Response::Socket { path, .. }) => Ok(path),
        Ok(_) => bail!("unexpected answer"),
        Err(e) => Err(e.context(format!(
            "{name} is neither a socket nor a device the daemon knows"
        ))),
    }
}

fn run(cli: Cli) -> Result<()> {
    let client = Client::new(&cli.control);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "umdevctl", &mut out);
        }
        Command::Manpage => {
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
        }
        Command::Types { parent, dumpjson } => {
            let Response::Types { types } = call(&client, &Request::Types { parent })? else {
                bail!("unexpected answer");
            };
            if dumpjson {
                write!(out, "{}", output::types_json(&types))?;
            } else {
                write!(out, "{}", output::types_text(&types))?;
            }
        }
        Command::List {
            defined,
            dumpjson,
            verbose,
            uuid,
            parent,
        } => {
            let one = uuid.is_some();
            let req = Request::List {
                defined,
                uuid,
                parent,
            };
            let Response::Devices { devices } = call(&client, &req)? else {
                bail!("unexpected answer");
            };
            if dumpjson {
                write!(out, "{}", output::list_json(&devices, one))?;
            } else {
                write!(out, "{}", output::list_text(&devices, defined, verbose))?;
            }
        }
        Command::Define {
            uuid,
            auto,
            parent,
            mdev_type,
            jsonfile,
            force,
        } => {
            let json = jsonfile.as_deref().map(read_json).transpose()?;
            let req = Request::Define {
                uuid,
                parent,
                mdev_type,
                auto,
                json,
                force,
            };
            print_uuid(call(&client, &req)?)?;
        }
        Command::Undefine { uuid, parent, .. } => {
            call(&client, &Request::Undefine { uuid, parent })?;
        }
        Command::Modify {
            uuid,
            parent,
            mdev_type,
            addattr,
            delattr,
            index,
            value,
            auto,
            manual,
            live,
            defined: _,
            jsonfile,
            force: _,
        } => {
            if live {
                bail!("'live' changes need mdevctl callouts, which umdev does not have");
            }
            let json = jsonfile.as_deref().map(read_json).transpose()?;
            let req = Request::Modify(umdev_api::ModifyRequest {
                uuid,
                parent,
                mdev_type,
                addattr,
                delattr,
                index,
                value,
                auto,
                manual,
                json,
            });
            call(&client, &req)?;
        }
        Command::Start {
            uuid,
            parent,
            mdev_type,
            jsonfile,
            ..
        } => {
            let json = jsonfile.as_deref().map(read_json).transpose()?;
            let req = Request::Start {
                uuid,
                parent,
                mdev_type,
                json,
            };
            print_uuid(call(&client, &req)?)?;
        }
        Command::Stop { uuid, .. } => {
            call(&client, &Request::Stop { uuid })?;
        }
        Command::Socket { uuid } => {
            let Response::Socket { path, .. } = call(&client, &Request::Socket { uuid })? else {
                bail!("unexpected answer");
            };
            writeln!(out, "{path}")?;
            writeln!(out, "{}", qemu_arg(&path))?;
        }
        Command::Stats { uuid } => {
            let Response::Metrics { text } = call(&client, &Request::Stats)? else {
                anyhow::bail!("unexpected reply");
            };
            match uuid {
                None => write!(out, "{text}")?,
                Some(u) => {
                    let u = u.trim().to_ascii_lowercase();
                    let label = format!("uuid=\"{u}\"");
                    for line in text.lines().filter(|l| l.contains(&label)) {
                        writeln!(out, "{line}")?;
                    }
                }
            }
        }
        Command::Upgrade { group, all } => {
            if group.is_none() && !all {
                anyhow::bail!("say which workers: --group N or --all");
            }
            let Response::Upgraded { workers } = call(&client, &Request::Upgrade { group })? else {
                anyhow::bail!("unexpected reply");
            };
            let mut failed = 0;
            for w in &workers {
                match &w.error {
                    None => {
                        for (uuid, us) in &w.paused_us {
                            writeln!(out, "{uuid} upgraded, paused {us} us")?;
                        }
                    }
                    Some(e) => {
                        failed += 1;
                        for uuid in &w.devices {
                            writeln!(out, "{uuid} not upgraded: {e}")?;
                        }
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!(
                    "{failed} of {} workers not upgraded (they serve on)",
                    workers.len()
                );
            }
        }
        Command::Shutdown { remove_devices } => {
            call(&client, &Request::Shutdown { remove_devices })?;
        }
        Command::AddParent { name, driver, opts } => {
            let options =
                umdev_api::control::options_from_pairs(&opts).map_err(anyhow::Error::msg)?;
            let req = Request::AddParent {
                name,
                driver,
                options,
            };
            call(&client, &req)?;
        }
        Command::Drivers { dumpjson } => {
            let Response::Drivers { drivers } = call(&client, &Request::Drivers)? else {
                bail!("unexpected answer");
            };
            if dumpjson {
                writeln!(out, "{}", serde_json::to_string_pretty(&drivers)?)?;
            } else {
                write!(out, "{}", output::drivers_text(&drivers))?;
            }
        }
        Command::Access { uuid, owner, mode } => {
            call(&client, &Request::Access { uuid, owner, mode })?;
        }
        Command::Screenshot {
            uuid,
            out: file,
            watch,
        } => {
            screenshot::run(&client, &uuid, &file, watch)?;
        }
        Command::RemoveParent { name, force } => {
            call(&client, &Request::RemoveParent { name, force })?;
        }
        Command::Migrate {
            from,
            to,
            max_rounds,
        } => {
            let from = device_socket(&client, &from)?;
            let to = device_socket(&client, &to)?;
            let opts = umdev_client::migration::MigrateOptions {
                max_rounds,
                ..Default::default()
            };
            let report = umdev_client::migration::migrate_sockets(&from, &to, opts)
                .with_context(|| format!("migrating {from} to {to}"))?;
            writeln!(out, "{report}")?;
        }
        Command::Groups => {
            let Response::Groups { groups } = call(&client, &Request::Groups)? else {
                bail!("unexpected answer");
            };
            write!(out, "{}", groups_text(&groups))?;
        }
    }
    out.flush()?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_qemu_argument_is_ready_to_paste() {
        assert_eq!(
            qemu_arg("/run/umdev/sockets/u.sock"),
            r#"-device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/run/umdev/sockets/u.sock"}}'"#
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
