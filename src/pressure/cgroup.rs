// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's own memory cgroup: where it is, the limit it lives under and what it uses.
//!
//! Discovery reads `/proc/self/cgroup` and `/proc/self/mountinfo` once, at start:
//!
//! - **cgroup v1**: the line `N:memory:/PATH` (the `memory` controller, maybe with others such
//!   as `memory,hugetlb`) names the cgroup; the `cgroup` mount whose super options include
//!   `memory` says where that hierarchy is mounted. The limit is the lower of the cgroup's
//!   `memory.limit_in_bytes` and the `hierarchical_memory_limit` of its `memory.stat` (the
//!   lowest limit on the path to the root: a parent's limit binds too).
//! - **cgroup v2**: the line `0::/PATH`, under the `cgroup2` mount (found in mountinfo, not
//!   assumed at `/sys/fs/cgroup`), when that cgroup has the memory controller (it has a
//!   `memory.max`). The limit is the lowest `memory.max` or `memory.high` on the path from the
//!   cgroup to the root (`memory.high` throttles rather than kills, but a good citizen stays
//!   below it too).
//!
//! A v1 limit of `PAGE_COUNTER_MAX` pages (9223372036854771712 on 4 KiB pages) or any value
//! from 2^62 up means none, as does v2's `max`.
//!
//! What the daemon uses is the cgroup's usage (`memory.usage_in_bytes`, `memory.current`) less
//! its inactive file cache (`total_inactive_file` / `inactive_file` of `memory.stat`), which
//! the kernel reclaims before it counts a charge against the limit: the "working set" kubelet
//! and cAdvisor use. The parsing is pure functions over the files' text, tested on fixtures;
//! [`MemoryCgroup::sample`] reads the files again at every check.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Limits from this value up mean "no limit" (v1's `PAGE_COUNTER_MAX * PAGE_SIZE` is just
/// below 2^63).
const UNLIMITED_FROM: u64 = 1 << 62;

/// Which cgroup interface the daemon's memory cgroup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// The legacy hierarchy's `memory` controller.
    V1,
    /// The unified hierarchy.
    V2,
}

impl CgroupVersion {
    /// `v1` or `v2`.
    pub fn name(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        }
    }
}

/// The daemon's memory cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryCgroup {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// The cgroup's path in its hierarchy (`/process_api/abc`).
    pub path: String,
    /// The cgroup's directory (`/sys/fs/cgroup/memory/process_api/abc`).
    pub dir: PathBuf,
    /// For v2: the directories from the cgroup up to (not including) the hierarchy's root,
    /// whose `memory.max` and `memory.high` all bind.
    ancestors: Vec<PathBuf>,
}

/// What one look at the cgroup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupSample {
    /// The lowest limit that binds the cgroup, bytes; `None`: no limit.
    pub limit: Option<u64>,
    /// The cgroup's usage less its inactive file cache, bytes.
    pub used: u64,
}

/// Why there is no memory cgroup to honour.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/cgroup` or `/proc/self/mountinfo` could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Neither a v1 memory controller nor a v2 cgroup with one.
    #[error("the process is in no memory cgroup (no v1 memory controller, no v2 memory.max)")]
    NoMemoryController,
    /// The hierarchy is not mounted where this process can see it.
    #[error("the {0} memory cgroup hierarchy is not mounted in this mount namespace")]
    NotMounted(&'static str),
}

/// A line of `/proc/self/mountinfo` that mounts a cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    /// The hierarchy's directory that is the mount's root (`/` unless a namespace or a bind
    /// mount shows a subtree).
    root: String,
    /// Where it is mounted.
    mount_point: PathBuf,
}

/// The memory cgroup line of `/proc/self/cgroup`: the v1 `memory` controller's path, else the
/// v2 path; `(version, path)`.
pub(crate) fn parse_proc_cgroup(text: &str) -> Option<(CgroupVersion, String)> {
    let mut v2 = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            return Some((CgroupVersion::V1, path.to_owned()));
        }
        if controllers.is_empty() {
            v2 = Some((CgroupVersion::V2, path.to_owned()));
        }
    }
    v2
}

/// The mount of the v1 hierarchy with the `memory` controller (`version` V1) or of the
/// unified hierarchy (V2), from `/proc/self/mountinfo`.
fn parse_mountinfo(text: &str, version: CgroupVersion) -> Option<CgroupMount> {
    text.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        let mut after = after.split(' ');
        let fstype = after.next()?;
        let _source = after.next()?;
        let super_options = after.next().unwrap_or("");
        let wanted = match version {
            CgroupVersion::V1 => {
                fstype == "cgroup" && super_options.split(',').any(|o| o == "memory")
            }
            CgroupVersion::V2 => fstype == "cgroup2",
        };
        (wanted && fields.len() >= 5).then(|| CgroupMount {
            root: unescape_mountinfo(fields[3]),
            mount_point: PathBuf::from(unescape_mountinfo(fields[4])),
        })
    })
}

/// mountinfo writes space, tab, newline and backslash as `\040`-style octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` under `mount`; `None` when the mount shows a subtree that
/// does not hold it.
fn cgroup_dir(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    let relative = path.strip_prefix(root)?;
    if !(relative.is_empty() || relative.starts_with('/')) {
        return None;
    }
    Some(mount.mount_point.join(relative.trim_start_matches('/')))
}

/// A limit file's value: bytes, or `None` for no limit (`max`, or a v1 value from 2^62 up).
/// Unreadable text is no limit too: a limit the daemon cannot read is not one it can honour.
pub fn parse_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        value => value.parse().ok().filter(|&bytes| bytes < UNLIMITED_FROM),
    }
}

/// The value of `key` in a `memory.stat` text.
pub fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok()).flatten()
    })
}

fn lowest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn read_proc(path: &str) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: PathBuf::from(path),
        source,
    })
}

impl MemoryCgroup {
    /// Finds the calling process's memory cgroup.
    pub fn discover() -> Result<MemoryCgroup, CgroupError> {
        let cgroups = read_proc("/proc/self/cgroup")?;
        let mountinfo = read_proc("/proc/self/mountinfo")?;
        MemoryCgroup::from_texts(&cgroups, &mountinfo)
    }

    /// The memory cgroup the texts of `/proc/self/cgroup` and `/proc/self/mountinfo` name.
    /// A v2 cgroup counts only when its directory has a `memory.max` (the memory controller
    /// is enabled for it), which is looked at on the filesystem.
    pub(crate) fn from_texts(cgroups: &str, mountinfo: &str) -> Result<MemoryCgroup, CgroupError> {
        let (version, path) = parse_proc_cgroup(cgroups).ok_or(CgroupError::NoMemoryController)?;
        let mount =
            parse_mountinfo(mountinfo, version).ok_or(CgroupError::NotMounted(version.name()))?;
        let dir = cgroup_dir(&mount, &path).ok_or(CgroupError::NotMounted(version.name()))?;
        let ancestors = match version {
            CgroupVersion::V1 => Vec::new(),
            CgroupVersion::V2 => {
                if !dir.join("memory.max").exists() {
                    return Err(CgroupError::NoMemoryController);
                }
                dir.ancestors()
                    .take_while(|d| d.starts_with(&mount.mount_point) && *d != mount.mount_point)
                    .map(Path::to_path_buf)
                    .collect()
            }
        };
        Ok(MemoryCgroup {
            version,
            path,
            dir,
            ancestors,
        })
    }

    /// A v1 cgroup at `dir` (tests and tools that know where it is).
    pub fn v1_at(dir: PathBuf) -> MemoryCgroup {
        MemoryCgroup {
            version: CgroupVersion::V1,
            path: dir.display().to_string(),
            dir,
            ancestors: Vec::new(),
        }
    }

    /// Reads the limit and the usage now.
    pub fn sample(&self) -> io::Result<CgroupSample> {
        let read = |name: &str| fs::read_to_string(self.dir.join(name));
        match self.version {
            CgroupVersion::V1 => {
                let stat = read("memory.stat")?;
                let limit = lowest(
                    parse_limit(&read("memory.limit_in_bytes")?),
                    stat_value(&stat, "hierarchical_memory_limit")
                        .and_then(|v| parse_limit(&v.to_string())),
                );
                let usage = parse_count(&read("memory.usage_in_bytes")?)?;
                let inactive = stat_value(&stat, "total_inactive_file").unwrap_or(0);
                Ok(CgroupSample {
                    limit,
                    used: usage.saturating_sub(inactive),
                })
            }
            CgroupVersion::V2 => {
                let mut limit = None;
                for dir in &self.ancestors {
                    for name in ["memory.max", "memory.high"] {
                        // A parent without the controller has neither file.
                        if let Ok(text) = fs::read_to_string(dir.join(name)) {
                            limit = lowest(limit, parse_limit(&text));
                        }
                    }
                }
                let usage = parse_count(&read("memory.current")?)?;
                let inactive = stat_value(&read("memory.stat")?, "inactive_file").unwrap_or(0);
                Ok(CgroupSample {
                    limit,
                    used: usage.saturating_sub(inactive),
                })
            }
        }
    }

    /// The v2 cgroup's `memory.pressure`, for a PSI trigger on the cgroup rather than the host;
    /// `None` on v1.
    pub fn pressure_file(&self) -> Option<PathBuf> {
        match self.version {
            CgroupVersion::V1 => None,
            CgroupVersion::V2 => Some(self.dir.join("memory.pressure")),
        }
    }
}

fn parse_count(text: &str) -> io::Result<u64> {
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("'{}' is not a number of bytes", text.trim()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/271474fd\n\
                             3:cpuset:/\n0::/\n";
    const V1_MOUNTINFO: &str =
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
    const V2_CGROUP: &str = "0::/system.slice/vhost-user-zram@vm1.service\n";
    const V2_MOUNTINFO: &str =
        "25 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn a_v1_memory_line_wins_over_the_v2_line() {
        assert_eq!(
            parse_proc_cgroup(V1_CGROUP),
            Some((CgroupVersion::V1, "/process_api/271474fd".to_owned()))
        );
        assert_eq!(
            parse_proc_cgroup("5:memory,hugetlb:/a\n"),
            Some((CgroupVersion::V1, "/a".to_owned()))
        );
        assert_eq!(
            parse_proc_cgroup(V2_CGROUP),
            Some((
                CgroupVersion::V2,
                "/system.slice/vhost-user-zram@vm1.service".to_owned()
            ))
        );
        assert_eq!(parse_proc_cgroup("8:pids:/\n"), None);
    }

    #[test]
    fn the_hierarchy_is_found_in_mountinfo_not_assumed() {
        let v1 = parse_mountinfo(V1_MOUNTINFO, CgroupVersion::V1).unwrap();
        assert_eq!(v1.mount_point, PathBuf::from("/sys/fs/cgroup/memory"));
        let v2 = parse_mountinfo(V1_MOUNTINFO, CgroupVersion::V2).unwrap();
        assert_eq!(v2.mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        let v2 = parse_mountinfo(V2_MOUNTINFO, CgroupVersion::V2).unwrap();
        assert_eq!(v2.mount_point, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(parse_mountinfo(V2_MOUNTINFO, CgroupVersion::V1), None);
        let spaced = "1 2 0:3 / /mnt/cg\\040x rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            parse_mountinfo(spaced, CgroupVersion::V1)
                .unwrap()
                .mount_point,
            PathBuf::from("/mnt/cg x")
        );
    }

    #[test]
    fn the_cgroup_directory_is_under_the_mount_and_its_root() {
        let v1 = MemoryCgroup::from_texts(V1_CGROUP, V1_MOUNTINFO).unwrap();
        assert_eq!(v1.version, CgroupVersion::V1);
        assert_eq!(
            v1.dir,
            PathBuf::from("/sys/fs/cgroup/memory/process_api/271474fd")
        );
        // A namespace shows the subtree /a as its root.
        let mount = CgroupMount {
            root: "/a".to_owned(),
            mount_point: PathBuf::from("/sys/fs/cgroup"),
        };
        assert_eq!(
            cgroup_dir(&mount, "/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/b"))
        );
        assert_eq!(
            cgroup_dir(&mount, "/a"),
            Some(PathBuf::from("/sys/fs/cgroup/"))
        );
        assert_eq!(cgroup_dir(&mount, "/ab"), None);
    }

    #[test]
    fn limits_parse_with_max_and_the_v1_ceiling_as_none() {
        assert_eq!(parse_limit("100663296\n"), Some(96 << 20));
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("garbage"), None);
        let stat =
            "cache 0\nrss 4096\nhierarchical_memory_limit 100663296\ntotal_inactive_file 8192\n";
        assert_eq!(
            stat_value(stat, "hierarchical_memory_limit"),
            Some(96 << 20)
        );
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(8192));
        assert_eq!(stat_value(stat, "inactive_file"), None);
    }

    #[test]
    fn a_v1_sample_takes_the_lower_of_own_and_hierarchical_limit() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();
        write("memory.limit_in_bytes", "9223372036854771712\n");
        write(
            "memory.stat",
            "rss 1\nhierarchical_memory_limit 67108864\ntotal_inactive_file 1048576\n",
        );
        write("memory.usage_in_bytes", "5242880\n");
        let cgroup = MemoryCgroup::v1_at(dir.path().to_path_buf());
        assert_eq!(
            cgroup.sample().unwrap(),
            CgroupSample {
                limit: Some(64 << 20),
                used: 4 << 20
            }
        );
    }

    #[test]
    fn a_v2_sample_takes_the_lowest_max_or_high_up_the_path() {
        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("slice/service");
        fs::create_dir_all(&leaf).unwrap();
        let write = |dir: &Path, name: &str, text: &str| fs::write(dir.join(name), text).unwrap();
        write(&leaf, "memory.max", "max\n");
        write(&leaf, "memory.high", "max\n");
        write(&leaf, "memory.current", "3145728\n");
        write(&leaf, "memory.stat", "anon 1\ninactive_file 1048576\n");
        write(&root.path().join("slice"), "memory.max", "50331648\n");
        write(&root.path().join("slice"), "memory.high", "41943040\n");
        let mountinfo = format!(
            "25 22 0:23 / {} rw - cgroup2 cgroup2 rw\n",
            root.path().display()
        );
        let cgroup = MemoryCgroup::from_texts("0::/slice/service\n", &mountinfo).unwrap();
        assert_eq!(cgroup.version, CgroupVersion::V2);
        assert_eq!(
            cgroup.sample().unwrap(),
            CgroupSample {
                limit: Some(40 << 20),
                used: 2 << 20
            }
        );
        assert_eq!(cgroup.pressure_file(), Some(leaf.join("memory.pressure")));
        // The host's v2 hierarchy without the memory controller does not count.
        let bare = MemoryCgroup::from_texts("0::/other\n", &mountinfo);
        assert!(
            matches!(bare, Err(CgroupError::NoMemoryController)),
            "{bare:?}"
        );
    }
}
