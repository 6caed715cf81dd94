//! Free-text prompts to classes, the way a person means them: "sneakers", "a photo of a red
//! sneaker", "TSHIRT!" all name a class. OpenAI clients send sentences, not labels.
//!
//! Order of attempts, first success wins:
//! 1. the whole prompt as a label, synonym or number ([`ClassNames::resolve`]);
//! 2. every class name or synonym found anywhere in the text, word by word, with plurals, case
//!    and punctuation ignored; a name also matches written as one word ("tshirt" for "T-shirt").
//!    A match inside a longer one is dropped ("shirt" inside "t shirt"), then the matches with
//!    the most words win; if they still name several classes the prompt is ambiguous;
//! 3. a single word one typo away from exactly one class's name ("sneeker").
//!
//! Numbers inside a sentence are never labels: "2 sneakers" is class Sneaker, not class 2.

use std::collections::{BTreeSet, HashSet};

use super::{within_edits, ClassNames};

/// Why a prompt names no single class.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromptError {
    #[error("the prompt is empty; name a class (GET /v1/classes lists them)")]
    Empty,
    #[error("the prompt names several classes: {}; name one of them", .0.join(", "))]
    Ambiguous(Vec<String>),
    #[error("no class named in the prompt; close matches: {}", .0.join(", "))]
    NoMatch(Vec<String>),
}

/// Words shorter than this are never corrected as typos: too many short names are one edit
/// apart ("bag" / "bat").
const MIN_TYPO_LEN: usize = 5;

/// A word without its plural ending, so that "sneakers" meets "sneaker" and "dresses" meets
/// "dress". Applied to both sides, so an odd stem ("bus" stays "bus") is harmless.
fn singular(w: &str) -> String {
    let n = w.len();
    if n <= 3 || !w.is_ascii() {
        return w.to_string();
    }
    if let Some(stem) = w.strip_suffix("ies") {
        return format!("{stem}y");
    }
    if w.ends_with("sses") {
        return w[..n - 2].to_string();
    }
    if ["ches", "shes", "xes", "zes"]
        .iter()
        .any(|s| w.ends_with(s))
    {
        return w[..n - 2].to_string();
    }
    if ["ss", "us", "is"].iter().any(|s| w.ends_with(s)) {
        return w.to_string();
    }
    w.strip_suffix('s').unwrap_or(w).to_string()
}

/// Lower-case words, split at anything that is not a letter or digit, each made singular.
fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(singular)
        .collect()
}

/// One name found in the prompt: which class, which words of the prompt, how many words long.
#[derive(Debug, Clone, Copy)]
struct Found {
    class: usize,
    start: usize,
    end: usize,
    words: usize,
}

impl Found {
    fn inside(&self, other: &Found) -> bool {
        other.start <= self.start && self.end <= other.end && other.words > self.words
    }
}

impl ClassNames {
    /// The class a free-text prompt names (see the module docs for the rules).
    pub fn match_prompt(&self, prompt: &str) -> Result<usize, PromptError> {
        if prompt.trim().is_empty() {
            return Err(PromptError::Empty);
        }
        if let Some(i) = self.resolve(prompt) {
            return Ok(i);
        }
        let text = words(prompt);
        if text.is_empty() {
            return Err(PromptError::NoMatch(self.close_matches(prompt, 5)));
        }
        let found = self.find_names(&text);
        if !found.is_empty() {
            return self.best_of(&found);
        }
        if let Some(i) = self.one_typo_away(&text) {
            return Ok(i);
        }
        Err(PromptError::NoMatch(self.close_matches(prompt, 5)))
    }

    /// Every occurrence of every name in the prompt's words.
    fn find_names(&self, text: &[String]) -> Vec<Found> {
        let present: HashSet<&str> = text.iter().map(String::as_str).collect();
        let mut found = Vec::new();
        for (class, names) in self.names.iter().enumerate() {
            for name in names {
                let name_words = words(name);
                let Some(first) = name_words.first() else {
                    continue;
                };
                // A multi-word name written as one word: "tshirt", "golden-retriever" aside.
                if name_words.len() > 1 {
                    let joined = singular(&name_words.concat());
                    if present.contains(joined.as_str()) {
                        for (k, w) in text.iter().enumerate() {
                            if *w == joined {
                                found.push(Found {
                                    class,
                                    start: k,
                                    end: k + 1,
                                    words: name_words.len(),
                                });
                            }
                        }
                    }
                }
                if !present.contains(first.as_str()) || name_words.len() > text.len() {
                    continue;
                }
                for start in 0..=text.len() - name_words.len() {
                    if text[start..start + name_words.len()] == name_words[..] {
                        found.push(Found {
                            class,
                            start,
                            end: start + name_words.len(),
                            words: name_words.len(),
                        });
                    }
                }
            }
        }
        found
    }

    /// Drops matches inside longer ones, keeps the longest, and asks for one class.
    fn best_of(&self, found: &[Found]) -> Result<usize, PromptError> {
        let outer: Vec<&Found> = found
            .iter()
            .filter(|f| !found.iter().any(|g| f.inside(g)))
            .collect();
        let longest = outer.iter().map(|f| f.words).max().unwrap_or(0);
        let classes: BTreeSet<usize> = outer
            .iter()
            .filter(|f| f.words == longest)
            .map(|f| f.class)
            .collect();
        match classes.len() {
            1 => Ok(*classes.iter().next().unwrap_or(&0)),
            _ => Err(PromptError::Ambiguous(
                classes.iter().map(|&c| self.label(c).to_string()).collect(),
            )),
        }
    }

    /// A word of the prompt one edit away from a one-word name, if exactly one class has such
    /// a name.
    fn one_typo_away(&self, text: &[String]) -> Option<usize> {
        let mut classes = BTreeSet::new();
        for (class, names) in self.names.iter().enumerate() {
            for name in names {
                let name_words = words(name);
                let joined = singular(&name_words.concat());
                if joined.chars().count() < MIN_TYPO_LEN {
                    continue;
                }
                if text
                    .iter()
                    .any(|w| w.chars().count() >= MIN_TYPO_LEN && within_edits(w, &joined, 1))
                {
                    classes.insert(class);
                }
            }
        }
        (classes.len() == 1).then(|| *classes.iter().next().unwrap_or(&0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmnist() -> ClassNames {
        ClassNames::from_json(
            r#"[["T-shirt/top", "T-shirt", "top", "tee"], ["Trouser", "trousers", "pants"],
                ["Pullover", "sweater", "jumper"], ["Dress"], ["Coat", "jacket"], ["Sandal"],
                ["Shirt"], ["Sneaker", "trainer"], ["Bag", "handbag"], ["Ankle boot", "boot"]]"#,
        )
        .unwrap()
    }

    #[test]
    fn prompts_as_people_write_them() {
        let c = fmnist();
        for (prompt, want) in [
            ("sneakers", 7),
            ("Sneakers!", 7),
            ("a photo of a red sneaker", 7),
            ("boots", 9),
            ("a pair of ankle boots, studio light", 9),
            ("tshirt", 0),
            ("T-SHIRTS", 0),
            ("a t-shirt", 0),
            ("a striped shirt", 6),
            ("two handbags", 8),
            ("dresses", 3),
            ("7", 7),
            ("2 sneakers", 7),
            ("a sneeker", 7),
        ] {
            assert_eq!(c.match_prompt(prompt), Ok(want), "{prompt}");
        }
    }

    #[test]
    fn ambiguity_and_no_match_are_errors_with_candidates() {
        let c = fmnist();
        match c.match_prompt("a dress and a coat") {
            Err(PromptError::Ambiguous(names)) => assert_eq!(names, ["Dress", "Coat"]),
            other => panic!("{other:?}"),
        }
        // A longer match beats a shorter one of another class even when apart.
        assert_eq!(c.match_prompt("an ankle boot next to a bag"), Ok(9));
        match c.match_prompt("a golden retriever") {
            Err(PromptError::NoMatch(close)) => assert_eq!(close.len(), 5),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.match_prompt("  "), Err(PromptError::Empty));
        assert!(matches!(
            c.match_prompt("!!!"),
            Err(PromptError::NoMatch(_))
        ));
    }

    #[test]
    fn imagenet_sentences() {
        let c = ClassNames::imagenet();
        assert_eq!(c.match_prompt("a photo of a golden retriever"), Ok(207));
        assert_eq!(c.match_prompt("Golden Retrievers playing"), Ok(207));
        assert_eq!(c.match_prompt("a tench in a net"), Ok(0));
        assert!(c.match_prompt("").is_err());
    }

    #[test]
    fn singular_forms() {
        for (w, s) in [
            ("sneakers", "sneaker"),
            ("dresses", "dress"),
            ("dress", "dress"),
            ("boxes", "box"),
            ("puppies", "puppy"),
            ("bus", "bus"),
            ("shoes", "shoe"),
            ("ox", "ox"),
        ] {
            assert_eq!(singular(w), s);
        }
    }
}
