//! `memctl session`: commands from standard input on one connection, with
//! `$last` and `$N` standing for the handles earlier commands made.

use std::io::BufRead;

use clap::Parser;
use memd_wire::*;

use crate::cli::Cli;
use crate::{run, Fail};
use memd_client::Client;

/// Replaces `$last` and `$N` with handles from earlier commands.
pub(crate) fn substitute(word: &str, handles: &[Option<Handle>]) -> Result<String, String> {
    // `cache:$3` (a pool's backing) names a handle after a prefix.
    if let Some((prefix, var)) = word.split_once(":$") {
        return Ok(format!(
            "{prefix}:{}",
            substitute(&format!("${var}"), handles)?
        ));
    }
    let Some(var) = word.strip_prefix('$') else {
        return Ok(word.to_string());
    };
    let h = if var == "last" {
        handles.iter().rev().flatten().next().copied()
    } else {
        let n: usize = var
            .parse()
            .map_err(|_| format!("unknown variable {word}"))?;
        n.checked_sub(1)
            .and_then(|i| handles.get(i).copied().flatten())
    };
    h.map(|h| h.to_string())
        .ok_or_else(|| format!("{word}: no handle there"))
}

pub(crate) fn session(c: &mut Client, as_json: bool) -> Result<(), Fail> {
    let mut last = Ok(());
    let mut handles: Vec<Option<Handle>> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| Fail::Usage(e.to_string()))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Result<Vec<String>, String> = line
            .split_whitespace()
            .map(|w| substitute(w, &handles))
            .collect();
        let words = match words {
            Ok(w) => w,
            Err(e) => {
                eprintln!("memctl: {line}: {e}");
                handles.push(None);
                last = Err(Fail::Usage(e));
                continue;
            }
        };
        let args = std::iter::once("memctl".to_string()).chain(words);
        let cmd = match Cli::try_parse_from(args) {
            Ok(cli) => cli.cmd,
            Err(e) => {
                eprintln!("{e}");
                handles.push(None);
                last = Err(Fail::Usage(format!("bad command {line:?}")));
                continue;
            }
        };
        match run(c, cmd, as_json) {
            Ok(h) => handles.push(h),
            Err(Fail::Server(e)) => {
                eprintln!("memctl: {line}: {e}");
                handles.push(None);
                last = Err(Fail::Server(e));
            }
            Err(Fail::Conn(e)) => return Err(Fail::Conn(e)),
            Err(e) => {
                handles.push(None);
                last = Err(e);
            }
        }
    }
    last
}
