// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Finding IAA work queues this process can use, and saying why there is none.
//!
//! The idxd driver lists devices and work queues under `/sys/bus/dsa/devices/`: `iaxN` for an
//! IAA device (`dsaN` for DSA), `wqN.M` for work queue M of device N, each with attribute
//! files (`type`, `mode`, `size`, `state`, `block_on_fault`, `name`), and makes a character
//! device `/dev/iax/wqN.M` for every enabled user-type WQ of an IAA device (Linux
//! `drivers/dma/idxd/sysfs.c` and `cdev.c`). A WQ is usable here when it belongs to an IAA
//! device, has type `user`, is `enabled`, has a non-zero size, is `dedicated` or `shared`
//! (a shared WQ also needs PASID support on its device), and its device node opens for
//! reading and writing.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::portal::{MappedPortal, Portal, WritePortal};

/// Where the idxd driver lists its devices.
pub const SYSFS_DEVICES: &str = "/sys/bus/dsa/devices";
/// Where the IAA work-queue device nodes live.
pub const DEV_IAX: &str = "/dev/iax";

/// The most bytes one descriptor of this crate moves: a compressed object of up to two pages
/// in, or two pages out.
pub const MIN_TRANSFER: u64 = 8192;

/// What a user with an IAA machine runs to make a work queue for this program.
pub const ACCEL_CONFIG_STEPS: &str = "accel-config config-engine iax1/engine1.0 --group-id=0 && \
     accel-config config-wq iax1/wq1.0 --group-id=0 --mode=shared --wq-size=128 \
     --threshold=128 --priority=10 --type=user --name=vhost-user-zram --block-on-fault=1 && \
     accel-config enable-device iax1 && accel-config enable-wq iax1/wq1.0";

/// How a WQ is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WqMode {
    /// One opener; MOVDIR64B; no acceptance feedback.
    Dedicated,
    /// Many openers; ENQCMD; "busy" feedback.
    Shared,
}

/// A usable IAA work queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkQueue {
    /// `wqN.M`.
    pub name: String,
    /// `iaxN`.
    pub device: String,
    /// `/dev/iax/wqN.M`.
    pub node: PathBuf,
    /// Dedicated or shared.
    pub mode: WqMode,
    /// Descriptors it holds.
    pub size: usize,
    /// Whether the device blocks on page faults (otherwise it reports them and the engine
    /// redoes the page in software).
    pub block_on_fault: bool,
}

/// Why a work queue cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// It belongs to a DSA device, not IAA.
    NotIaa,
    /// Its type is not `user` (kernel-owned queues serve iaa_crypto).
    NotUserType(String),
    /// It is not enabled.
    NotEnabled(String),
    /// Its size is 0.
    ZeroSize,
    /// Its mode is neither `dedicated` nor `shared`.
    UnknownMode(String),
    /// A shared WQ on a device without PASID (SVA) support.
    SharedWithoutPasid,
    /// Its largest transfer is smaller than one descriptor of this crate may need.
    TransferTooSmall(u64),
    /// An attribute could not be read.
    Unreadable {
        /// The attribute.
        attribute: &'static str,
        /// Why.
        reason: String,
    },
    /// The device node is missing or cannot be opened.
    CannotOpen {
        /// The node.
        node: PathBuf,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotIaa => write!(f, "it belongs to a DSA device, not an IAA device"),
            Rejection::NotUserType(t) => write!(f, "its type is '{t}', not 'user'"),
            Rejection::NotEnabled(s) => write!(f, "its state is '{s}', not 'enabled'"),
            Rejection::ZeroSize => write!(f, "its size is 0"),
            Rejection::UnknownMode(m) => {
                write!(f, "its mode '{m}' is neither dedicated nor shared")
            }
            Rejection::SharedWithoutPasid => {
                write!(f, "it is shared but its device has PASID (SVA) disabled")
            }
            Rejection::TransferTooSmall(size) => write!(
                f,
                "its max_transfer_size {size} is below the {MIN_TRANSFER} bytes a descriptor \
                 may move"
            ),
            Rejection::Unreadable { attribute, reason } => {
                write!(f, "its '{attribute}' cannot be read ({reason})")
            }
            Rejection::CannotOpen { node, reason } => {
                write!(f, "{} cannot be opened ({reason})", node.display())
            }
        }
    }
}

/// What discovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// The sysfs directory searched.
    pub sysfs: PathBuf,
    /// Whether it exists (the idxd driver is loaded).
    pub driver_present: bool,
    /// IAA devices seen (`iaxN`).
    pub devices: Vec<String>,
    /// Usable queues, largest first.
    pub usable: Vec<WorkQueue>,
    /// Queues seen but unusable, with why.
    pub rejected: Vec<(String, Rejection)>,
}

impl fmt::Display for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.usable.is_empty() {
            let names: Vec<&str> = self.usable.iter().map(|q| q.name.as_str()).collect();
            return write!(f, "usable IAA work queues: {}", names.join(", "));
        }
        write!(f, "no usable IAA work queue: ")?;
        if !self.driver_present {
            return write!(
                f,
                "{} does not exist (the idxd driver is not loaded, or this machine has no \
                 IAA, which needs a 4th-generation Xeon or later)",
                self.sysfs.display()
            );
        }
        if self.devices.is_empty() {
            return write!(f, "{} lists no iax device", self.sysfs.display());
        }
        let iaa_rejections: Vec<String> = self
            .rejected
            .iter()
            .filter(|(_, why)| *why != Rejection::NotIaa)
            .map(|(name, why)| format!("{name}: {why}"))
            .collect();
        if iaa_rejections.is_empty() {
            write!(
                f,
                "{} has no work queue configured",
                self.devices.join(", ")
            )
        } else {
            write!(f, "{}", iaa_rejections.join("; "))
        }
    }
}

fn attribute(dir: &Path, name: &'static str) -> Result<String, Rejection> {
    fs::read_to_string(dir.join(name))
        .map(|text| text.trim().to_owned())
        .map_err(|e| Rejection::Unreadable {
            attribute: name,
            reason: e.to_string(),
        })
}

/// `wqN.M` → `N`.
fn device_number(wq: &str) -> Option<&str> {
    wq.strip_prefix("wq")?.split('.').next()
}

fn examine(sysfs: &Path, dev: &Path, name: &str) -> Result<WorkQueue, Rejection> {
    let dir = sysfs.join(name);
    let number = device_number(name).unwrap_or_default();
    let device = format!("iax{number}");
    if !sysfs.join(&device).exists() {
        return Err(Rejection::NotIaa);
    }
    let wq_type = attribute(&dir, "type")?;
    if wq_type != "user" {
        return Err(Rejection::NotUserType(wq_type));
    }
    let state = attribute(&dir, "state")?;
    if state != "enabled" {
        return Err(Rejection::NotEnabled(state));
    }
    let size_text = attribute(&dir, "size")?;
    let size: usize = size_text.parse().map_err(|_| Rejection::Unreadable {
        attribute: "size",
        reason: format!("'{size_text}' is not a number"),
    })?;
    if size == 0 {
        return Err(Rejection::ZeroSize);
    }
    let mode = match attribute(&dir, "mode")?.as_str() {
        "dedicated" => WqMode::Dedicated,
        "shared" => WqMode::Shared,
        other => return Err(Rejection::UnknownMode(other.to_owned())),
    };
    if mode == WqMode::Shared {
        // Absent on old kernels: assume enabled and let open/submit tell.
        if let Ok(pasid) = attribute(&sysfs.join(&device), "pasid_enabled") {
            if pasid == "0" {
                return Err(Rejection::SharedWithoutPasid);
            }
        }
    }
    // Absent on old kernels: then the device's default (2 GiB) applies.
    if let Ok(text) = attribute(&dir, "max_transfer_size") {
        if let Ok(size) = text.parse::<u64>() {
            if size < MIN_TRANSFER {
                return Err(Rejection::TransferTooSmall(size));
            }
        }
    }
    let block_on_fault = attribute(&dir, "block_on_fault").is_ok_and(|b| b == "1");
    let node = dev.join(name);
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node)
        .map_err(|e| Rejection::CannotOpen {
            node: node.clone(),
            reason: e.to_string(),
        })?;
    Ok(WorkQueue {
        name: name.to_owned(),
        device,
        node,
        mode,
        size,
        block_on_fault,
    })
}

/// Looks for usable IAA work queues under `sysfs` (normally [`SYSFS_DEVICES`]) with device
/// nodes under `dev` (normally [`DEV_IAX`]).
pub fn discover_in(sysfs: &Path, dev: &Path) -> Discovery {
    let mut discovery = Discovery {
        sysfs: sysfs.to_owned(),
        driver_present: sysfs.is_dir(),
        devices: Vec::new(),
        usable: Vec::new(),
        rejected: Vec::new(),
    };
    let Ok(entries) = fs::read_dir(sysfs) else {
        return discovery;
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        if name.starts_with("iax") {
            discovery.devices.push(name);
        } else if name.starts_with("wq") {
            match examine(sysfs, dev, &name) {
                Ok(queue) => discovery.usable.push(queue),
                Err(why) => discovery.rejected.push((name, why)),
            }
        }
    }
    discovery
        .usable
        .sort_by_key(|queue| std::cmp::Reverse(queue.size));
    discovery
}

/// Looks for usable IAA work queues on this machine.
pub fn discover() -> Discovery {
    discover_in(Path::new(SYSFS_DEVICES), Path::new(DEV_IAX))
}

/// Opens `queue` for submission: its mapped portal when the kernel and CPU allow, else
/// `write()` on its device node.
pub fn open(queue: &WorkQueue) -> io::Result<Box<dyn Portal>> {
    use std::os::unix::fs::FileTypeExt;
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&queue.node)?;
    // Only the idxd character device may be mapped and written descriptors: a regular file
    // in its place would take the mapping and fault on the first submission.
    if !file.metadata()?.file_type().is_char_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a character device", queue.node.display()),
        ));
    }
    let label = queue.node.display().to_string();
    match MappedPortal::map(
        file,
        label.clone(),
        queue.mode == WqMode::Dedicated,
        queue.size,
    ) {
        Ok(portal) => Ok(Box::new(portal)),
        Err((file, why)) => {
            log::debug!("IAA: not mapping the portal of {label} ({why}); submitting with write()");
            Ok(Box::new(WritePortal::new(file, label, queue.size)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a fake sysfs tree: `(wq name, [(attribute, value)])`, plus `iax` devices.
    fn fake_tree(
        devices: &[&str],
        queues: &[(&str, &[(&str, &str)])],
        nodes: &[&str],
    ) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let sysfs = root.path().join("sys");
        let dev = root.path().join("dev");
        fs::create_dir_all(&sysfs).unwrap();
        fs::create_dir_all(&dev).unwrap();
        for device in devices {
            fs::create_dir_all(sysfs.join(device)).unwrap();
        }
        for (name, attributes) in queues {
            let dir = sysfs.join(name);
            fs::create_dir_all(&dir).unwrap();
            for (attribute, value) in *attributes {
                fs::write(dir.join(attribute), format!("{value}\n")).unwrap();
            }
        }
        for node in nodes {
            fs::write(dev.join(node), b"").unwrap();
        }
        root
    }

    fn run(root: &tempfile::TempDir) -> Discovery {
        discover_in(&root.path().join("sys"), &root.path().join("dev"))
    }

    const GOOD: &[(&str, &str)] = &[
        ("type", "user"),
        ("state", "enabled"),
        ("size", "128"),
        ("mode", "shared"),
        ("block_on_fault", "1"),
    ];

    #[test]
    fn an_enabled_user_queue_with_a_node_is_usable() {
        let root = fake_tree(&["iax1"], &[("wq1.0", GOOD)], &["wq1.0"]);
        let found = run(&root);
        assert_eq!(found.usable.len(), 1);
        let queue = &found.usable[0];
        assert_eq!(queue.name, "wq1.0");
        assert_eq!(queue.device, "iax1");
        assert_eq!(queue.mode, WqMode::Shared);
        assert_eq!(queue.size, 128);
        assert!(queue.block_on_fault);
        assert_eq!(found.to_string(), "usable IAA work queues: wq1.0");
    }

    #[test]
    fn each_unusable_queue_is_reported_with_its_reason() {
        let kernel: &[(&str, &str)] = &[
            ("type", "kernel"),
            ("state", "enabled"),
            ("size", "8"),
            ("mode", "dedicated"),
        ];
        let disabled: &[(&str, &str)] = &[
            ("type", "user"),
            ("state", "disabled"),
            ("size", "8"),
            ("mode", "dedicated"),
        ];
        let empty: &[(&str, &str)] = &[
            ("type", "user"),
            ("state", "enabled"),
            ("size", "0"),
            ("mode", "dedicated"),
        ];
        let root = fake_tree(
            &["iax1", "dsa0"],
            &[
                ("wq0.0", GOOD),
                ("wq1.0", kernel),
                ("wq1.1", disabled),
                ("wq1.2", empty),
                ("wq1.3", GOOD),
            ],
            &[],
        );
        let found = run(&root);
        assert!(found.usable.is_empty());
        let reasons: Vec<(&str, &Rejection)> = found
            .rejected
            .iter()
            .map(|(n, r)| (n.as_str(), r))
            .collect();
        assert_eq!(reasons[0], ("wq0.0", &Rejection::NotIaa));
        assert_eq!(
            reasons[1],
            ("wq1.0", &Rejection::NotUserType("kernel".into()))
        );
        assert_eq!(
            reasons[2],
            ("wq1.1", &Rejection::NotEnabled("disabled".into()))
        );
        assert_eq!(reasons[3], ("wq1.2", &Rejection::ZeroSize));
        assert!(matches!(
            reasons[4],
            ("wq1.3", Rejection::CannotOpen { .. })
        ));
        let report = found.to_string();
        assert!(
            report.starts_with("no usable IAA work queue: wq1.0: its type is 'kernel'"),
            "{report}"
        );
        assert!(report.contains("wq1.3: "), "{report}");
        assert!(
            !report.contains("wq0.0"),
            "DSA queues are not worth mentioning: {report}"
        );
    }

    #[test]
    fn a_queue_with_a_tiny_transfer_limit_is_rejected() {
        let root = fake_tree(&["iax1"], &[("wq1.0", GOOD)], &["wq1.0"]);
        fs::write(root.path().join("sys/wq1.0/max_transfer_size"), "4096\n").unwrap();
        let found = run(&root);
        assert_eq!(
            found.rejected,
            vec![("wq1.0".into(), Rejection::TransferTooSmall(4096))]
        );
        assert!(
            found.to_string().contains("max_transfer_size 4096"),
            "{found}"
        );
    }

    #[test]
    fn a_shared_queue_needs_pasid() {
        let root = fake_tree(&["iax1"], &[("wq1.0", GOOD)], &["wq1.0"]);
        fs::write(root.path().join("sys/iax1/pasid_enabled"), "0\n").unwrap();
        let found = run(&root);
        assert_eq!(
            found.rejected,
            vec![("wq1.0".into(), Rejection::SharedWithoutPasid)]
        );
    }

    #[test]
    fn missing_driver_and_missing_queues_are_told_apart() {
        let root = tempfile::tempdir().unwrap();
        let none = discover_in(&root.path().join("absent"), root.path());
        assert!(!none.driver_present);
        assert!(
            none.to_string().contains("idxd driver is not loaded"),
            "{none}"
        );

        let bare = fake_tree(&["iax1"], &[], &[]);
        assert_eq!(
            run(&bare).to_string(),
            "no usable IAA work queue: iax1 has no work queue configured"
        );

        let no_iax = fake_tree(&[], &[], &[]);
        assert!(run(&no_iax).to_string().contains("lists no iax device"));
    }

    #[test]
    fn larger_queues_come_first_and_modes_are_parsed() {
        let small: &[(&str, &str)] = &[
            ("type", "user"),
            ("state", "enabled"),
            ("size", "16"),
            ("mode", "dedicated"),
        ];
        let root = fake_tree(
            &["iax1", "iax3"],
            &[("wq1.0", small), ("wq3.0", GOOD)],
            &["wq1.0", "wq3.0"],
        );
        let found = run(&root);
        let names: Vec<&str> = found.usable.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["wq3.0", "wq1.0"]);
        assert_eq!(found.usable[1].mode, WqMode::Dedicated);
        assert!(!found.usable[1].block_on_fault);
    }
}
