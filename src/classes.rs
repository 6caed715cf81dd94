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
    pub fn close_matches(&self, query: &str, max: usize) -> Vec<String> {
        let q = normalize(query);
        let mut scored: Vec<(usize, &String)> = self
            .lookup
            .keys()
            .map(|k| {
                let d = if k.contains(&q) || q.contains(k.as_str()) {
                    k.len().abs_diff(q.len()) / 4
                } else {
                    levenshtein(&q, k)
                };
                (d, k)
            })
            .collect();
        scored.sort();
        scored
            .into_iter()
            .take(max)
            .map(|(_, k)| k.clone())
            .collect()
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
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
    fn json_names() {
        let c = ClassNames::from_json(r#"["T-shirt/top", ["Sneaker", "trainer"]]"#).unwrap();
        assert_eq!(c.resolve("sneaker"), Some(1));
        assert_eq!(c.resolve("trainer"), Some(1));
        assert!(ClassNames::from_json("{}").is_err());
    }
}
