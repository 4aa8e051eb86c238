//! Shared pieces of the benchmark peer programs: the `--pause-ms` list and the output line.
//!
//! Each binary prints one line per sample to stdout, `handover <pause_ms> <elapsed_ms>`, with
//! the elapsed time in milliseconds to 3 decimals, and flushes it at once.

use std::io::Write;
use std::time::Duration;

/// Parses a comma-separated list of pauses in milliseconds (`"0,100,500"`); at least one.
///
/// # Errors
///
/// When an item is not a whole number of milliseconds, or the list is empty.
pub fn parse_pauses(text: &str) -> Result<Vec<u64>, String> {
    let pauses = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u64>()
                .map_err(|e| format!("pause {s:?} is not a number of milliseconds: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if pauses.is_empty() {
        return Err("the pause list is empty".to_owned());
    }
    Ok(pauses)
}

/// The pause of sample `i`: the list is cycled through.
pub fn pause_for(pauses: &[u64], i: usize) -> u64 {
    pauses[i % pauses.len()]
}

/// Prints `handover <pause_ms> <elapsed_ms>` to stdout and flushes it.
///
/// # Errors
///
/// When stdout cannot be written.
pub fn report(pause_ms: u64, elapsed: Duration) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "handover {pause_ms} {:.3}",
        elapsed.as_secs_f64() * 1000.0
    )?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_parse_and_cycle() {
        let p = parse_pauses("0, 100,500").expect("valid list");
        assert_eq!(p, vec![0, 100, 500]);
        assert_eq!(pause_for(&p, 4), 100);
        assert!(parse_pauses("").is_err());
        assert!(parse_pauses("1,x").is_err());
        assert!(parse_pauses("-1").is_err());
    }
}
