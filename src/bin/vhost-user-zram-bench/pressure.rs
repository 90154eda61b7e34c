// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--compare-pressure`: vhost-user-zram with `--reclaim-on-pressure` against the same daemon
//! without it, on a host under no memory pressure. Watching costs a PSI trigger the kernel
//! never fires, and (in either daemon, when it runs in a memory cgroup) reading the cgroup's
//! limit every 200 ms; the IOPS of each phase must stay within 2 % (ratio on / off ≥ 0.98).
//! With `--rounds N` the two alternate (which goes first changes every round) and the ratio is
//! the median of the rounds' own ratios, each on / off of one round: load from other processes
//! and the machine warming up hit both of a pair alike, where the ratio of the two medians
//! would compare rounds run at different times.

use std::fmt::Write as _;

use crate::backends::BackendKind;
use crate::report::{BackendReport, Report};
use crate::workload::Phase;

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
        let (ratio, verdict) = match paired_ratio(off, on, phase) {
            Some(paired) => ratio(1.0, paired),
            None => ratio(a.iops, b.iops),
        };
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

/// The median over rounds of each round's `on / off` IOPS of `phase`; `None` with fewer than
/// two rounds of both.
fn paired_ratio(off: &BackendReport, on: &BackendReport, phase: Phase) -> Option<f64> {
    let rounds = |backend: &BackendReport| {
        backend
            .iops_by_round
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, iops)| iops.clone())
    };
    let (off, on) = (rounds(off)?, rounds(on)?);
    if off.len() < 2 || off.len() != on.len() {
        return None;
    }
    let mut ratios: Vec<f64> = off
        .iter()
        .zip(&on)
        .filter(|(off, _)| **off > 0.0)
        .map(|(off, on)| on / off)
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    Some(ratios[ratios.len() / 2])
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

    #[test]
    fn rounds_are_compared_pair_by_pair() {
        let backend = |kind, iops: Vec<f64>| {
            let mut report = BackendReport::new(kind, None);
            report.iops_by_round.push((Phase::RandRead, iops));
            report
        };
        // The machine warms up: the medians of the two (170 against 160) differ by 6 %, but
        // each round's pair is within 1 %.
        let off = backend(BackendKind::VhostUserZram, vec![150.0, 160.0, 170.0, 190.0]);
        let on = backend(
            BackendKind::VhostUserZramPressure,
            vec![149.0, 160.0, 170.5, 189.0],
        );
        let paired = paired_ratio(&off, &on, Phase::RandRead).unwrap();
        assert!((0.99..=1.01).contains(&paired), "{paired}");
        let one = backend(BackendKind::VhostUserZram, vec![150.0]);
        assert_eq!(paired_ratio(&one, &one, Phase::RandRead), None);
    }
}
