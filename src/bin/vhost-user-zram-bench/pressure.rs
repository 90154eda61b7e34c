// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--compare-pressure`: vhost-user-zram with `--reclaim-on-pressure` against the same daemon
//! without it, on a host under no memory pressure. Watching costs a PSI trigger the kernel
//! never fires, and (in either daemon, when it runs in a memory cgroup) reading the cgroup's
//! limit every 200 ms; the IOPS of each phase must stay within 2 % (ratio on / off ≥ 0.98).
//! With `--rounds 3` the two alternate and each phase's median round is compared, so load from
//! other processes hits both alike.

use std::fmt::Write as _;

use crate::backends::BackendKind;
use crate::report::Report;

/// The ratio on / off each phase's IOPS is held to.
pub const GOAL: f64 = 0.98;

/// The comparison table, or nothing when the report lacks either daemon.
pub fn render(report: &Report) -> String {
    let find = |kind| report.backends.iter().find(|b| b.backend == kind);
    let (Some(off), Some(on)) = (
        find(BackendKind::VhostUserZram),
        find(BackendKind::VhostUserZramPressure),
    ) else {
        return String::new();
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n== --reclaim-on-pressure, no pressure, against without it =="
    );
    let _ = writeln!(
        out,
        "{:<18} {:>14} {:>14} {:>10} {:>10}",
        "phase", "off IOPS", "on IOPS", "ratio", ">= 0.98"
    );
    for phase in report.phases_run() {
        let (Some(a), Some(b)) = (off.phase(phase), on.phase(phase)) else {
            continue;
        };
        let (ratio, verdict) = ratio(a.iops, b.iops);
        let _ = writeln!(
            out,
            "{:<18} {:>14.0} {:>14.0} {ratio:>10} {verdict:>10}",
            phase.name(),
            a.iops,
            b.iops
        );
    }
    out
}

/// `on / off` as text and its verdict against [`GOAL`].
fn ratio(off: f64, on: f64) -> (String, &'static str) {
    if off > 0.0 {
        let ratio = on / off;
        (
            format!("{ratio:.3}x"),
            if ratio >= GOAL { "met" } else { "missed" },
        )
    } else {
        ("n/a".into(), "n/a")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_held_to_the_goal() {
        assert_eq!(ratio(100.0, 99.0), ("0.990x".to_owned(), "met"));
        assert_eq!(ratio(100.0, 97.0), ("0.970x".to_owned(), "missed"));
        assert_eq!(ratio(0.0, 97.0), ("n/a".to_owned(), "n/a"));
    }
}
