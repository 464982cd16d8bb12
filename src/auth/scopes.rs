//! Scopes → permissions (DESIGN.md §6). The grammar is ours:
//! `{rs}.write:{exchange}/{routing_key}`, `{rs}.read:{exchange}/{binding_key}`,
//! `{rs}.consume:{queue}`, `{rs}.configure:{name}`, `{rs}.tag:administrator|monitoring`, where
//! `{rs}` is `auth.resource_server_id`. Names match as globs (`*` any run, `\*` a literal `*`);
//! keys match as AMQP topic patterns, and a binding key is allowed only when every key it can
//! match is matched by the scope (containment). `{sub}` expands to the percent-encoded subject.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::engine::names::{DEFAULT_EXCHANGE, DEFAULT_EXCHANGE_ALIAS};

/// Every byte outside `[A-Za-z0-9_-]` is encoded, so an expanded subject never adds wildcards,
/// dots or slashes to a scope or a queue name.
/// Stands for the token's subject in a scope (percent-encoded when filled in).
pub const SUBJECT_PLACEHOLDER: &str = "{sub}";

const SUBJECT_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'-');

pub fn encode_subject(subject: &str) -> String {
    utf8_percent_encode(subject, SUBJECT_ESCAPES).to_string()
}

/// Queues the gateway creates for its own clients: reachable by name only by administrators.
const GATEWAY_OWNED: [&str; 6] = [
    "mqtt-subscription-",
    "mqtt-shared-",
    "mqtt-session-",
    "ws-",
    "amq.gen-",
    "amqp-gateway.",
];

pub fn is_gateway_owned(name: &str) -> bool {
    GATEWAY_OWNED.iter().any(|p| name.starts_with(p))
}

/// A name glob: `*` matches any run of characters, `\*` a literal `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(Vec<GlobPart>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum GlobPart {
    Literal(String),
    Any,
}

impl Glob {
    pub fn parse(pattern: &str) -> Glob {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&'*') => {
                    chars.next();
                    lit.push('*');
                }
                '*' => {
                    if !lit.is_empty() {
                        parts.push(GlobPart::Literal(std::mem::take(&mut lit)));
                    }
                    if parts.last() != Some(&GlobPart::Any) {
                        parts.push(GlobPart::Any);
                    }
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(GlobPart::Literal(lit));
        }
        Glob(parts)
    }

    pub fn matches(&self, name: &str) -> bool {
        glob_match(&self.0, name)
    }
}

fn glob_match(parts: &[GlobPart], name: &str) -> bool {
    match parts.split_first() {
        None => name.is_empty(),
        Some((GlobPart::Literal(lit), rest)) => name
            .strip_prefix(lit.as_str())
            .is_some_and(|tail| glob_match(rest, tail)),
        Some((GlobPart::Any, rest)) => {
            // Try every split point; `Any` runs are collapsed, so this stays polynomial.
            name.char_indices()
                .map(|(i, _)| i)
                .chain(std::iter::once(name.len()))
                .any(|i| glob_match(rest, &name[i..]))
        }
    }
}

/// An AMQP topic pattern: dot-separated words, `*` one word, `#` zero or more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern(Vec<Word>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    Literal(String),
    Star,
    Hash,
}

/// A symbol of the alphabet containment is decided over: a literal word, or any word that is
/// none of the literals in play.
#[derive(Clone, Copy)]
enum Symbol<'a> {
    Literal(&'a str),
    Other,
}

impl TopicPattern {
    pub fn parse(pattern: &str) -> TopicPattern {
        let words = if pattern.is_empty() {
            Vec::new()
        } else {
            pattern
                .split('.')
                .map(|w| match w {
                    "*" => Word::Star,
                    "#" => Word::Hash,
                    w => Word::Literal(w.to_owned()),
                })
                .collect()
        };
        TopicPattern(words)
    }

    /// Whether a routing key (literal words only) matches.
    pub fn matches_key(&self, key: &str) -> bool {
        let mut states = self.start();
        if !key.is_empty() {
            for word in key.split('.') {
                states = self.step(&states, Symbol::Literal(word));
                if states.is_empty() {
                    return false;
                }
            }
        }
        states.contains(&self.0.len())
    }

    /// Whether every key `other` matches is matched by `self`. Decided exactly on the product of
    /// both patterns' automata (determinized as state sets) over the literals of both plus one
    /// symbol for "any other word".
    pub fn contains(&self, other: &TopicPattern) -> bool {
        let mut alphabet: Vec<Symbol<'_>> = self
            .0
            .iter()
            .chain(other.0.iter())
            .filter_map(|w| match w {
                Word::Literal(l) => Some(Symbol::Literal(l.as_str())),
                _ => None,
            })
            .collect();
        alphabet.push(Symbol::Other);
        let start = (other.start(), self.start());
        let mut seen = vec![start.clone()];
        let mut todo = vec![start];
        while let Some((b, s)) = todo.pop() {
            if b.contains(&other.0.len()) && !s.contains(&self.0.len()) {
                return false;
            }
            for &sym in &alphabet {
                let nb = other.step(&b, sym);
                if nb.is_empty() {
                    continue;
                }
                let next = (nb, self.step(&s, sym));
                if !seen.contains(&next) {
                    seen.push(next.clone());
                    todo.push(next);
                }
            }
        }
        true
    }

    /// States are positions in the word list; `len` accepts.
    fn start(&self) -> Vec<usize> {
        let mut states = vec![0];
        self.close(&mut states);
        states
    }

    /// `#` may match nothing: a state before a `#` also stands after it.
    fn close(&self, states: &mut Vec<usize>) {
        let mut i = 0;
        while i < states.len() {
            let s = states[i];
            if matches!(self.0.get(s), Some(Word::Hash)) && !states.contains(&(s + 1)) {
                states.push(s + 1);
            }
            i += 1;
        }
        states.sort_unstable();
        states.dedup();
    }

    fn step(&self, states: &[usize], sym: Symbol<'_>) -> Vec<usize> {
        let mut next = Vec::new();
        for &s in states {
            match (self.0.get(s), sym) {
                (Some(Word::Literal(l)), Symbol::Literal(w)) if l == w => next.push(s + 1),
                (Some(Word::Star), _) => next.push(s + 1),
                (Some(Word::Hash), _) => next.push(s),
                _ => {}
            }
        }
        self.close(&mut next);
        next
    }
}

/// One `write` or `read` grant: an exchange glob and a key pattern.
#[derive(Debug, Clone)]
struct Grant {
    exchange: Glob,
    key: TopicPattern,
}

/// What a principal may do, parsed once from its scopes.
#[derive(Debug, Clone, Default)]
pub struct Permissions {
    administrator: bool,
    monitoring: bool,
    write: Vec<Grant>,
    read: Vec<Grant>,
    consume: Vec<Glob>,
    configure: Vec<Glob>,
}

/// Scopes and names use `amq.default` for the default exchange.
fn scope_exchange(exchange: &str) -> &str {
    if exchange == DEFAULT_EXCHANGE {
        DEFAULT_EXCHANGE_ALIAS
    } else {
        exchange
    }
}

impl Permissions {
    /// Parses scopes for `resource_server_id`; scopes for other servers and malformed ones are
    /// ignored (a token may carry scopes for many resource servers).
    pub fn from_scopes<'a>(
        scopes: impl IntoIterator<Item = &'a str>,
        resource_server_id: &str,
        subject: &str,
    ) -> Permissions {
        let encoded = encode_subject(subject);
        let prefix = format!("{resource_server_id}.");
        let mut p = Permissions::default();
        for scope in scopes {
            let Some(scope) = scope.strip_prefix(&prefix) else {
                continue;
            };
            let scope = scope.replace(SUBJECT_PLACEHOLDER, &encoded);
            let Some((kind, rest)) = scope.split_once(':') else {
                continue;
            };
            match kind {
                "write" | "read" => {
                    let Some((exchange, key)) = rest.split_once('/') else {
                        continue;
                    };
                    let grant = Grant {
                        exchange: Glob::parse(exchange),
                        key: TopicPattern::parse(key),
                    };
                    if kind == "write" {
                        p.write.push(grant);
                    } else {
                        p.read.push(grant);
                    }
                }
                "consume" => p.consume.push(Glob::parse(rest)),
                "configure" => p.configure.push(Glob::parse(rest)),
                "tag" => match rest {
                    "administrator" => p.administrator = true,
                    "monitoring" => p.monitoring = true,
                    _ => {}
                },
                _ => {}
            }
        }
        p
    }

    pub fn administrator() -> Permissions {
        Permissions {
            administrator: true,
            ..Permissions::default()
        }
    }

    pub fn is_administrator(&self) -> bool {
        self.administrator
    }

    /// `/metrics` on the HTTP port.
    pub fn can_monitor(&self) -> bool {
        self.administrator || self.monitoring
    }

    /// Grants nothing at all.
    pub fn is_empty(&self) -> bool {
        !self.administrator
            && !self.monitoring
            && self.write.is_empty()
            && self.read.is_empty()
            && self.consume.is_empty()
            && self.configure.is_empty()
    }

    /// Publish to `exchange` with `routing_key`. Default-exchange publishes name a queue: to a
    /// gateway-owned one only administrators may.
    pub fn can_write(&self, exchange: &str, routing_key: &str) -> bool {
        if self.administrator {
            return true;
        }
        let exchange = scope_exchange(exchange);
        if exchange == DEFAULT_EXCHANGE_ALIAS && is_gateway_owned(routing_key) {
            return false;
        }
        self.write
            .iter()
            .any(|g| g.exchange.matches(exchange) && g.key.matches_key(routing_key))
    }

    /// Subscribe to `exchange` with `binding_key`: every key the binding can match must be
    /// allowed.
    pub fn can_read(&self, exchange: &str, binding_key: &str) -> bool {
        if self.administrator {
            return true;
        }
        let exchange = scope_exchange(exchange);
        let wanted = TopicPattern::parse(binding_key);
        self.read
            .iter()
            .any(|g| g.exchange.matches(exchange) && g.key.contains(&wanted))
    }

    /// Consume or `get` a named queue.
    pub fn can_consume(&self, queue: &str) -> bool {
        self.administrator
            || (!is_gateway_owned(queue) && self.consume.iter().any(|g| g.matches(queue)))
    }

    /// Whether an exchange is any business of this principal (listing and inspecting it).
    pub fn can_see_exchange(&self, exchange: &str) -> bool {
        let exchange = scope_exchange(exchange);
        self.administrator
            || self.configure.iter().any(|g| g.matches(exchange))
            || self
                .write
                .iter()
                .chain(self.read.iter())
                .any(|g| g.exchange.matches(exchange))
    }

    /// Declare, delete, bind or purge an exchange or queue by name.
    pub fn can_configure(&self, name: &str) -> bool {
        self.administrator
            || (!is_gateway_owned(name) && self.configure.iter().any(|g| g.matches(name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(scopes: &str, sub: &str) -> Permissions {
        Permissions::from_scopes(scopes.split_whitespace(), "gateway", sub)
    }

    #[test]
    fn globs() {
        let g = Glob::parse("orders-*");
        assert!(g.matches("orders-") && g.matches("orders-eu") && !g.matches("order"));
        assert!(Glob::parse("*").matches(""));
        assert!(Glob::parse("a*b*c").matches("aXbYc") && !Glob::parse("a*b*c").matches("aXbY"));
        let lit = Glob::parse(r"x\*");
        assert!(lit.matches("x*") && !lit.matches("xy"));
        assert!(Glob::parse("exact").matches("exact") && !Glob::parse("exact").matches("exact2"));
    }

    #[test]
    fn key_matching() {
        let p = TopicPattern::parse("sensors.*.temp");
        assert!(p.matches_key("sensors.k1.temp") && !p.matches_key("sensors.temp"));
        assert!(TopicPattern::parse("#").matches_key(""));
        assert!(
            TopicPattern::parse("a.#").matches_key("a")
                && TopicPattern::parse("a.#").matches_key("a.b.c")
        );
        assert!(
            !TopicPattern::parse("").matches_key("a") && TopicPattern::parse("").matches_key("")
        );
    }

    #[test]
    fn containment() {
        let c = |scope: &str, binding: &str| {
            TopicPattern::parse(scope).contains(&TopicPattern::parse(binding))
        };
        assert!(c("news.#", "news.*"));
        assert!(
            !c("news.*", "news.#"),
            "news.# also matches news and news.a.b"
        );
        assert!(c("news.#", "news.#"));
        assert!(c("#", "anything.#.at.*"));
        assert!(
            c("*.#", "#.a"),
            "every key #.a matches has at least one word"
        );
        assert!(!c("*.#", "#"), "# matches the empty key");
        assert!(c("a.*", "a.b"));
        assert!(!c("a.b", "a.*"));
        assert!(c("a.#.z", "a.b.#.z"));
        assert!(!c("a.#.z", "a.b.#"));
        assert!(c("#.x.#", "x"));
        assert!(!c("x.#", "#.x"));
    }

    #[test]
    fn grants() {
        let p = perms(
            "gateway.write:amq.topic/sensors.# gateway.read:amq.topic/news.# \
             gateway.consume:orders-* gateway.configure:tmp-* other.write:*/# gateway.bogus",
            "alice",
        );
        assert!(p.can_write("amq.topic", "sensors.k1"));
        assert!(!p.can_write("amq.topic", "news.x"));
        assert!(!p.can_write("amq.direct", "sensors.k1"));
        assert!(p.can_read("amq.topic", "news.*") && !p.can_read("amq.topic", "#"));
        assert!(p.can_consume("orders-eu") && !p.can_consume("billing"));
        assert!(p.can_configure("tmp-1") && !p.can_configure("orders-eu"));
        assert!(!p.is_administrator() && !p.can_monitor());
        assert!(perms("gateway.tag:monitoring", "m").can_monitor());
        assert!(perms("", "x").is_empty());
    }

    #[test]
    fn subject_expansion_is_encoded() {
        let p = perms(
            "gateway.consume:inbox-{sub} gateway.write:amq.topic/users.{sub}.#",
            "a.b*c/d",
        );
        assert!(p.can_consume("inbox-a%2Eb%2Ac%2Fd"));
        assert!(!p.can_consume("inbox-a.bXc/d"));
        assert!(p.can_write("amq.topic", "users.a%2Eb%2Ac%2Fd.x"));
        assert!(
            !p.can_write("amq.topic", "users.a.b"),
            "a dot in the subject is not a word break"
        );
        assert_eq!(encode_subject("user_1-x"), "user_1-x");
    }

    #[test]
    fn gateway_owned_names_need_an_administrator() {
        let p = perms(
            "gateway.consume:* gateway.configure:* gateway.write:amq.default/#",
            "u",
        );
        assert!(!p.can_consume("ws-u.room"));
        assert!(!p.can_configure("mqtt-subscription-u.c1qos0"));
        assert!(!p.can_write("", "amq.gen-xyz"));
        assert!(p.can_write("amq.default", "plain-queue"));
        let admin = perms("gateway.tag:administrator", "root");
        assert!(admin.can_consume("ws-u.room") && admin.can_write("", "mqtt-session-x"));
    }
}
