//! Class names: how users name a class instead of its index.

use std::collections::HashMap;

mod prompt;
pub use prompt::PromptError;

const IMAGENET_TSV: &str = include_str!("../assets/imagenet_classes.tsv");

/// Every class's names: the first is its label, the rest synonyms.
#[derive(Debug, Clone)]
pub struct ClassNames {
    names: Vec<Vec<String>>,
    lookup: HashMap<String, usize>,
}

fn normalize(s: &str) -> String {
    s.trim()
        .to_lowercase()
        .replace(['_', '-'], " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl ClassNames {
    pub fn new(names: Vec<Vec<String>>) -> Self {
        let mut lookup = HashMap::new();
        // First names win over synonyms; earlier classes over later ones.
        for pass in 0..2 {
            for (i, n) in names.iter().enumerate() {
                let slice = if pass == 0 {
                    &n[..n.len().min(1)]
                } else {
                    n.get(1..).unwrap_or(&[])
                };
                for s in slice {
                    lookup.entry(normalize(s)).or_insert(i);
                }
            }
        }
        Self { names, lookup }
    }

    /// The 1000 ImageNet-1k classes in checkpoint order.
    pub fn imagenet() -> Self {
        let names = IMAGENET_TSV
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let names = l.split('\t').nth(2).unwrap_or("");
                names.split(", ").map(str::to_string).collect()
            })
            .collect();
        Self::new(names)
    }

    /// "class 0" … "class N−1" for a model that ships no names.
    pub fn numbered(n: usize) -> Self {
        Self::new((0..n).map(|i| vec![format!("class {i}")]).collect())
    }

    /// Names from a JSON list (of strings, or of lists of synonyms), as stored in checkpoint
    /// metadata or a side file.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: Vec<serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| format!("class names are not a JSON list: {e}"))?;
        let names = v
            .into_iter()
            .map(|e| match e {
                serde_json::Value::String(s) => Ok(vec![s]),
                serde_json::Value::Array(a) => a
                    .into_iter()
                    .map(|s| {
                        s.as_str()
                            .map(str::to_string)
                            .ok_or("synonyms must be strings")
                    })
                    .collect(),
                _ => Err("each class must be a string or a list of strings"),
            })
            .collect::<Result<Vec<Vec<String>>, _>>()?;
        Ok(Self::new(names))
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn label(&self, i: usize) -> &str {
        self.names
            .get(i)
            .and_then(|n| n.first())
            .map(String::as_str)
            .unwrap_or("")
    }

    pub fn synonyms(&self, i: usize) -> &[String] {
        self.names.get(i).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A class by name or synonym (case and separators ignored), or by its number.
    pub fn resolve(&self, query: &str) -> Option<usize> {
        let q = normalize(query);
        if let Some(&i) = self.lookup.get(&q) {
            return Some(i);
        }
        q.parse::<usize>().ok().filter(|&i| i < self.len())
    }

    /// Up to `max` known names closest to `query`, for "did you mean" errors.
    ///
    /// Bounded whatever the input: only the first [`MAX_MATCH_CHARS`] characters of the query
    /// and of each name are compared, every name is first scored by a cheap lower bound on its
    /// edit distance (the longer length minus the characters the two have in common), and
    /// the exact (banded) Levenshtein distance is computed only for names whose bound can
    /// still beat the best `max` found so far. Against the 1,860 ImageNet names that is a few
    /// dozen exact distances instead of 1,860 (a 64 KB query used to take seconds).
    pub fn close_matches(&self, query: &str, max: usize) -> Vec<String> {
        if max == 0 {
            return Vec::new();
        }
        let q: Vec<char> = normalize(truncate_chars(query, MAX_MATCH_CHARS * 2))
            .chars()
            .take(MAX_MATCH_CHARS)
            .collect();
        let q_text: String = q.iter().collect();
        let q_hist = histogram(&q);
        let mut candidates: Vec<(usize, &String)> = self
            .lookup
            .keys()
            .map(|k| {
                let len = k.chars().take(MAX_MATCH_CHARS).count();
                // A name containing the query (or the reverse) ranks by how much longer it is.
                let contained =
                    !q.is_empty() && (k.contains(q_text.as_str()) || q_text.contains(k.as_str()));
                if contained {
                    return (len.abs_diff(q.len()) / 4, k);
                }
                let mut h = [0u16; 37];
                for c in k.chars().take(MAX_MATCH_CHARS) {
                    h[histogram_bin(c)] = h[histogram_bin(c)].saturating_add(1);
                }
                // At most `common` characters can be matched in any alignment, so every other
                // character of the longer string costs at least one edit.
                let common: usize = h
                    .iter()
                    .zip(&q_hist)
                    .map(|(a, b)| (*a).min(*b) as usize)
                    .sum();
                (len.max(q.len()) - common + CONTAINED_FLAG, k)
            })
            .collect();
        candidates.sort_unstable();
        let mut best: Vec<(usize, &String)> = Vec::with_capacity(max + 1);
        let mut kc: Vec<char> = Vec::with_capacity(MAX_MATCH_CHARS);
        for (bound, k) in candidates {
            let worst = (best.len() == max).then(|| best[max - 1].0);
            let exact = if bound < CONTAINED_FLAG {
                bound
            } else {
                let bound = bound - CONTAINED_FLAG;
                if worst.is_some_and(|w| bound > w) {
                    // Sorted by bound: no later name can do better either.
                    break;
                }
                kc.clear();
                kc.extend(k.chars().take(MAX_MATCH_CHARS));
                match levenshtein_within(&q, &kc, worst.unwrap_or(usize::MAX)) {
                    Some(d) => d,
                    None => continue,
                }
            };
            if worst.is_some_and(|w| exact > w) {
                continue;
            }
            let at = best.partition_point(|&(d, n)| (d, n) <= (exact, k));
            best.insert(at, (exact, k));
            best.truncate(max);
        }
        best.into_iter().map(|(_, k)| k.clone()).collect()
    }
}

/// Characters of a query and of each name that the close-match search compares.
pub const MAX_MATCH_CHARS: usize = 64;

/// Added to the bound of names that do not contain the query, so that containing names (whose
/// score is final) sort first.
const CONTAINED_FLAG: usize = 1 << 40;

fn truncate_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Counts of a–z, 0–9 and everything else (lumping the rest together only overestimates what
/// two strings share, so the bound stays a lower bound).
fn histogram(s: &[char]) -> [u16; 37] {
    let mut h = [0u16; 37];
    for &c in s {
        h[histogram_bin(c)] = h[histogram_bin(c)].saturating_add(1);
    }
    h
}

fn histogram_bin(c: char) -> usize {
    match c {
        'a'..='z' => c as usize - 'a' as usize,
        '0'..='9' => 26 + c as usize - '0' as usize,
        _ => 36,
    }
}

/// Whether `a` and `b` are at most `limit` edits apart (the prompt matcher's typo rule). Cheap
/// whatever the lengths: only `b`'s length plus `limit` + 1 characters of `a` are looked at,
/// and the banded search stops as soon as the limit is passed.
fn within_edits(a: &str, b: &str, limit: usize) -> bool {
    let b: Vec<char> = b.chars().collect();
    let a: Vec<char> = a.chars().take(b.len() + limit + 1).collect();
    levenshtein_within(&a, &b, limit).is_some()
}

/// Levenshtein distance of `a` and `b` if it is at most `limit`; stops as soon as a whole row
/// exceeds the limit.
fn levenshtein_within(a: &[char], b: &[char], limit: usize) -> Option<usize> {
    if a.len().abs_diff(b.len()) > limit {
        return None;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        let mut row_min = cur[0];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
            row_min = row_min.min(cur[j + 1]);
        }
        if row_min > limit {
            return None;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    Some(prev[b.len()]).filter(|&d| d <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_lookup() {
        let c = ClassNames::imagenet();
        assert_eq!(c.len(), 1000);
        assert_eq!(c.label(207), "golden retriever");
        assert_eq!(c.resolve("Golden Retriever"), Some(207));
        assert_eq!(c.resolve("golden_retriever"), Some(207));
        assert_eq!(c.resolve("Tinca tinca"), Some(0));
        assert_eq!(c.resolve("207"), Some(207));
        assert_eq!(c.resolve("1000"), None);
        assert!(c
            .close_matches("golden retreiver", 3)
            .contains(&"golden retriever".to_string()));
    }

    #[test]
    fn close_matches_are_bounded_and_cheap() {
        let c = ClassNames::imagenet();
        assert!(
            c.lookup.len() >= 1800,
            "names and synonyms: {}",
            c.lookup.len()
        );
        assert_eq!(c.close_matches("goldn retriever", 3)[0], "golden retriever");
        assert_eq!(c.close_matches("tabby", 1), vec!["tabby".to_string()]);
        let hostile = [
            "x".repeat(65536),
            "golden retriever ".repeat(4000),
            "\u{1F600}\u{0301}".repeat(20000),
            " ".repeat(65536),
            String::new(),
        ];
        for q in &hostile {
            let t = std::time::Instant::now();
            let m = c.close_matches(q, 5);
            let took = t.elapsed();
            assert_eq!(m.len(), 5);
            // Generous for a debug build on a loaded machine.
            assert!(took.as_millis() < 100, "{} chars took {took:?}", q.len());
        }
        let t = std::time::Instant::now();
        for _ in 0..20 {
            c.close_matches(&hostile[0], 5);
        }
        eprintln!(
            "close_matches, 64 KB query against {} names: {:?} per call",
            c.lookup.len(),
            t.elapsed() / 20
        );
        // The pruned search ranks exactly like scoring every name in full.
        for query in [
            "persain cat",
            "goldn retrever",
            "zebra fish",
            "ambulanse",
            "q",
        ] {
            let q: Vec<char> = query.chars().collect();
            let score = |k: &str| {
                if k.contains(query) || query.contains(k) {
                    k.chars().count().abs_diff(q.len()) / 4
                } else {
                    let kc: Vec<char> = k.chars().collect();
                    levenshtein_within(&q, &kc, usize::MAX).unwrap()
                }
            };
            let mut brute: Vec<(usize, &String)> = c.lookup.keys().map(|k| (score(k), k)).collect();
            brute.sort();
            let want: Vec<String> = brute.iter().take(5).map(|(_, k)| (*k).clone()).collect();
            assert_eq!(c.close_matches(query, 5), want, "{query}");
        }
    }

    #[test]
    fn json_names() {
        let c = ClassNames::from_json(r#"["T-shirt/top", ["Sneaker", "trainer"]]"#).unwrap();
        assert_eq!(c.resolve("sneaker"), Some(1));
        assert_eq!(c.resolve("trainer"), Some(1));
        assert!(ClassNames::from_json("{}").is_err());
    }
}
