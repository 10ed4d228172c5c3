//! Bearer tokens for `/metrics` and `/debug/*`: given literally or read from files, several
//! accepted at once, so a continuous profiler's token (a Kubernetes Secret or ServiceAccount
//! token mounted as a file) and an operator's token both work.
//!
//! Files are read at start (a missing or empty file is an error then) and again when they
//! change, checked at most once a second: Kubernetes swaps a mounted Secret's files when it
//! is rotated, and the new token must work without a restart. A file that later becomes
//! unreadable keeps its last tokens and logs a warning, rather than locking everyone out.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::Error;

/// How often a token file's metadata is looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// The tokens one group of routes accepts. Empty: no token required.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    literal: Vec<String>,
    files: Vec<TokenFile>,
}

#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    state: Mutex<FileState>,
}

/// A file's modification time and length: a change of either re-reads it.
type Version = (Option<SystemTime>, u64);

#[derive(Debug)]
struct FileState {
    /// The file's version when last read.
    version: Version,
    checked: Instant,
    tokens: Vec<String>,
}

/// Every non-empty line of a token file is a token (surrounding whitespace removed).
fn read_tokens(path: &Path) -> std::io::Result<(Version, Vec<String>)> {
    let metadata = std::fs::metadata(path)?;
    let text = std::fs::read_to_string(path)?;
    let tokens = text
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(((metadata.modified().ok(), metadata.len()), tokens))
}

impl Tokens {
    /// Literal tokens and token files; reads the files now.
    pub(crate) fn new(literal: Vec<String>, files: Vec<PathBuf>) -> Result<Tokens, Error> {
        let files = files
            .into_iter()
            .map(|path| {
                let (version, tokens) = read_tokens(&path).map_err(|source| Error::TokenFile {
                    path: path.clone(),
                    problem: source.to_string(),
                })?;
                if tokens.is_empty() {
                    return Err(Error::TokenFile {
                        path,
                        problem: "it holds no token".into(),
                    });
                }
                let state = Mutex::new(FileState {
                    version,
                    checked: Instant::now(),
                    tokens,
                });
                Ok(TokenFile { path, state })
            })
            .collect::<Result<_, _>>()?;
        Ok(Tokens {
            literal: literal.into_iter().filter(|t| !t.is_empty()).collect(),
            files,
        })
    }

    /// Whether a token is required at all.
    pub(crate) fn required(&self) -> bool {
        !self.literal.is_empty() || !self.files.is_empty()
    }

    /// Whether `given` is one of the tokens (compared in constant time per token).
    pub(crate) fn accepts(&self, given: &str) -> bool {
        let given = given.as_bytes();
        // Every token is compared, so the time does not tell which one (or whether) matched.
        let literal = self
            .literal
            .iter()
            .fold(false, |hit, t| constant_time_eq(given, t.as_bytes()) | hit);
        self.files.iter().fold(literal, |hit, file| {
            let mut state = file.state.lock().unwrap_or_else(|e| e.into_inner());
            file.refresh(&mut state);
            state
                .tokens
                .iter()
                .fold(false, |hit, t| constant_time_eq(given, t.as_bytes()) | hit)
                | hit
        })
    }
}

impl TokenFile {
    fn refresh(&self, state: &mut FileState) {
        if state.checked.elapsed() < RECHECK {
            return;
        }
        state.checked = Instant::now();
        let version = std::fs::metadata(&self.path).map(|m| (m.modified().ok(), m.len()));
        if version.as_ref().is_ok_and(|v| *v == state.version) {
            return;
        }
        match read_tokens(&self.path) {
            Ok((version, tokens)) if !tokens.is_empty() => {
                state.version = version;
                state.tokens = tokens;
            }
            Ok(_) => tracing::warn!(
                "memory exporter: token file {} is now empty; still accepting its previous tokens",
                self.path.display()
            ),
            Err(e) => tracing::warn!(
                "memory exporter: cannot read token file {}: {e}; still accepting its previous \
                 tokens",
                self.path.display()
            ),
        }
    }
}

/// Compares in time independent of where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(tag: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("memexp-token-{tag}-{}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn accepts_any_literal_or_file_token_and_nothing_else() {
        let file = temp_file("several", "from-the-secret\n\n  rotated-next  \n");
        let tokens = Tokens::new(vec!["operator".into()], vec![file.clone()]).unwrap();
        assert!(tokens.required());
        for good in ["operator", "from-the-secret", "rotated-next"] {
            assert!(tokens.accepts(good), "{good}");
        }
        // Wrong tokens of the right length too: one letter changed, two swapped (a comparison
        // that could cancel differences out would let that in).
        for bad in [
            "",
            "operato",
            "operator2",
            "operatoR",
            "opertaor",
            "from-the-secret\nrotated-next",
        ] {
            assert!(!tokens.accepts(bad), "{bad:?}");
        }
        assert!(!Tokens::default().required());
        assert!(Tokens::new(vec!["only-literal".into()], vec![])
            .unwrap()
            .required());
        let only_file = Tokens::new(vec![], vec![file.clone()]).unwrap();
        assert!(only_file.required() && only_file.accepts("rotated-next"));
        // The same token given twice (twice on the command line, twice in a file, or in both)
        // is still accepted.
        let doubled = temp_file("doubled", "same\nsame\n");
        for (literal, files, token) in [
            (vec!["dup", "dup"], vec![], "dup"),
            (vec![], vec![doubled.clone()], "same"),
            (
                vec!["from-the-secret"],
                vec![file.clone()],
                "from-the-secret",
            ),
        ] {
            let literal = literal.into_iter().map(String::from).collect();
            assert!(
                Tokens::new(literal, files).unwrap().accepts(token),
                "{token}"
            );
        }
        std::fs::remove_file(doubled).unwrap();
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn a_rotated_file_is_read_again_and_a_vanished_one_keeps_its_tokens() {
        let file = temp_file("rotated", "old-token\n");
        let tokens = Tokens::new(vec![], vec![file.clone()]).unwrap();
        assert!(tokens.accepts("old-token"));
        std::fs::write(&file, "new-token-of-another-length\n").unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(tokens.accepts("new-token-of-another-length"));
        assert!(!tokens.accepts("old-token"));
        // Emptied (a Secret being rewritten), then gone: the last tokens keep working.
        std::fs::write(&file, "\n").unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(tokens.accepts("new-token-of-another-length"));
        std::fs::remove_file(&file).unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(tokens.accepts("new-token-of-another-length"));
    }

    #[test]
    fn a_missing_or_empty_file_is_refused_at_start_with_its_path() {
        let missing = std::env::temp_dir().join("memexp-token-does-not-exist");
        let error = Tokens::new(vec![], vec![missing.clone()]).unwrap_err();
        assert!(
            error.to_string().contains(&missing.display().to_string()),
            "{error}"
        );
        let empty = temp_file("empty", "\n  \n");
        let error = Tokens::new(vec![], vec![empty.clone()]).unwrap_err();
        assert!(error.to_string().contains("holds no token"), "{error}");
        std::fs::remove_file(empty).unwrap();
    }
}
