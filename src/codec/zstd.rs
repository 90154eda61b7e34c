// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Zstandard with a level and, optionally, dictionaries; contexts are reused per thread, as
//! zram reuses per-CPU streams.
//!
//! Dictionaries ([`ZstdDictionaries`]): a store keeps every dictionary it has loaded, up to
//! [`MAX_DICTIONARIES`], and compresses with the newest. A zstd frame made with a dictionary
//! carries the dictionary's 32-bit ID in its header (zstd's default), so a page needs no slot
//! bits to name its dictionary: the decoder reads the ID from the frame and picks that
//! dictionary, and pages compressed under an older one keep decoding. A dictionary is freed
//! only with its store. Dictionaries must be in zstd's format (`zstd --train`, or
//! `ctl train-dict`), which is what gives them an ID; raw-content dictionaries are refused.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::{debug_check_unit, debug_check_unit_decode, full_unit, Algorithm, Codec, CodecError};
use crate::PAGE_SIZE;

/// The most dictionaries a store keeps.
pub const MAX_DICTIONARIES: usize = 8;

/// The largest dictionary accepted: 1 MiB (zram's pages gain nothing from more).
pub const MAX_DICTIONARY_BYTES: usize = 1 << 20;

/// A dictionary that cannot be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DictionaryError {
    /// Not a zstd-format dictionary (no magic number, so no ID).
    #[error(
        "the dictionary is not in zstd's format (make one with 'zstd --train' or ctl train-dict)"
    )]
    NotZstd,
    /// Too big.
    #[error("the dictionary is {0} bytes; at most {MAX_DICTIONARY_BYTES} are accepted")]
    TooBig(usize),
    /// A dictionary with this ID is already loaded.
    #[error("a dictionary with ID {0} is already loaded")]
    Duplicate(u32),
    /// The table of dictionaries is full.
    #[error(
        "{MAX_DICTIONARIES} dictionaries are loaded already; they are kept so that pages \
         compressed with them stay readable"
    )]
    Full,
    /// zstd refused to train or load it.
    #[error("zstd refused the dictionary: {0}")]
    Zstd(String),
}

/// One loaded dictionary.
#[derive(Debug)]
struct Dictionary {
    id: u32,
    raw: Box<[u8]>,
}

/// The dictionaries of one store, shared by its zstd codecs.
#[derive(Debug)]
pub struct ZstdDictionaries {
    /// Distinguishes stores in the per-thread context caches.
    serial: u64,
    /// Every dictionary loaded, oldest first.
    all: RwLock<Vec<Arc<Dictionary>>>,
    /// The ID new pages are compressed with; 0: none.
    current: AtomicU32,
}

impl Default for ZstdDictionaries {
    fn default() -> Self {
        static SERIAL: AtomicU64 = AtomicU64::new(1);
        ZstdDictionaries {
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
            all: RwLock::new(Vec::new()),
            current: AtomicU32::new(0),
        }
    }
}

impl ZstdDictionaries {
    /// Loads a zstd-format dictionary and makes it the one new pages use; returns its ID.
    pub fn add(&self, raw: &[u8]) -> Result<u32, DictionaryError> {
        if raw.len() > MAX_DICTIONARY_BYTES {
            return Err(DictionaryError::TooBig(raw.len()));
        }
        let id = zstd::zstd_safe::get_dict_id_from_dict(raw)
            .ok_or(DictionaryError::NotZstd)?
            .get();
        // Check that zstd accepts it before anything depends on it.
        zstd::bulk::Decompressor::with_dictionary(raw)
            .map_err(|e| DictionaryError::Zstd(e.to_string()))?;
        let mut all = self.all.write().unwrap_or_else(|e| e.into_inner());
        if all.iter().any(|d| d.id == id) {
            return Err(DictionaryError::Duplicate(id));
        }
        if all.len() >= MAX_DICTIONARIES {
            return Err(DictionaryError::Full);
        }
        all.push(Arc::new(Dictionary {
            id,
            raw: raw.into(),
        }));
        self.current.store(id, Ordering::Release);
        Ok(id)
    }

    /// The IDs of the loaded dictionaries, oldest first.
    pub fn ids(&self) -> Vec<u32> {
        let all = self.all.read().unwrap_or_else(|e| e.into_inner());
        all.iter().map(|d| d.id).collect()
    }

    /// The ID new pages are compressed with (`None`: no dictionary).
    pub fn current(&self) -> Option<u32> {
        match self.current.load(Ordering::Acquire) {
            0 => None,
            id => Some(id),
        }
    }

    /// Every dictionary's zstd-format bytes, oldest first (the last is the current one):
    /// what a migration sends so the destination decodes the same objects.
    pub fn export(&self) -> Vec<Box<[u8]>> {
        let all = self.all.read().unwrap_or_else(|e| e.into_inner());
        all.iter().map(|d| d.raw.clone()).collect()
    }

    /// The number of dictionaries loaded.
    pub fn count(&self) -> usize {
        self.all.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Bytes of the dictionaries themselves.
    pub fn bytes(&self) -> u64 {
        let all = self.all.read().unwrap_or_else(|e| e.into_inner());
        all.iter().map(|d| d.raw.len() as u64).sum()
    }

    fn get(&self, id: u32) -> Option<Arc<Dictionary>> {
        let all = self.all.read().unwrap_or_else(|e| e.into_inner());
        all.iter().find(|d| d.id == id).cloned()
    }
}

/// The zstd codec at one level, with the dictionaries of its store if it has any.
#[derive(Debug, Clone)]
pub struct Zstd {
    level: i32,
    dictionaries: Option<Arc<ZstdDictionaries>>,
}

/// The parameters a unit is compressed with beyond its level's. zstd picks a level's
/// parameters by the source's size: a 32 or 64 KiB unit falls in the "up to 128 KiB" tier,
/// whose fast levels search less than the "up to 16 KiB" tier a page (and a 16 KiB unit)
/// gets — level 1 there has a hash table of 2^13 and a minimum match of 6, against 2^15 and
/// 5 (zstd's `clevels.h`) — and so compress a unit of independent pages worse than the pages
/// one by one. A unit keeps the small tier's search for levels 1 and 2 (its window stays the
/// large tier's, which covers the whole unit); higher levels search enough as they are.
fn unit_parameters(level: i32) -> Vec<zstd::zstd_safe::CParameter> {
    use zstd::zstd_safe::CParameter;
    match level {
        1 => vec![
            CParameter::HashLog(15),
            CParameter::ChainLog(14),
            CParameter::MinMatch(5),
        ],
        2 => vec![
            CParameter::HashLog(15),
            CParameter::ChainLog(14),
            CParameter::MinMatch(4),
        ],
        _ => Vec::new(),
    }
}

/// A compression context for (level, store serial, dictionary ID).
struct CompressContext {
    key: (i32, u64, u32),
    compressor: zstd::bulk::Compressor<'static>,
}

/// Decompression contexts: one without a dictionary, and a few by (store serial, ID).
struct DecompressContexts {
    plain: zstd::bulk::Decompressor<'static>,
    with_dictionary: Vec<((u64, u32), zstd::bulk::Decompressor<'static>)>,
}

thread_local! {
    static COMPRESS: RefCell<Option<CompressContext>> = const { RefCell::new(None) };
    /// The context for units, whose parameters are set apart ([`unit_parameters`]).
    static COMPRESS_UNIT: RefCell<Option<CompressContext>> = const { RefCell::new(None) };
    static DECOMPRESS: RefCell<Option<DecompressContexts>> = const { RefCell::new(None) };
}

impl Zstd {
    /// Frees the calling thread's zstd contexts (they are made again on the next use): for a
    /// thread that compressed for one command and should not keep them.
    pub fn release_thread_contexts() {
        COMPRESS.with(|cell| cell.borrow_mut().take());
        COMPRESS_UNIT.with(|cell| cell.borrow_mut().take());
        DECOMPRESS.with(|cell| cell.borrow_mut().take());
    }

    /// A zstd codec at `level` (1..=22), without dictionaries.
    pub fn new(level: i32) -> Self {
        Zstd {
            level,
            dictionaries: None,
        }
    }

    /// A zstd codec at `level` that compresses with the newest of `dictionaries` and decodes
    /// pages made with any of them.
    pub fn with_dictionaries(level: i32, dictionaries: Arc<ZstdDictionaries>) -> Self {
        Zstd {
            level,
            dictionaries: Some(dictionaries),
        }
    }

    fn compress_with(&self, page: &[u8], dst: &mut [u8]) -> std::io::Result<usize> {
        self.compress_in(&COMPRESS, page, dst)
    }

    /// Compresses `src` with the calling thread's context in `contexts`, made anew (with the
    /// unit parameters for [`COMPRESS_UNIT`]) when the level, store or dictionary changed.
    fn compress_in(
        &self,
        contexts: &'static std::thread::LocalKey<RefCell<Option<CompressContext>>>,
        page: &[u8],
        dst: &mut [u8],
    ) -> std::io::Result<usize> {
        let (serial, id) = match &self.dictionaries {
            Some(d) => (d.serial, d.current.load(Ordering::Acquire)),
            None => (0, 0),
        };
        let key = (self.level, serial, id);
        let for_units = std::ptr::eq(contexts, &COMPRESS_UNIT);
        contexts.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|c| c.key != key) {
                // Only a change of level, store or dictionary gets here.
                let dictionary = self.dictionaries.as_ref().and_then(|d| d.get(id));
                let mut compressor = match &dictionary {
                    Some(d) => zstd::bulk::Compressor::with_dictionary(self.level, &d.raw)?,
                    None => zstd::bulk::Compressor::new(self.level)?,
                };
                if for_units {
                    for parameter in unit_parameters(self.level) {
                        compressor.set_parameter(parameter)?;
                    }
                }
                *slot = Some(CompressContext { key, compressor });
            }
            match slot.as_mut() {
                Some(context) => context.compressor.compress_to_buffer(page, dst),
                None => unreachable!("the context was just created"),
            }
        })
    }

    fn decompress_with(&self, src: &[u8], page: &mut [u8]) -> Result<usize, CodecError> {
        let id = zstd::zstd_safe::get_dict_id_from_frame(src).map_or(0, |id| id.get());
        DECOMPRESS.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                let plain = zstd::bulk::Decompressor::new().map_err(corrupt)?;
                *slot = Some(DecompressContexts {
                    plain,
                    with_dictionary: Vec::new(),
                });
            }
            let Some(contexts) = slot.as_mut() else {
                unreachable!("the contexts were just created")
            };
            if id == 0 {
                return contexts
                    .plain
                    .decompress_to_buffer(src, page)
                    .map_err(corrupt);
            }
            let Some(dictionaries) = &self.dictionaries else {
                return Err(CodecError::Corrupt(format!(
                    "the page needs zstd dictionary {id}, and this store has none"
                )));
            };
            let key = (dictionaries.serial, id);
            let at = match contexts.with_dictionary.iter().position(|(k, _)| *k == key) {
                Some(at) => at,
                None => {
                    let dictionary = dictionaries.get(id).ok_or_else(|| {
                        CodecError::Corrupt(format!(
                            "the page needs zstd dictionary {id}, which this store lacks"
                        ))
                    })?;
                    let decompressor = zstd::bulk::Decompressor::with_dictionary(&dictionary.raw)
                        .map_err(corrupt)?;
                    if contexts.with_dictionary.len() >= MAX_DICTIONARIES {
                        contexts.with_dictionary.remove(0);
                    }
                    contexts.with_dictionary.push((key, decompressor));
                    contexts.with_dictionary.len() - 1
                }
            };
            contexts.with_dictionary[at]
                .1
                .decompress_to_buffer(src, page)
                .map_err(corrupt)
        })
    }
}

fn corrupt(error: std::io::Error) -> CodecError {
    CodecError::Corrupt(error.to_string())
}

impl Codec for Zstd {
    fn algorithm(&self) -> Algorithm {
        Algorithm::Zstd
    }

    fn compress(&self, page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> Result<usize, CodecError> {
        self.compress_with(page, dst)
            .map_err(|_| CodecError::Incompressible { limit: dst.len() })
    }

    fn decompress(&self, src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError> {
        match self.decompress_with(src, &mut page[..]) {
            Ok(PAGE_SIZE) => Ok(()),
            Ok(n) => Err(CodecError::Corrupt(format!(
                "zstd decoded {n} bytes, not a page"
            ))),
            Err(e) => Err(e),
        }
    }

    fn compress_unit(&self, src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError> {
        debug_check_unit(src);
        self.compress_in(&COMPRESS_UNIT, src, dst)
            .map_err(|_| CodecError::Incompressible { limit: dst.len() })
    }

    /// Always decodes the whole unit. zstd cuts its input into blocks of up to 128 KiB, so a
    /// unit (at most 64 KiB) is one block, and a block decodes whole: a streaming decoder
    /// asked to stop after `needed` bytes would still decode the unit, into its own window,
    /// and copy. (Smaller blocks, `ZSTD_c_blockSizeMax`, would allow it at a cost in ratio.)
    fn decompress_unit(
        &self,
        src: &[u8],
        dst: &mut [u8],
        needed: usize,
    ) -> Result<usize, CodecError> {
        debug_check_unit_decode(dst, needed);
        let decoded = self.decompress_with(src, dst)?;
        full_unit("zstd", decoded, dst.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagegen::fill_page;

    fn samples(seed: u64, n: u64) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let mut page = [0u8; PAGE_SIZE];
                fill_page(seed, i, &mut page);
                page.to_vec()
            })
            .collect()
    }

    #[test]
    fn pages_made_under_an_older_dictionary_keep_decoding() {
        let dictionaries = Arc::new(ZstdDictionaries::default());
        let codec = Zstd::with_dictionaries(3, Arc::clone(&dictionaries));
        let mut page = [0u8; PAGE_SIZE];
        fill_page(99, 5, &mut page);
        let mut plain = vec![0u8; 2 * PAGE_SIZE];
        let plain_len = codec.compress(&page, &mut plain).unwrap();
        let first = zstd::dict::from_samples(&samples(1, 2000), 16 << 10).unwrap();
        let first_id = dictionaries.add(&first).unwrap();
        let mut under_first = vec![0u8; 2 * PAGE_SIZE];
        let first_len = codec.compress(&page, &mut under_first).unwrap();

        let second = zstd::dict::from_samples(&samples(2, 2000), 8 << 10).unwrap();
        let second_id = dictionaries.add(&second).unwrap();

        let mut out = [0u8; PAGE_SIZE];
        for (src, label) in [
            (&plain[..plain_len], "no dictionary"),
            (&under_first[..first_len], "the first dictionary"),
        ] {
            codec.decompress(src, &mut out).unwrap();
            assert_eq!(out[..], page[..], "{label}");
        }
        assert_eq!(
            zstd::zstd_safe::get_dict_id_from_frame(&under_first[..first_len])
                .unwrap()
                .get(),
            first_id
        );
        let mut under_second = vec![0u8; 2 * PAGE_SIZE];
        let n = codec.compress(&page, &mut under_second).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_dict_id_from_frame(&under_second[..n])
                .unwrap()
                .get(),
            second_id
        );
        assert_eq!(dictionaries.ids(), vec![first_id, second_id]);
        assert_eq!(
            dictionaries.add(&second),
            Err(DictionaryError::Duplicate(second_id))
        );
        assert_eq!(
            dictionaries.add(b"not a dictionary"),
            Err(DictionaryError::NotZstd)
        );
        let without = Zstd::new(3);
        assert!(without
            .decompress(&under_first[..first_len], &mut out)
            .is_err());
    }

    #[test]
    fn units_use_the_dictionaries_as_pages_do() {
        let dictionaries = Arc::new(ZstdDictionaries::default());
        let codec = Zstd::with_dictionaries(3, Arc::clone(&dictionaries));
        let mut unit = vec![0u8; 4 * PAGE_SIZE];
        for (i, page) in unit.chunks_exact_mut(PAGE_SIZE).enumerate() {
            fill_page(99, i as u64, page.try_into().unwrap());
        }
        let mut plain = vec![0u8; crate::codec::UNIT_COMPRESS_BUFFER];
        let plain_len = codec.compress_unit(&unit, &mut plain).unwrap();
        let dictionary = zstd::dict::from_samples(&samples(1, 2000), 16 << 10).unwrap();
        let id = dictionaries.add(&dictionary).unwrap();
        let mut with = vec![0u8; crate::codec::UNIT_COMPRESS_BUFFER];
        let with_len = codec.compress_unit(&unit, &mut with).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_dict_id_from_frame(&with[..with_len]).map(|id| id.get()),
            Some(id)
        );
        let mut out = vec![0u8; unit.len()];
        for src in [&plain[..plain_len], &with[..with_len]] {
            out.fill(0);
            assert_eq!(
                codec.decompress_unit(src, &mut out, PAGE_SIZE),
                Ok(unit.len())
            );
            assert!(out == unit);
        }
        assert!(Zstd::new(3)
            .decompress_unit(&with[..with_len], &mut out, PAGE_SIZE)
            .is_err());
    }
}
