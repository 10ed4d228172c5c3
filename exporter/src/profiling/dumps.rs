//! Stored heap dumps: a bounded ring of files in one directory, addressed only by ids the
//! exporter generates.
//!
//! A dump is the file `heap-<id>.heap` where `<id>` is `<unix milliseconds>-<trigger>`, so the
//! directory alone describes the ring and a restarted service finds its dumps again; beside it,
//! `heap-<id>.build` holds the build id of the binary that took it. Ids from requests are
//! checked against that exact shape before they come near a path.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::ProfileError;

/// Why a dump was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// `POST /debug/pprof/dumps`.
    Manual,
    /// The growth trigger.
    Auto,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Auto => "auto",
        }
    }

    fn parse(s: &str) -> Option<Trigger> {
        match s {
            "manual" => Some(Trigger::Manual),
            "auto" => Some(Trigger::Auto),
            _ => None,
        }
    }
}

/// One stored dump, as listed by `GET /debug/pprof/dumps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DumpInfo {
    pub id: String,
    /// When it was taken, Unix milliseconds.
    pub time_unix_ms: u64,
    pub trigger: Trigger,
    /// File size in bytes.
    pub size: u64,
    /// GNU build id of the binary that took it, if it had one.
    pub build_id: Option<String>,
}

/// A validated dump id: `<digits>-<trigger>`, nothing else.
fn parse_id(id: &str) -> Option<(u64, Trigger)> {
    let (millis, trigger) = id.split_once('-')?;
    if millis.is_empty() || millis.len() > 20 || !millis.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((millis.parse().ok()?, Trigger::parse(trigger)?))
}

/// The ring's limits.
#[derive(Debug, Clone)]
pub struct DumpLimits {
    /// Dumps kept; the oldest is removed past this.
    pub max_count: usize,
    /// Total bytes kept; the oldest are removed past this.
    pub max_bytes: u64,
}

impl Default for DumpLimits {
    fn default() -> Self {
        DumpLimits {
            max_count: 32,
            max_bytes: 256 << 20,
        }
    }
}

/// The dump directory and its limits.
#[derive(Debug, Clone)]
pub struct DumpStore {
    dir: PathBuf,
    limits: DumpLimits,
}

impl DumpStore {
    pub fn new(dir: PathBuf, limits: DumpLimits) -> DumpStore {
        DumpStore { dir, limits }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("heap-{id}.heap"))
    }

    fn build_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("heap-{id}.build"))
    }

    /// Records which build took dump `id` (nothing if the binary has no build id).
    pub fn record_build(&self, id: &str, build_id: Option<&str>) {
        if let Some(build_id) = build_id {
            let _ = std::fs::write(self.build_path(id), build_id);
        }
    }

    /// A fresh id and the path to dump to. Ids are unique within the directory and newer than
    /// every dump in it (several dumps within one millisecond take the next milliseconds), so
    /// the ring's order is the order the dumps were taken.
    pub fn next(&self, trigger: Trigger) -> (String, PathBuf) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let after_newest = self.list().last().map_or(0, |d| d.time_unix_ms + 1);
        let mut millis = now.max(after_newest);
        loop {
            let id = format!("{millis}-{}", trigger.as_str());
            let path = self.path(&id);
            if !path.exists() {
                return (id, path);
            }
            millis += 1;
        }
    }

    /// All stored dumps, oldest first. An unreadable directory lists as empty.
    pub fn list(&self) -> Vec<DumpInfo> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut dumps: Vec<DumpInfo> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let name = entry.file_name().into_string().ok()?;
                let id = name.strip_prefix("heap-")?.strip_suffix(".heap")?;
                let (time_unix_ms, trigger) = parse_id(id)?;
                let build_id = std::fs::read_to_string(self.build_path(id))
                    .ok()
                    .map(|b| b.trim().to_owned())
                    .filter(|b| !b.is_empty() && b.bytes().all(|c| c.is_ascii_hexdigit()));
                Some(DumpInfo {
                    id: id.to_owned(),
                    time_unix_ms,
                    trigger,
                    size: entry.metadata().ok()?.len(),
                    build_id,
                })
            })
            .collect();
        dumps.sort_by(|a, b| (a.time_unix_ms, &a.id).cmp(&(b.time_unix_ms, &b.id)));
        dumps
    }

    /// The stored dump `id`, read: 400 for a malformed id, 404 for an unknown one.
    pub fn read(&self, id: &str) -> Result<(DumpInfo, String), ProfileError> {
        if parse_id(id).is_none() {
            return Err(ProfileError::BadRequest(format!(
                "{id:?} is not a dump id. Ids look like 1764140712123-manual; GET \
                 /debug/pprof/dumps lists them"
            )));
        }
        let info = self
            .list()
            .into_iter()
            .find(|d| d.id == id)
            .ok_or_else(|| {
                ProfileError::NotFound(format!(
                    "no stored dump {id}: it may have been evicted (the ring keeps {} dumps, {} \
                     bytes). GET /debug/pprof/dumps lists those kept",
                    self.limits.max_count, self.limits.max_bytes
                ))
            })?;
        let text = std::fs::read_to_string(self.path(&info.id)).map_err(|e| {
            ProfileError::Storage(format!(
                "reading dump {id} from {} failed: {e}",
                self.dir.display()
            ))
        })?;
        Ok((info, text))
    }

    /// Info of a dump just written at `path` under `id`.
    pub fn info(&self, id: &str) -> Option<DumpInfo> {
        self.list().into_iter().find(|d| d.id == id)
    }

    /// Removes the oldest dumps until the ring is within its limits; returns the ids removed.
    pub fn evict(&self) -> Vec<String> {
        let mut dumps = self.list();
        let mut total: u64 = dumps.iter().map(|d| d.size).sum();
        let mut removed = Vec::new();
        while !dumps.is_empty()
            && (dumps.len() > self.limits.max_count || total > self.limits.max_bytes)
        {
            let oldest = dumps.remove(0);
            if dumps.is_empty() {
                // Always keep the newest dump, even if it alone exceeds the byte limit.
                dumps.push(oldest);
                break;
            }
            total -= oldest.size;
            let _ = std::fs::remove_file(self.path(&oldest.id));
            let _ = std::fs::remove_file(self.build_path(&oldest.id));
            removed.push(oldest.id);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(tag: &str, max_count: usize) -> DumpStore {
        let dir = std::env::temp_dir().join(format!("dumps-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        DumpStore::new(
            dir,
            DumpLimits {
                max_count,
                max_bytes: 1 << 20,
            },
        )
    }

    #[test]
    fn ids_are_validated_before_any_path() {
        for bad in [
            "../etc/passwd",
            "1-nope",
            "-manual",
            "12a-manual",
            "1-manual/x",
            "",
            "1-auto\0",
        ] {
            assert!(parse_id(bad).is_none(), "{bad:?}");
        }
        assert_eq!(
            parse_id("1764140712123-auto"),
            Some((1764140712123, Trigger::Auto))
        );
        // `u64::from_str` would take a sign; the ids the exporter writes never have one.
        assert_eq!(parse_id("+12-manual"), None);
        assert_eq!(
            parse_id("10000000000000000000-manual"),
            Some((10_000_000_000_000_000_000, Trigger::Manual)),
            "twenty digits are a valid id"
        );
        let store = store("ids", 4);
        assert!(matches!(
            store.read("../../x"),
            Err(ProfileError::BadRequest(_))
        ));
        assert!(matches!(
            store.read("1-manual"),
            Err(ProfileError::NotFound(_))
        ));
    }

    #[test]
    fn ring_lists_oldest_first_and_evicts_past_the_limit() {
        let store = store("ring", 3);
        let mut ids = Vec::new();
        for _ in 0..5 {
            let (id, path) = store.next(Trigger::Manual);
            std::fs::write(&path, "heap_v2/1\n").unwrap();
            ids.push(id);
        }
        assert_eq!(store.list().len(), 5);
        let removed = store.evict();
        assert_eq!(removed, ids[..2]);
        let kept: Vec<_> = store.list().into_iter().map(|d| d.id).collect();
        assert_eq!(kept, ids[2..]);
        // Found again by a new store on the same directory (a restarted service).
        let again = DumpStore::new(store.dir().to_owned(), DumpLimits::default());
        assert_eq!(again.list().len(), 3);
        assert_eq!(again.read(&ids[4]).unwrap().1, "heap_v2/1\n");
        let _ = std::fs::remove_dir_all(store.dir());
    }

    /// A new id is newer than every stored dump, whatever their trigger (a dump stored with a
    /// clock ahead, say): the ring's order stays the order dumps were taken.
    #[test]
    fn a_new_id_is_newer_than_every_stored_dump() {
        let store = store("newer", 10);
        let ahead = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 60_000;
        std::fs::write(store.path(&format!("{ahead}-manual")), "heap_v2/1\n").unwrap();
        let (id, _) = store.next(Trigger::Auto);
        assert_eq!(parse_id(&id), Some((ahead + 1, Trigger::Auto)));
        let _ = std::fs::remove_dir_all(store.dir());
    }

    /// Past `max_bytes` the oldest go first, and the newest is kept even alone over the limit.
    #[test]
    fn ring_evicts_by_size_and_always_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("dumps-bytes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let limits = DumpLimits {
            max_count: 100,
            max_bytes: 1000,
        };
        let store = DumpStore::new(dir.clone(), limits);
        let mut ids = Vec::new();
        for _ in 0..5 {
            let (id, path) = store.next(Trigger::Auto);
            std::fs::write(&path, "x".repeat(400)).unwrap();
            store.record_build(&id, Some("abcdef"));
            ids.push(id);
        }
        assert_eq!(
            store.evict(),
            ids[..3],
            "800 bytes fit in 1000, 1200 do not"
        );
        let kept: Vec<_> = store.list().into_iter().map(|d| d.id).collect();
        assert_eq!(kept, ids[3..]);
        assert!(
            !store.build_path(&ids[0]).exists(),
            "the build record goes too"
        );
        assert_eq!(store.list()[0].build_id.as_deref(), Some("abcdef"));
        std::fs::write(store.build_path(&ids[3]), "not a build id!").unwrap();
        assert_eq!(
            store.list()[0].build_id,
            None,
            "only hex is taken as a build id"
        );
        std::fs::write(store.path(&ids[3]), "x".repeat(600)).unwrap();
        assert!(
            store.evict().is_empty(),
            "exactly the limit (600 + 400) is within it"
        );

        let (big, path) = store.next(Trigger::Manual);
        std::fs::write(&path, "y".repeat(5000)).unwrap();
        store.evict();
        let kept: Vec<_> = store.list().into_iter().map(|d| d.id).collect();
        assert_eq!(
            kept,
            [big],
            "the newest stays even when it alone exceeds the limit"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
