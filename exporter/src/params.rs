//! Query-string parsing for the debug routes: strict, so that typos and hostile input get a
//! 400 with a message instead of being ignored or reaching anything else. Fuzzed
//! (`fuzz/fuzz_targets/query_params.rs`).

use crate::profiling::ProfileError;

/// Parsed query parameters; unknown ones are refused so typos do not pass silently.
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(query: Option<&str>, allowed: &[&str]) -> Result<Query, ProfileError> {
        let mut params = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (key, value) = (percent_decode(key)?, percent_decode(value)?);
            if !allowed.contains(&key.as_str()) {
                return Err(ProfileError::BadRequest(format!(
                    "unknown parameter {key:?}; this route takes {}",
                    if allowed.is_empty() {
                        "none".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                )));
            }
            // The same value twice is tolerated: Parca and Alloy append `seconds=` to a
            // configured parameter list they share between targets.
            match params.iter().find(|(k, _): &&(String, String)| *k == key) {
                Some((_, first)) if *first == value => {}
                Some(_) => {
                    return Err(ProfileError::BadRequest(format!(
                        "parameter {key:?} given twice with different values"
                    )))
                }
                None => params.push((key, value)),
            }
        }
        Ok(Query(params))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn percent_decode(text: &str) -> Result<String, ProfileError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ProfileError::BadRequest(format!("bad percent-encoding in {text:?}"))
                    })?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| ProfileError::BadRequest(format!("{text:?} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_refuses_what_it_must() {
        let q = Query::parse(Some("format=svg&seconds=%33%30"), &["format", "seconds"]).unwrap();
        assert_eq!(
            (q.get("format"), q.get("seconds")),
            (Some("svg"), Some("30"))
        );
        for bad in [
            "x=1",
            "format=%zz",
            "format=%+1",
            "format=%",
            "format=%ff",
            "format=a&format=b",
        ] {
            assert!(Query::parse(Some(bad), &["format"]).is_err(), "{bad}");
        }
        assert!(Query::parse(None, &[]).unwrap().get("x").is_none());
        let plus = Query::parse(Some("probe=a+b%2Bc"), &["probe"]).unwrap();
        assert_eq!(plus.get("probe"), Some("a b+c"), "+ is a space, %2B a plus");
        let repeated = Query::parse(Some("seconds=14&seconds=14"), &["seconds"]).unwrap();
        assert_eq!(repeated.get("seconds"), Some("14"));
    }
}
