// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Intel In-Memory Analytics Accelerator (IAA) page compression from user space, batched.
//!
//! IAA, on 4th-generation Xeon and later, compresses and decompresses raw DEFLATE (RFC 1951)
//! with a 4 KiB history. User space drives it without a library: open a work queue (WQ)
//! `/dev/iax/wqN.M` the administrator enabled with `accel-config`, fill a 64-byte
//! [`hw::Descriptor`] naming the source, the destination, a 64-byte aligned
//! [`hw::CompletionRecord`] and, for compression, a [`aecs::CompressAecs`] holding the
//! Huffman tables; hand it over with `write()` or through the WQ's mapped portal (MOVDIR64B
//! or ENQCMD); poll the completion record's status byte until the device writes it.
//!
//! This crate is layered the same way:
//! - [`hw`] and [`aecs`]: the structures, byte for byte (checked against the kernel's
//!   `include/uapi/linux/idxd.h` and `drivers/crypto/intel/iaa/`);
//! - [`discover`]: which WQs are usable, and why none is;
//! - [`portal`]: the submission paths behind one [`portal::Portal`] trait;
//! - [`soft`]: a software work queue with the device's semantics and fault injection, so
//!   everything above the portal runs and is tested without the hardware;
//! - [`deflate`]: the software compressor producing the device's format, and the inflater;
//! - [`engine`]: batches of up to 8 pages, completion polling with a bounded spin and a
//!   timeout, and software fallback for every page the device did not finish;
//! - [`dma`]: the memory the device shares, and all the unsafe code touching it.
//!
//! [`open`] picks hardware or the software queue as [`Backend`] asks.

pub mod aecs;
pub mod deflate;
pub mod discover;
pub mod dma;
pub mod engine;
pub mod hw;
pub mod portal;
pub mod soft;

pub use engine::{
    CompressResult, Engine, EngineConfig, EngineStats, HuffmanMode, Incompressible, MAX_BATCH,
};

/// The page size the engine compresses.
pub const PAGE_SIZE: usize = 4096;

/// Where the work is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// The hardware when a usable WQ exists, else the software queue (with one warning).
    #[default]
    Auto,
    /// The hardware only: opening fails without a usable WQ.
    Hardware,
    /// The software queue only.
    Software,
}

impl Backend {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Hardware => "hardware",
            Backend::Software => "software",
        }
    }
}

/// Opening an engine failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `Backend::Hardware` without a usable work queue.
    #[error(
        "{discovery}, and --iaa hardware needs one; as root, set one up with: {steps}",
        steps = discover::ACCEL_CONFIG_STEPS
    )]
    NoWorkQueue {
        /// What discovery found.
        discovery: discover::Discovery,
    },
    /// Every usable work queue failed to open.
    #[error("no IAA work queue could be opened (last tried {queue})")]
    Open {
        /// The last queue tried.
        queue: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The software queue's threads could not start.
    #[error("the software IAA work queue could not start its threads")]
    SoftwareQueue(#[source] std::io::Error),
}

/// An opened engine and what the caller should know about the choice.
#[derive(Debug)]
pub struct Opened {
    /// The engine.
    pub engine: Engine,
    /// Whether it drives the hardware.
    pub hardware: bool,
    /// Why `Backend::Auto` fell back to the software queue, for the caller to warn once.
    pub fallback: Option<String>,
}

/// Opens an engine on `backend` in `mode`.
pub fn open(backend: Backend, mode: HuffmanMode) -> Result<Opened, OpenError> {
    open_with(backend, mode, discover::discover)
}

/// [`open`] with a given discovery (for tests against a fake sysfs tree).
pub fn open_with(
    backend: Backend,
    mode: HuffmanMode,
    discover: impl FnOnce() -> discover::Discovery,
) -> Result<Opened, OpenError> {
    let software = || -> Result<Opened, OpenError> {
        let queue = soft::SoftwareQueue::new(soft::SoftwareQueueConfig::default())
            .map_err(OpenError::SoftwareQueue)?;
        let config = EngineConfig {
            mode,
            // The poller shares the CPUs with the queue's workers: spin briefly, then yield.
            spin_sweeps: 1_000,
            decompress_on_device: false,
            ..EngineConfig::default()
        };
        Ok(Opened {
            engine: Engine::new(Box::new(queue), config),
            hardware: false,
            fallback: None,
        })
    };
    if backend == Backend::Software {
        return software();
    }
    let discovery = discover();
    let mut last_error = None;
    for queue in &discovery.usable {
        match discover::open(queue) {
            Ok(portal) => {
                let config = EngineConfig {
                    mode,
                    ..EngineConfig::default()
                };
                let engine = Engine::new(portal, config);
                log::info!("IAA: compressing through {}", engine.describe());
                return Ok(Opened {
                    engine,
                    hardware: true,
                    fallback: None,
                });
            }
            Err(error) => last_error = Some((queue.node.display().to_string(), error)),
        }
    }
    match (backend, last_error) {
        (Backend::Hardware, Some((queue, source))) => Err(OpenError::Open { queue, source }),
        (Backend::Hardware, None) => Err(OpenError::NoWorkQueue { discovery }),
        (Backend::Auto, last_error) => {
            let why = match last_error {
                Some((queue, error)) => format!("{queue} could not be opened ({error})"),
                None => discovery.to_string(),
            };
            let mut opened = software()?;
            opened.fallback = Some(why);
            Ok(opened)
        }
        (Backend::Software, _) => software(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use discover::{Discovery, WorkQueue, WqMode};

    fn nothing() -> Discovery {
        discover::discover_in(
            std::path::Path::new("/nonexistent/dsa"),
            std::path::Path::new("/nonexistent"),
        )
    }

    #[test]
    fn hardware_without_a_queue_fails_naming_accel_config() {
        let error = open_with(Backend::Hardware, HuffmanMode::Fixed, nothing).unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("no usable IAA work queue: "),
            "{message}"
        );
        assert!(message.contains("accel-config enable-wq"), "{message}");
    }

    #[test]
    fn auto_without_a_queue_falls_back_and_says_why() {
        let opened = open_with(Backend::Auto, HuffmanMode::Dynamic, nothing).unwrap();
        assert!(!opened.hardware);
        assert!(opened
            .fallback
            .unwrap()
            .contains("no usable IAA work queue"));
        assert_eq!(opened.engine.mode(), HuffmanMode::Dynamic);
    }

    #[test]
    fn software_never_looks_for_hardware() {
        let opened = open_with(Backend::Software, HuffmanMode::Fixed, || {
            panic!("software must not run discovery")
        })
        .unwrap();
        assert!(!opened.hardware && opened.fallback.is_none());
    }

    #[test]
    fn a_queue_node_that_is_not_a_device_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("wq1.0");
        std::fs::write(&node, b"").unwrap();
        let fake = move || Discovery {
            sysfs: "/fake".into(),
            driver_present: true,
            devices: vec!["iax1".into()],
            usable: vec![WorkQueue {
                name: "wq1.0".into(),
                device: "iax1".into(),
                node: node.clone(),
                mode: WqMode::Dedicated,
                size: 16,
                block_on_fault: true,
            }],
            rejected: Vec::new(),
        };
        let error = open_with(Backend::Hardware, HuffmanMode::Fixed, fake.clone()).unwrap_err();
        assert!(error.to_string().contains("could be opened"), "{error}");
        let opened = open_with(Backend::Auto, HuffmanMode::Fixed, fake).unwrap();
        assert!(!opened.hardware);
        assert!(opened.fallback.unwrap().contains("not a character device"));
    }
}
