//! Where a record stands in the file store's files, for messages.

use std::fs;
use std::path::{Path, PathBuf};

/// The text of a store's document and journal, to tell where a record
/// stands (`tollgate check`'s messages): its newest line in the journal,
/// else its line in the document. Missing files are empty.
pub struct StoreText {
    pub(super) document: (PathBuf, String),
    pub(super) journal: (PathBuf, String),
}

impl StoreText {
    pub fn read(store: &Path) -> StoreText {
        let read = |p: PathBuf| {
            let text = fs::read_to_string(&p).unwrap_or_default();
            (p, text)
        };
        StoreText {
            document: read(store.to_path_buf()),
            journal: read(super::with_suffix(store, ".journal")),
        }
    }

    /// `file:line:column` of `needle`, if it stands in either file.
    pub fn locate(&self, needle: &str) -> Option<String> {
        let at = |path: &Path, i: usize, line: &str| {
            line.find(needle)
                .map(|c| format!("{}:{}:{}", path.display(), i + 1, c + 1))
        };
        let j = &self.journal;
        let d = &self.document;
        j.1.lines()
            .enumerate()
            .filter_map(|(i, l)| at(&j.0, i, l))
            .last()
            .or_else(|| d.1.lines().enumerate().find_map(|(i, l)| at(&d.0, i, l)))
    }
}
