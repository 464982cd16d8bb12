//! AMQP topic matching, shared by both engines (the embedded exchanges, and retained messages
//! wherever they are kept): a trie over dot-separated words with `*` (exactly one word) and `#`
//! (zero or more words) nodes. Matching costs one walk per publish, independent of how many
//! bindings exist — no regex per binding.
//!
//! Word splitting follows RabbitMQ: the empty key has no words; `a.` is `["a", ""]`.

use std::collections::HashMap;

pub struct TopicTrie<T> {
    root: Node<T>,
    len: usize,
}

struct Node<T> {
    values: Vec<T>,
    /// The nodes below, in one box, `None` when there are none: most nodes are leaves (a
    /// device's own topic, under a parent with thousands of them), and inline the three maps
    /// were 56 of a leaf's 80 bytes, in its parent's table.
    below: Option<Box<Below<T>>>,
}

struct Below<T> {
    /// foldhash, not SipHash: this is looked up once per word of every routed message.
    words: HashMap<Box<str>, Node<T>, foldhash::fast::RandomState>,
    star: Option<Node<T>>,
    hash: Option<Node<T>>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            values: Vec::new(),
            below: None,
        }
    }
}

impl<T> Default for Below<T> {
    fn default() -> Self {
        Below {
            words: HashMap::default(),
            star: None,
            hash: None,
        }
    }
}

impl<T> Below<T> {
    fn is_empty(&self) -> bool {
        self.words.is_empty() && self.star.is_none() && self.hash.is_none()
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty() && self.below.is_none()
    }
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

/// Splits a key into words; consecutive `#` collapse into one in patterns (`a.#.#.b` ≡
/// `a.#.b`), which keeps matching linear in practice.
fn words(key: &str) -> impl Iterator<Item = &str> {
    let empty = key.is_empty();
    split_ascii(key, b'.').filter(move |_| !empty)
}

/// `s.split(sep)` for an ASCII `sep`, a byte at a time: `str::split(char)` sets up a memchr
/// search per word, which costs more than these short words (callgrind; every routed message
/// and every MQTT delivery splits its key or topic).
pub fn split_ascii(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    debug_assert!(sep.is_ascii());
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.bytes().position(|b| b == sep) {
            // An ASCII byte is a character boundary, so both slices are whole characters.
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

fn pattern_words(pattern: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for w in words(pattern) {
        if w == "#" && out.last() == Some(&"#") {
            continue;
        }
        out.push(w);
    }
    out
}

/// Whether one AMQP topic pattern matches one routing key (the trie answers the other way
/// round: which patterns match a key).
pub fn pattern_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|skip| go(rest, &k[skip..])),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
            Some((w, rest)) => k.first() == Some(w) && go(rest, &k[1..]),
        }
    }
    let key: Vec<&str> = words(key).collect();
    go(&pattern_words(pattern), &key)
}

impl<T> TopicTrie<T> {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Adds `value` under `pattern` unless an equal one (by `same`) is there; returns whether it
    /// was added.
    pub fn insert(&mut self, pattern: &str, value: T, same: impl Fn(&T) -> bool) -> bool {
        let mut node = &mut self.root;
        for w in pattern_words(pattern) {
            let below = node.below.get_or_insert_default();
            node = match w {
                "*" => below.star.get_or_insert_default(),
                "#" => below.hash.get_or_insert_default(),
                w => below.words.entry(w.into()).or_default(),
            };
        }
        if node.values.iter().any(same) {
            return false;
        }
        super::push_snug(&mut node.values, value);
        self.len += 1;
        true
    }

    /// Removes the value under `pattern` for which `same` holds; prunes empty nodes.
    pub fn remove(&mut self, pattern: &str, same: impl Fn(&T) -> bool) -> Option<T> {
        let words = pattern_words(pattern);
        let removed = remove_in(&mut self.root, &words, &same);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Calls `found` for every value whose pattern matches `key` (a value bound under two
    /// matching patterns is reported twice: callers deduplicate destinations).
    pub fn matches<'a>(&'a self, key: &str, mut found: impl FnMut(&'a T)) {
        let words: smallvec::SmallVec<[&str; 8]> = words(key).collect();
        walk(&self.root, &words, &mut found);
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        let mut stack = vec![&self.root];
        let mut out = Vec::new();
        while let Some(node) = stack.pop() {
            out.extend(node.values.iter());
            if let Some(below) = &node.below {
                stack.extend(below.words.values());
                stack.extend(below.star.as_ref());
                stack.extend(below.hash.as_ref());
            }
        }
        out.into_iter()
    }

    /// Keeps only the values for which `keep` holds (used when a queue goes away).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let removed = retain_in(&mut self.root, &mut keep);
        self.len -= removed;
    }
}

fn walk<'a, T>(node: &'a Node<T>, words: &[&str], found: &mut impl FnMut(&'a T)) {
    let below = node.below.as_deref();
    if let Some(hash) = below.and_then(|b| b.hash.as_ref()) {
        // `#` swallows zero or more words: try every suffix.
        for skip in 0..=words.len() {
            walk(hash, &words[skip..], found);
        }
    }
    let Some((first, rest)) = words.split_first() else {
        node.values.iter().for_each(&mut *found);
        return;
    };
    let Some(below) = below else {
        return;
    };
    if let Some(child) = below.words.get(*first) {
        walk(child, rest, found);
    }
    if let Some(star) = &below.star {
        walk(star, rest, found);
    }
}

fn remove_in<T>(node: &mut Node<T>, words: &[&str], same: &impl Fn(&T) -> bool) -> Option<T> {
    let Some((first, rest)) = words.split_first() else {
        let at = node.values.iter().position(same)?;
        return Some(node.values.swap_remove(at));
    };
    let below = node.below.as_deref_mut()?;
    let removed = match *first {
        "*" | "#" => {
            let slot = if *first == "*" {
                &mut below.star
            } else {
                &mut below.hash
            };
            let child = slot.as_mut()?;
            let removed = remove_in(child, rest, same);
            if child.is_empty() {
                *slot = None;
            }
            removed
        }
        w => {
            let child = below.words.get_mut(w)?;
            let removed = remove_in(child, rest, same);
            if child.is_empty() {
                below.words.remove(w);
            }
            removed
        }
    };
    if below.is_empty() {
        node.below = None;
    }
    removed
}

fn retain_in<T>(node: &mut Node<T>, keep: &mut impl FnMut(&T) -> bool) -> usize {
    let before = node.values.len();
    node.values.retain(|v| keep(v));
    let mut removed = before - node.values.len();
    let Some(below) = node.below.as_deref_mut() else {
        return removed;
    };
    below.words.retain(|_, child| {
        removed += retain_in(child, keep);
        !child.is_empty()
    });
    for slot in [&mut below.star, &mut below.hash] {
        if let Some(child) = slot.as_mut() {
            removed += retain_in(child, keep);
            if child.is_empty() {
                *slot = None;
            }
        }
    }
    if below.is_empty() {
        node.below = None;
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_ascii_is_str_split() {
        for s in [
            "",
            ".",
            "a",
            "a.b",
            ".a",
            "a.",
            "a..b",
            "é.ü.€",
            "üé",
            "a.b.c.d.e.f.g.h.i",
        ] {
            let ours: Vec<&str> = split_ascii(s, b'.').collect();
            let std: Vec<&str> = s.split('.').collect();
            assert_eq!(ours, std, "{s:?}");
        }
    }

    fn matching(patterns: &[&str], key: &str) -> Vec<String> {
        let mut trie = TopicTrie::default();
        for p in patterns {
            let owned = p.to_string();
            trie.insert(p, owned.clone(), |v| *v == owned);
        }
        let mut out = Vec::new();
        trie.matches(key, |v| out.push(v.clone()));
        out.sort();
        out
    }

    #[test]
    fn one_pattern_against_one_key() {
        for (pattern, key, hit) in [
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("#", "", true),
            ("*", "", false),
            ("a..b", "a..b", true),
            ("a.*.b", "a..b", true),
            ("#.c", "a.b.c", true),
            ("a.b", "a.b.c", false),
        ] {
            assert_eq!(pattern_matches(pattern, key), hit, "{pattern} ~ {key}");
            let mut trie = TopicTrie::default();
            trie.insert(pattern, 1, |v| *v == 1);
            assert_eq!(matching_one(&trie, key), hit, "trie {pattern} ~ {key}");
        }
    }

    fn matching_one(trie: &TopicTrie<i32>, key: &str) -> bool {
        let mut hit = false;
        trie.matches(key, |_| hit = true);
        hit
    }

    #[test]
    fn star_matches_exactly_one_word() {
        assert_eq!(matching(&["a.*.c"], "a.b.c"), ["a.*.c"]);
        assert!(matching(&["a.*.c"], "a.c").is_empty());
        assert!(matching(&["a.*.c"], "a.b.b.c").is_empty());
        assert_eq!(matching(&["*"], ""), Vec::<String>::new());
        assert_eq!(matching(&["a.*"], "a."), ["a.*"]);
    }

    #[test]
    fn hash_matches_zero_or_more_words() {
        let p = ["#", "a.#", "a.#.c", "#.c", "a.b.#"];
        assert_eq!(matching(&p, "a"), ["#", "a.#"]);
        assert_eq!(matching(&p, "a.c"), ["#", "#.c", "a.#", "a.#.c"]);
        assert_eq!(
            matching(&p, "a.b.x.c"),
            ["#", "#.c", "a.#", "a.#.c", "a.b.#"]
        );
        assert_eq!(matching(&p, ""), ["#"]);
        assert_eq!(matching(&["a.#.#.b"], "a.b"), ["a.#.#.b"]);
    }

    #[test]
    fn literal_and_empty_words() {
        assert_eq!(matching(&["a.b", "a..b", ""], "a..b"), ["a..b"]);
        assert_eq!(matching(&["a.b", "a..b", ""], ""), [""]);
        assert!(matching(&["a.b"], "a.bb").is_empty());
    }

    #[test]
    fn remove_prunes_and_counts() {
        let mut trie = TopicTrie::default();
        assert!(trie.insert("a.*.#", 1, |v| *v == 1));
        assert!(!trie.insert("a.*.#", 1, |v| *v == 1));
        assert!(trie.insert("a.*.#", 2, |v| *v == 2));
        assert_eq!(trie.len(), 2);
        assert_eq!(trie.remove("a.*.#", |v| *v == 1), Some(1));
        assert_eq!(trie.remove("a.*.#", |v| *v == 1), None);
        assert_eq!(trie.remove("a.*.#", |v| *v == 2), Some(2));
        assert!(trie.root.is_empty());
        assert_eq!(trie.len(), 0);
    }

    #[test]
    fn retain_drops_values_everywhere() {
        let mut trie = TopicTrie::default();
        for (i, p) in ["x", "x.*", "#", "x.#.y"].iter().enumerate() {
            trie.insert(p, i, |v| *v == i);
        }
        trie.retain(|v| v % 2 == 0);
        assert_eq!(trie.len(), 2);
        let mut all: Vec<_> = trie.values().copied().collect();
        all.sort();
        assert_eq!(all, [0, 2]);
        trie.retain(|_| false);
        assert!(trie.root.is_empty(), "every node below pruned");
    }
}
