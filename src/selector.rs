//! Calico's label selector language (the `selector`, `namespaceSelector` and `nodeSelector`
//! strings of Calico resources): parsing, evaluation against a set of labels, and the canonical
//! rendering upstream stores and compares.
//!
//! Owns: the grammar and its errors, the meaning of every operator on present and missing labels,
//! and the canonical text. All of it follows libcalico-go's `lib/selector` (`tokenizer/tokenizer.go`,
//! `parser/parser.go`, `parser/ast.go`, `parser/stringset.go`, `selector.go`), checked against its
//! tests; where this module departs from upstream it says so below.
//! Must not: do I/O, read the clock, panic on any input, or recurse without bound (nesting is
//! capped at [`MAX_NESTING`]); nothing here allocates while evaluating.
//!
//! # The language, as upstream implements it
//!
//! * Terms: `all()`, `global()`, `has(key)`, `key == "v"`, `key != "v"`, `key in {"a", "b"}`,
//!   `key not in {...}`, `key contains "s"`, `key starts with "s"`, `key ends with "s"`; `!term`,
//!   `a && b`, `a || b` and parentheses. `!` binds tightest, then `&&`, then `||`.
//! * An empty or blank selector is `all()`.
//! * Blanks are spaces and tabs only: a newline (or any other character) outside a string is an
//!   error. Upstream's `Normalise` trims surrounding whitespace before parsing; its `Parse` does
//!   not, and neither does [`Selector::parse`].
//! * A key is one or more of `a-z A-Z 0-9 _ . / -`, at most [`MAX_KEY_LEN`] bytes, with no further
//!   structure (`-a`, `/` and `a//b` are keys). Keywords are not reserved: `has == "x"` and
//!   `contains contains "contains"` compare the labels `has` and `contains`. `has(`, `all(` and
//!   `global(` must be written without a blank before the `(`.
//! * A string is `"..."` or `'...'` with no escapes; it may hold the other quote, and anything else
//!   (newlines included).
//! * The word operators need a word break after them (`a instance` is an error) but not before a
//!   following string or set; the two-word ones may be written as one word or with several blanks
//!   between the words (`startswith`, `ends  with`, `notin`).
//! * A set may be empty (`{}`) and may end with a comma (`{"a",}`); duplicates are dropped.
//! * A run of `!` collapses to its parity: `!!has(a)` is `has(a)`.
//!
//! # Meaning on missing labels
//!
//! `key != "v"` and `key not in {...}` are true when `key` is absent; `==`, `in`, `contains`,
//! `starts with` and `ends with` are false when it is absent. `contains ""`, `starts with ""`
//! and `ends with ""` are true for any present value.
//!
//! `global()` matches every label set, exactly like `all()`: upstream's evaluator does not
//! special-case it. Its meaning lives outside the selector: in a rule's `namespaceSelector` Calico
//! rewrites `global()` to `!has(projectcalico.org/namespace)` (non-namespaced endpoints and
//! network sets; `syncersv1/updateprocessors/rules.go`), and the v3 validator accepts it there
//! only on its own. Callers that need that meaning must apply it themselves.
//!
//! # Canonical form ([`Display`](fmt::Display))
//!
//! Upstream's `Selector.String()`: `all()`, `global()`, `has(k)`; `k == "v"` with single spaces
//! around the operator (`contains`, `starts with`, `ends with` likewise); a value is quoted with
//! `"` unless it contains `"`, then with `'`; sets are sorted (bytewise) and deduplicated,
//! `k in {"a", "b"}`; `!` is written directly before its operand; every `&&` or `||` group is
//! wrapped in one pair of parentheses, `(a && b)`, also at the top level and when nested in a
//! group of the same kind (`a && b && c` is one group, `(a && b) && c` two); other parentheses
//! are dropped. A blank selector renders as `all()`.
//!
//! Upstream's rendering is not always a fixed point, and this module keeps that: `!(!has(a))`
//! renders as `!!has(a)`, which reparses as `has(a)` (the same meaning). Apart from a `!`
//! directly over another `!`, reparsing the canonical form gives back the same selector.
//!
//! # Departures from upstream
//!
//! * Nesting deeper than [`MAX_NESTING`] parentheses is an error (upstream has no limit).
//! * Errors carry a position and a message of our own; which inputs are errors is upstream's.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The longest key accepted, in bytes: upstream's tokenizer limit (`MaxLabelLength`).
pub const MAX_KEY_LEN: usize = 512;

/// The deepest parenthesis nesting accepted. Real selectors nest a few levels; this bound keeps
/// the recursive parser, evaluator, renderer and destructor of a hostile selector within a small
/// stack: the deepest one accepted took about 450 KiB to parse and 220 KiB to render in a debug
/// build (measured; optimised code needs less), under a quarter of the 2 MiB a std or tokio
/// thread gets. `deepest_selector_fits_a_small_stack` runs it on 768 KiB.
pub const MAX_NESTING: usize = 128;

/// A parsed selector. Two are equal when their trees are, which is when their canonical forms
/// are (upstream's `Equal` compares a hash of that form).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Selector {
    root: Node,
}

/// Why a selector did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector at character {position}: {message}")]
pub struct SelectorError {
    /// Where the problem was found: a 0-based index in characters (not bytes) into the input; the
    /// input's length in characters when it ended too early.
    pub position: usize,
    pub message: String,
}

impl Selector {
    /// Parses a selector; a blank one is `all()`.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        parse(text).map_err(|(at, message)| SelectorError { position: char_index(text, at), message })
    }

    /// Whether a set of labels matches: `labels` returns a label's value, `None` when absent.
    pub fn matches<'a>(&self, labels: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.root.matches(&labels)
    }

    /// [`matches`](Self::matches) on a map of labels.
    pub fn matches_map(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches(|key| labels.get(key).map(String::as_str))
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Selector, SelectorError> {
        Selector::parse(text)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt(f)
    }
}

// ---------------------------------------------------------------------------------------------
// The tree and its meaning.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum CompareOp {
    Eq,
    Ne,
    Contains,
    StartsWith,
    EndsWith,
}

impl CompareOp {
    /// The operator as the canonical form writes it, with its surrounding spaces.
    fn spaced(self) -> &'static str {
        match self {
            CompareOp::Eq => " == ",
            CompareOp::Ne => " != ",
            CompareOp::Contains => " contains ",
            CompareOp::StartsWith => " starts with ",
            CompareOp::EndsWith => " ends with ",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Node {
    All,
    Global,
    Has(Box<str>),
    Compare { key: Box<str>, op: CompareOp, value: Box<str> },
    /// `values` is sorted and free of duplicates, so lookups are binary searches and equal sets
    /// compare equal.
    In { key: Box<str>, values: Box<[Box<str>]>, negated: bool },
    Not(Box<Node>),
    /// Two or more operands, as the parser never builds a group of one.
    And(Box<[Node]>),
    Or(Box<[Node]>),
}

impl Node {
    fn matches<'a, F: Fn(&str) -> Option<&'a str>>(&self, labels: &F) -> bool {
        match self {
            Node::All | Node::Global => true,
            Node::Has(key) => labels(key).is_some(),
            Node::Compare { key, op, value } => {
                let value: &str = value;
                match (op, labels(key)) {
                    (CompareOp::Ne, found) => found != Some(value),
                    (_, None) => false,
                    (CompareOp::Eq, Some(found)) => found == value,
                    (CompareOp::Contains, Some(found)) => found.contains(value),
                    (CompareOp::StartsWith, Some(found)) => found.starts_with(value),
                    (CompareOp::EndsWith, Some(found)) => found.ends_with(value),
                }
            }
            Node::In { key, values, negated } => {
                let member = labels(key).is_some_and(|found| values.binary_search_by(|v| (**v).cmp(found)).is_ok());
                member != *negated
            }
            Node::Not(operand) => !operand.matches(labels),
            Node::And(operands) => operands.iter().all(|operand| operand.matches(labels)),
            Node::Or(operands) => operands.iter().any(|operand| operand.matches(labels)),
        }
    }
}

/// A value in the quote the canonical form gives it: `"` unless the value holds one.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let quote = if self.0.contains('"') { '\'' } else { '"' };
        write!(f, "{quote}{}{quote}", self.0)
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = |f: &mut fmt::Formatter<'_>, operands: &[Node], joiner: &str| {
            f.write_str("(")?;
            for (i, operand) in operands.iter().enumerate() {
                if i > 0 {
                    f.write_str(joiner)?;
                }
                operand.fmt(f)?;
            }
            f.write_str(")")
        };
        match self {
            Node::All => f.write_str("all()"),
            Node::Global => f.write_str("global()"),
            Node::Has(key) => write!(f, "has({key})"),
            Node::Compare { key, op, value } => write!(f, "{key}{}{}", op.spaced(), Quoted(value)),
            Node::In { key, values, negated } => {
                write!(f, "{key} {} {{", if *negated { "not in" } else { "in" })?;
                for (i, value) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    Quoted(value).fmt(f)?;
                }
                f.write_str("}")
            }
            Node::Not(operand) => {
                f.write_str("!")?;
                operand.fmt(f)
            }
            Node::And(operands) => group(f, operands, " && "),
            Node::Or(operands) => group(f, operands, " || "),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens. The whole input is tokenized before parsing, as upstream does, so that a lexical error
// anywhere wins over a grammar error before it (the same inputs fail, with the same kind of
// message).

/// An error before it is placed: the byte offset and the message.
type Failure = (usize, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Key(&'a str),
    Str(&'a str),
    /// `has(key)`, lexed whole.
    Has(&'a str),
    All,
    Global,
    Compare(CompareOp),
    In,
    NotIn,
    Not,
    And,
    Or,
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    End,
}

impl fmt::Display for Tok<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Key(key) => write!(f, "label {key:?}"),
            Tok::Str(value) => write!(f, "string {value:?}"),
            Tok::Has(key) => write!(f, "has({key})"),
            Tok::All => f.write_str("all()"),
            Tok::Global => f.write_str("global()"),
            Tok::Compare(op) => write!(f, "'{}'", op.spaced().trim()),
            Tok::In => f.write_str("'in'"),
            Tok::NotIn => f.write_str("'not in'"),
            Tok::Not => f.write_str("'!'"),
            Tok::And => f.write_str("'&&'"),
            Tok::Or => f.write_str("'||'"),
            Tok::LParen => f.write_str("'('"),
            Tok::RParen => f.write_str("')'"),
            Tok::LBrace => f.write_str("'{'"),
            Tok::RBrace => f.write_str("'}'"),
            Tok::Comma => f.write_str("','"),
            Tok::End => f.write_str("end of selector"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    tok: Tok<'a>,
    /// Byte offset of the token's first character.
    at: usize,
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-')
}

fn skip_blanks(bytes: &[u8], mut pos: usize) -> usize {
    while matches!(bytes.get(pos), Some(b' ' | b'\t')) {
        pos += 1;
    }
    pos
}

/// The word operators that may follow a key, tried in this order (`not in` before `in`).
const WORD_OPERATORS: [(&[&str], Tok<'static>); 5] = [
    (&["contains"], Tok::Compare(CompareOp::Contains)),
    (&["starts", "with"], Tok::Compare(CompareOp::StartsWith)),
    (&["ends", "with"], Tok::Compare(CompareOp::EndsWith)),
    (&["not", "in"], Tok::NotIn),
    (&["in"], Tok::In),
];

/// The end of `words` written at `pos`, or `None`. Blanks may follow each word of a two-word
/// operator, including the last (they are skipped before the word-break check, as upstream
/// does); a one-word operator must be followed directly by a non-key character.
fn cut_words(bytes: &[u8], mut pos: usize, words: &[&str]) -> Option<usize> {
    for word in words {
        if !bytes.get(pos..)?.starts_with(word.as_bytes()) {
            return None;
        }
        pos += word.len();
        if words.len() > 1 {
            pos = skip_blanks(bytes, pos);
        }
    }
    match bytes.get(pos) {
        Some(&b) if is_key_byte(b) => None,
        _ => Some(pos),
    }
}

/// The end of the key that starts at `pos`.
fn cut_key(text: &str, pos: usize) -> Result<usize, Failure> {
    let bytes = text.as_bytes();
    let len = bytes.get(pos..).unwrap_or_default().iter().take_while(|&&b| is_key_byte(b)).count();
    if len == 0 {
        return Err(match text.get(pos..).and_then(|rest| rest.chars().next()) {
            Some(c) => (pos, format!("expected a label key, found {c:?}")),
            None => (pos, "expected a label key, found end of selector".to_owned()),
        });
    }
    if len > MAX_KEY_LEN {
        return Err((pos, format!("label key is {len} bytes long, longer than the {MAX_KEY_LEN} allowed")));
    }
    Ok(pos + len)
}

/// `name(` followed by blanks and `)`: the end of the call, or an error; `None` when the text at
/// `pos` does not start with `name(`.
fn cut_empty_call(bytes: &[u8], pos: usize, name: &str) -> Option<Result<usize, Failure>> {
    let rest = bytes.get(pos..)?;
    if !(rest.starts_with(name.as_bytes()) && rest.get(name.len()) == Some(&b'(')) {
        return None;
    }
    let close = skip_blanks(bytes, pos + name.len() + 1);
    Some(if bytes.get(close) == Some(&b')') {
        Ok(close + 1)
    } else {
        Err((close, format!("expected ')' to close {name}(")))
    })
}

fn tokenize(text: &str) -> Result<Vec<Token<'_>>, Failure> {
    let bytes = text.as_bytes();
    let mut tokens: Vec<Token<'_>> = Vec::new();
    let mut pos = 0;
    loop {
        pos = skip_blanks(bytes, pos);
        let at = pos;
        let Some(&first) = bytes.get(pos) else {
            tokens.push(Token { tok: Tok::End, at });
            return Ok(tokens);
        };
        let next = bytes.get(pos + 1).copied();
        let after_key = matches!(tokens.last(), Some(Token { tok: Tok::Key(_), .. }));
        let (tok, end) = match first {
            b'(' => (Tok::LParen, pos + 1),
            b')' => (Tok::RParen, pos + 1),
            b'{' => (Tok::LBrace, pos + 1),
            b'}' => (Tok::RBrace, pos + 1),
            b',' => (Tok::Comma, pos + 1),
            b'"' | b'\'' => {
                let body = pos + 1;
                // Both quotes are ASCII, so the slice below ends on a character boundary.
                let Some(len) = bytes[body..].iter().position(|&b| b == first) else {
                    return Err((at, format!("unterminated string: no closing {}", first as char)));
                };
                (Tok::Str(&text[body..body + len]), body + len + 1)
            }
            b'=' if next == Some(b'=') => (Tok::Compare(CompareOp::Eq), pos + 2),
            b'=' => return Err((at, "expected '==', found a single '='".to_owned())),
            b'!' if next == Some(b'=') => (Tok::Compare(CompareOp::Ne), pos + 2),
            b'!' => (Tok::Not, pos + 1),
            b'&' if next == Some(b'&') => (Tok::And, pos + 2),
            b'&' => return Err((at, "expected '&&', found a single '&'".to_owned())),
            b'|' if next == Some(b'|') => (Tok::Or, pos + 2),
            b'|' => return Err((at, "expected '||', found a single '|'".to_owned())),
            _ if after_key => {
                let found = WORD_OPERATORS.iter().find_map(|(words, tok)| Some((*tok, cut_words(bytes, pos, words)?)));
                match found {
                    Some(found) => found,
                    None => {
                        let key = match tokens.last() {
                            Some(Token { tok: Tok::Key(key), .. }) => key,
                            _ => "",
                        };
                        return Err((at, format!("expected an operator after label {key:?}")));
                    }
                }
            }
            _ => {
                if bytes[pos..].starts_with(b"has(") {
                    let start = skip_blanks(bytes, pos + 4);
                    let key_end = cut_key(text, start)?;
                    let close = skip_blanks(bytes, key_end);
                    if bytes.get(close) != Some(&b')') {
                        return Err((close, "expected ')' to close has(".to_owned()));
                    }
                    (Tok::Has(&text[start..key_end]), close + 1)
                } else if let Some(call) = cut_empty_call(bytes, pos, "all") {
                    (Tok::All, call?)
                } else if let Some(call) = cut_empty_call(bytes, pos, "global") {
                    (Tok::Global, call?)
                } else {
                    let end = cut_key(text, pos)?;
                    (Tok::Key(&text[pos..end]), end)
                }
            }
        };
        tokens.push(Token { tok, at });
        pos = end;
    }
}

// ---------------------------------------------------------------------------------------------
// Grammar, by recursive descent over the tokens:
//
//   selector  := blank | or End
//   or        := and ('||' and)*
//   and       := operation ('&&' operation)*
//   operation := '!'* (has | all() | global() | key op string | key [not] in set | '(' or ')')
//   set       := '{' (string (',' string)* ','?)? '}'

fn parse(text: &str) -> Result<Selector, Failure> {
    let tokens = tokenize(text)?;
    let mut parser = Parser { tokens: &tokens, next: 0, depth: 0, end: text.len() };
    if parser.peek().tok == Tok::End {
        return Ok(Selector { root: Node::All });
    }
    let root = parser.or()?;
    let left = parser.peek();
    if left.tok != Tok::End {
        return Err(unexpected(left.at, left.tok, " after a complete expression"));
    }
    Ok(Selector { root })
}

struct Parser<'t, 'a> {
    tokens: &'t [Token<'a>],
    next: usize,
    /// Parentheses open around the token being parsed.
    depth: usize,
    /// The input's length: where `End` is when the tokens run out.
    end: usize,
}

impl<'a> Parser<'_, 'a> {
    fn peek(&self) -> Token<'a> {
        self.tokens.get(self.next).copied().unwrap_or(Token { tok: Tok::End, at: self.end })
    }

    /// The current token, moving past it (never past `End`).
    fn bump(&mut self) -> Token<'a> {
        let token = self.peek();
        if token.tok != Tok::End {
            self.next += 1;
        }
        token
    }

    fn eat(&mut self, tok: Tok<'_>) -> bool {
        let found = self.peek().tok == tok;
        if found {
            self.next += 1;
        }
        found
    }

    fn or(&mut self) -> Result<Node, Failure> {
        self.group(Tok::Or, Parser::and, Node::Or)
    }

    fn and(&mut self) -> Result<Node, Failure> {
        self.group(Tok::And, Parser::operation, Node::And)
    }

    /// One operand, or two or more joined by `joiner` into one node.
    fn group(
        &mut self,
        joiner: Tok<'static>,
        operand: fn(&mut Self) -> Result<Node, Failure>,
        build: fn(Box<[Node]>) -> Node,
    ) -> Result<Node, Failure> {
        let first = operand(self)?;
        if !self.eat(joiner) {
            return Ok(first);
        }
        let mut operands = vec![first];
        loop {
            operands.push(operand(self)?);
            if !self.eat(joiner) {
                return Ok(build(operands.into_boxed_slice()));
            }
        }
    }

    // The recursion runs operation -> primary -> parenthesised -> or -> group -> and -> group ->
    // operation; the functions on it keep their frames small (errors are built out of line), as
    // a debug build gives every temporary of a function its own stack slot.

    fn operation(&mut self) -> Result<Node, Failure> {
        let mut negated = false;
        while self.eat(Tok::Not) {
            negated = !negated;
        }
        let node = self.primary()?;
        Ok(if negated { Node::Not(Box::new(node)) } else { node })
    }

    fn primary(&mut self) -> Result<Node, Failure> {
        let Token { tok, at } = self.bump();
        match tok {
            Tok::Has(key) => Ok(Node::Has(key.into())),
            Tok::All => Ok(Node::All),
            Tok::Global => Ok(Node::Global),
            Tok::Key(key) => self.comparison(key),
            Tok::LParen => self.parenthesised(at),
            other => Err(unexpected(at, other, "")),
        }
    }

    /// The inside of a `(` at byte `at`, and its `)`.
    fn parenthesised(&mut self, at: usize) -> Result<Node, Failure> {
        if self.depth == MAX_NESTING {
            return Err(too_deep(at));
        }
        self.depth += 1;
        let inner = self.or()?;
        let close = self.bump();
        if close.tok != Tok::RParen {
            return Err(unclosed(close));
        }
        self.depth -= 1;
        Ok(inner)
    }

    /// What follows `key`: an operator and its string or set.
    fn comparison(&mut self, key: &str) -> Result<Node, Failure> {
        let operator = self.bump();
        let op = match operator.tok {
            Tok::Compare(op) => op,
            Tok::In | Tok::NotIn => return self.set(key, operator.tok == Tok::NotIn),
            other => return Err((operator.at, format!("expected an operator after label {key:?}, found {other}"))),
        };
        let value = self.bump();
        match value.tok {
            Tok::Str(value) => Ok(Node::Compare { key: key.into(), op, value: value.into() }),
            other => Err((value.at, format!("expected a quoted string after {}, found {other}", operator.tok))),
        }
    }

    fn set(&mut self, key: &str, negated: bool) -> Result<Node, Failure> {
        let open = self.bump();
        if open.tok != Tok::LBrace {
            return Err((open.at, format!("expected a set literal {{...}}, found {}", open.tok)));
        }
        let mut values: Vec<&str> = Vec::new();
        while let Tok::Str(value) = self.peek().tok {
            self.next += 1;
            values.push(value);
            if !self.eat(Tok::Comma) {
                break;
            }
        }
        let close = self.bump();
        if close.tok != Tok::RBrace {
            return Err((close.at, format!("expected a quoted string or '}}' in a set, found {}", close.tok)));
        }
        values.sort_unstable();
        values.dedup();
        Ok(Node::In { key: key.into(), values: values.into_iter().map(Box::from).collect(), negated })
    }
}

#[cold]
#[inline(never)]
fn unexpected(at: usize, tok: Tok<'_>, context: &str) -> Failure {
    (at, format!("unexpected {tok}{context}"))
}

#[cold]
#[inline(never)]
fn too_deep(at: usize) -> Failure {
    (at, format!("parentheses nested deeper than {MAX_NESTING}"))
}

#[cold]
#[inline(never)]
fn unclosed(found: Token<'_>) -> Failure {
    (found.at, format!("expected ')', found {}", found.tok))
}

/// The character index of byte offset `at` (always a character boundary here).
fn char_index(text: &str, at: usize) -> usize {
    text.get(..at).map_or(at, |before| before.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pairs = &'static [(&'static str, &'static str)];

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn sel(text: &str) -> Selector {
        Selector::parse(text).unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
    }

    #[test]
    fn every_operator_matches_as_upstream_does() {
        // (selector, labels, whether they match)
        let cases: &[(&str, Pairs, bool)] = &[
            // ==
            (r#"a == "b""#, &[("a", "b")], true),
            (r#"a == "b""#, &[("a", "b"), ("c", "d")], true),
            (r#"a == "b""#, &[("a", "c")], false),
            (r#"a == "b""#, &[("c", "b")], false),
            (r#"a == "b""#, &[], false),
            (r#"a == """#, &[("a", "")], true),
            (r#"a == """#, &[], false),
            // != is true when the label is absent.
            (r#"a != "b""#, &[("a", "c")], true),
            (r#"a != "b""#, &[("a", "b")], false),
            (r#"a != "b""#, &[], true),
            (r#"a != "b""#, &[("c", "b")], true),
            // has
            ("has(a)", &[("a", "")], true),
            ("has(a)", &[("b", "a")], false),
            ("!has(a)", &[("b", "b")], true),
            ("!has(a)", &[("a", "b")], false),
            // in / not in; not in is true when the label is absent.
            (r#"a in {"x", "y"}"#, &[("a", "y")], true),
            (r#"a in {"x", "y"}"#, &[("a", "z")], false),
            (r#"a in {"x", "y"}"#, &[], false),
            (r#"a in {}"#, &[("a", "")], false),
            (r#"a not in {"x", "y"}"#, &[("a", "z")], true),
            (r#"a not in {"x", "y"}"#, &[("a", "x")], false),
            (r#"a not in {"x", "y"}"#, &[], true),
            (r#"a not in {}"#, &[("a", "x")], true),
            (r#"a in {"'", '"', "c"}"#, &[("a", "\"")], true),
            (r#"a in {"'", '"', "c"}"#, &[("a", "'")], true),
            // contains / starts with / ends with are false when the label is absent.
            (r#"a contains "a""#, &[("a", "bab")], true),
            (r#"a contains "a""#, &[("a", "b")], false),
            (r#"a contains "a""#, &[("b", "aaa")], false),
            (r#"a contains """#, &[("a", "")], true),
            (r#"a contains """#, &[], false),
            (r#"a starts with "ab""#, &[("a", "abc")], true),
            (r#"a starts with "ab""#, &[("a", "cab")], false),
            (r#"a starts with "ab""#, &[], false),
            (r#"a ends with "ab""#, &[("a", "cab")], true),
            (r#"a ends with "ab""#, &[("a", "abc")], false),
            (r#"a ends with "ab""#, &[], false),
            // all() and global() match everything, also an empty label set.
            ("all()", &[], true),
            ("all()", &[("a", "b")], true),
            ("global()", &[], true),
            ("global()", &[("projectcalico.org/namespace", "default")], true),
            ("!global()", &[], false),
            ("", &[("a", "b")], true),
            (" \t ", &[], true),
            // Negation runs collapse.
            ("!!has(a)", &[("a", "x")], true),
            ("! !! has(a)", &[("a", "x")], false),
            ("!(!has(a))", &[("a", "x")], true),
            (r#"!a == "b""#, &[("a", "c")], true),
            (r#"!a == "b""#, &[], true),
            (r#"!a in {"b"}"#, &[("a", "b")], false),
            // Precedence: ! over && over ||.
            ("has(a) || has(b) && has(c)", &[("a", "")], true),
            ("(has(a) || has(b)) && has(c)", &[("a", "")], false),
            ("has(a) && has(b) || has(c)", &[("c", "")], true),
            ("has(a) && (has(b) || has(c))", &[("c", "")], false),
            ("!has(a) && has(b)", &[("b", "")], true),
            ("!(has(a) && has(b))", &[("a", "")], true),
            ("!has(a) || has(b)", &[("a", "")], false),
            ("!(!has(a) || has(b))", &[("a", "")], true),
            (r#"a != 'a1' || b != 'b1'"#, &[("a", "a1"), ("b", "b1")], false),
            (r#"! a == 'a1' || ! b == 'b1'"#, &[("a", "a1"), ("b", "b2")], true),
            // Quoting: either quote, holding the other one.
            ("a == 'b'", &[("a", "b")], true),
            (r#"a == 'say "hi"'"#, &[("a", "say \"hi\"")], true),
            (r#"a == "it's""#, &[("a", "it's")], true),
            ("a == 'x\ny'", &[("a", "x\ny")], true),
            ("a == \"é\"", &[("a", "é")], true),
            // Keys of every allowed character; keywords as keys.
            (r#"projectcalico.org/name-x_1 == "v""#, &[("projectcalico.org/name-x_1", "v")], true),
            (r#"has == "x""#, &[("has", "x")], true),
            (r#"contains contains "contains""#, &[("contains", "xcontainsx")], true),
            (r#"in in {"in"}"#, &[("in", "in")], true),
            ("has( k8s-app )", &[("k8s-app", "dns")], true),
            // Compact spelling.
            (r#"a=="b"&&c!='d'"#, &[("a", "b"), ("c", "e")], true),
            (r#"a notin{"b"}||has(c)"#, &[("a", "b")], false),
            (r#"a startswith"x""#, &[("a", "xy")], true),
            (r#"a ends  with "y""#, &[("a", "xy")], true),
            (r#"a in {"b",}"#, &[("a", "b")], true),
        ];
        for (text, pairs, expected) in cases {
            let map = labels(pairs);
            let selector = sel(text);
            assert_eq!(selector.matches_map(&map), *expected, "{text:?} on {map:?}");
            let reparsed = sel(&selector.to_string());
            assert_eq!(reparsed.matches_map(&map), *expected, "canonical {selector} on {map:?}");
        }
    }

    #[test]
    fn matches_takes_any_label_lookup() {
        let selector = sel(r#"app == "web" && !has(canary)"#);
        assert!(selector.matches(|key| (key == "app").then_some("web")));
        assert!(!selector.matches(|_| Some("web")));
        assert!(!selector.matches(|_| None));
    }

    #[test]
    fn bad_selectors_are_refused_with_a_position() {
        // (selector, position in characters, part of the message)
        let long_key = "a".repeat(MAX_KEY_LEN + 1);
        let long_has = format!("has({long_key})");
        let long_cmp = format!("{long_key} == \"v\"");
        let cases: &[(&str, usize, &str)] = &[
            ("b == b", 5, "expected a quoted string after '=='"),
            ("b contains b", 11, "expected a quoted string after 'contains'"),
            ("b starts with b", 2, "expected an operator after label \"b\""),
            ("'b1' == b", 0, "unexpected string \"b1\""),
            ("b", 1, "expected an operator after label \"b\", found end of selector"),
            ("a ", 2, "expected an operator after label \"a\", found end of selector"),
            ("a b", 2, "expected an operator after label \"a\""),
            ("a instance {}", 2, "expected an operator after label \"a\""),
            ("!", 1, "unexpected end of selector"),
            ("a = 'b'", 2, "expected '=='"),
            (r#"foo == "bar" &"#, 13, "expected '&&'"),
            (r#"foo == "bar" |"#, 13, "expected '||'"),
            ("foo != ||", 7, "expected a quoted string after '!=', found '||'"),
            (r#"foo in {"", ||"#, 12, "expected a quoted string or '}' in a set, found '||'"),
            (r#"foo in {"a" "b"}"#, 12, "expected a quoted string or '}'"),
            (r#"foo in {,}"#, 8, "expected a quoted string or '}'"),
            (r#"foo in "a""#, 7, "expected a set literal"),
            (r#"foo in"#, 6, "expected a set literal"),
            (r#""FOO"#, 0, "unterminated string"),
            (r#"a == "FOO'"#, 5, "unterminated string"),
            ("a == 'FOO", 5, "unterminated string"),
            ("(", 1, "unexpected end of selector"),
            (r#"(a == "foo""#, 11, "expected ')', found end of selector"),
            (")", 0, "unexpected ')'"),
            ("()", 1, "unexpected ')'"),
            ("%", 0, "expected a label key, found '%'"),
            (r#"a == "b" && %"#, 12, "expected a label key, found '%'"),
            (r#"a == "b" || %"#, 12, "expected a label key"),
            ("has(foo) &&", 11, "unexpected end of selector"),
            (r#"a == "b")"#, 8, "unexpected ')' after a complete expression"),
            (r#"a == "b" c == "d""#, 9, "unexpected label \"c\" after a complete expression"),
            ("has()", 4, "expected a label key, found ')'"),
            ("has( foo ", 9, "expected ')' to close has("),
            ("has(a b)", 6, "expected ')' to close has("),
            ("all(", 4, "expected ')' to close all("),
            ("all(x)", 4, "expected ')' to close all("),
            ("global(", 7, "expected ')' to close global("),
            ("all ()", 4, "expected an operator after label \"all\", found '('"),
            ("has(a)\n", 6, "expected a label key, found '\\n'"),
            ("a\n== 'b'", 1, "expected an operator after label \"a\""),
            ("é == 'x'", 0, "expected a label key, found 'é'"),
            ("a == 'é' && ü", 12, "expected a label key, found 'ü'"),
            (long_has.as_str(), 4, "longer than the 512 allowed"),
            (long_cmp.as_str(), 0, "longer than the 512 allowed"),
        ];
        for (text, position, message) in cases {
            let err = Selector::parse(text).expect_err(text);
            assert_eq!(err.position, *position, "{text:?}: {err}");
            assert!(err.message.contains(message), "{text:?}: {err}");
            assert_eq!(err.to_string(), format!("invalid selector at character {position}: {}", err.message));
        }
    }

    #[test]
    fn a_lexical_error_anywhere_wins_over_a_grammar_error_before_it() {
        let err = Selector::parse(r#") && a == "unterminated"#).unwrap_err();
        assert!(err.message.contains("unterminated string"), "{err}");
    }

    #[test]
    fn keys_up_to_the_limit_are_accepted() {
        let key = "k".repeat(MAX_KEY_LEN);
        let selector = sel(&format!("{key} == 'v' && has({key})"));
        assert!(selector.matches(|k| (k == key).then_some("v")));
    }

    #[test]
    fn canonical_form_is_upstreams() {
        let cases: &[(&str, &str)] = &[
            ("", "all()"),
            (" all() ", "all()"),
            (" (all() )", "all()"),
            ("all( )", "all()"),
            ("global(\t)", "global()"),
            ("has( a )", "has(a)"),
            ("! (has( b)||! has(a ))", "!(has(b) || !has(a))"),
            (r#"! (a == "b"&&! c != "d")"#, r#"!(a == "b" && !c != "d")"#),
            (r#"a == "'""#, r#"a == "'""#),
            (r#"a == '"'"#, r#"a == '"'"#),
            ("a == 'b'", r#"a == "b""#),
            (r#"a contains '"'"#, r#"a contains '"'"#),
            (r#"a contains "'""#, r#"a contains "'""#),
            (r#"a startswith '"'"#, r#"a starts with '"'"#),
            (r#"a endswith "'""#, r#"a ends with "'""#),
            (r#"a!='"'"#, r#"a != '"'"#),
            (r#"a in {"d"}"#, r#"a in {"d"}"#),
            (r#"a in {"d", "a", "b"}"#, r#"a in {"a", "b", "d"}"#),
            (r#"a in {"z", "z", "x", "y", "x", "a"}"#, r#"a in {"a", "x", "y", "z"}"#),
            (r#"a in {'"', "'", "B", "a",}"#, r#"a in {'"', "'", "B", "a"}"#),
            ("a notin{}", "a not in {}"),
            (r#"a  not   in {"b"}"#, r#"a not in {"b"}"#),
            ("has(a) && has(b) && has(c)", "(has(a) && has(b) && has(c))"),
            ("(has(a) && has(b)) && has(c)", "((has(a) && has(b)) && has(c))"),
            ("has(a) || has(b) && has(c)", "(has(a) || (has(b) && has(c)))"),
            ("((has(a)))", "has(a)"),
            ("!(has(a))", "!has(a)"),
            ("!!has(a)", "has(a)"),
            ("!!!has(a)", "!has(a)"),
            // Upstream keeps a `!` over a parenthesised `!`: not a fixed point (see the module doc).
            ("!(!has(a))", "!!has(a)"),
            ("!(!(k == 'v' && has(t) || all()) && (a in {'b', 'c'}))", r#"!(!((k == "v" && has(t)) || all()) && a in {"b", "c"})"#),
        ];
        for (input, expected) in cases {
            let canonical = sel(input).to_string();
            assert_eq!(&canonical, expected, "{input:?}");
            let again = sel(&canonical).to_string();
            if !canonical.contains("!!") {
                assert_eq!(again, canonical, "{input:?}");
                assert_eq!(sel(&canonical), sel(input), "{input:?}");
            }
            assert_eq!(sel(&again).to_string(), again, "{input:?}");
        }
    }

    #[test]
    fn nesting_is_capped_with_an_error() {
        let nested = |depth: usize| format!("{}has(a){}", "(".repeat(depth), ")".repeat(depth));
        let selector = sel(&nested(MAX_NESTING));
        assert_eq!(selector.to_string(), "has(a)");
        let err = Selector::parse(&nested(MAX_NESTING + 1)).unwrap_err();
        assert_eq!(err.position, MAX_NESTING);
        assert!(err.message.contains("nested deeper than 128"), "{err}");
        // However many parentheses open, the parser stops at the cap.
        assert!(Selector::parse(&"(".repeat(100_000)).is_err());
    }

    /// The deepest tree the parser builds: every level of parentheses a negated group.
    fn deepest_selector() -> String {
        let mut text = "has(a)".to_owned();
        // Each wrapping opens two levels.
        for _ in 0..MAX_NESTING / 2 {
            text = format!("!(has(b) || !(has(c) && {text}))");
        }
        text
    }

    #[test]
    fn deepest_selector_fits_a_small_stack() {
        let text = deepest_selector();
        std::thread::Builder::new()
            .stack_size(768 * 1024)
            .spawn(move || {
                let selector = sel(&text);
                let rendered = selector.to_string();
                let map = labels(&[("a", "x")]);
                let _ = selector.matches_map(&map);
                let reparsed = sel(&rendered);
                drop((selector, reparsed));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn long_inputs_parse_in_linear_time() {
        // 100k terms in one group, 100k negations, a 1 MB string and a 100k-value set: quadratic
        // work on any of them would take minutes, not milliseconds.
        let terms = vec!["a == 'b'"; 100_000].join(" && ");
        assert!(sel(&terms).matches_map(&labels(&[("a", "b")])));
        let nots = format!("{}has(a)", "!".repeat(100_001));
        assert!(sel(&nots).matches_map(&labels(&[])));
        let big = format!("a == '{}'", "x".repeat(1 << 20));
        assert_eq!(sel(&big).to_string().len(), (1 << 20) + 7);
        let set = format!("a in {{{}}}", (0..100_000).map(|i| format!("'{i}'")).collect::<Vec<_>>().join(","));
        assert!(sel(&set).matches_map(&labels(&[("a", "99999")])));
        let err = Selector::parse(&format!("{terms} &&")).unwrap_err();
        assert_eq!(err.position, terms.len() + 3);
    }

    // -----------------------------------------------------------------------------------------
    // Properties, against a model written from the language's documented meaning: random trees
    // rendered in random spellings (quotes, blanks, redundant parentheses and negations).

    use proptest::prelude::*;

    static KEYS: [&str; 4] = ["a", "b", "k8s-app", "projectcalico.org/ns"];
    static VALUES: [&str; 7] = ["", "x", "y", "xy", "it's", "say \"hi\"", "é"];

    #[derive(Clone, Debug)]
    enum Model {
        All,
        Global,
        Has(&'static str),
        Compare(&'static str, CompareOp, &'static str),
        In(&'static str, Vec<&'static str>, bool),
        Not(Box<Model>),
        And(Vec<Model>),
        Or(Vec<Model>),
    }

    impl Model {
        fn eval(&self, labels: &BTreeMap<String, String>) -> bool {
            let get = |k: &str| labels.get(k).map(String::as_str);
            match self {
                Model::All | Model::Global => true,
                Model::Has(k) => get(k).is_some(),
                Model::Compare(k, op, v) => match (op, get(k)) {
                    (CompareOp::Eq, got) => got == Some(*v),
                    (CompareOp::Ne, got) => got != Some(*v),
                    (CompareOp::Contains, got) => got.is_some_and(|g| g.contains(v)),
                    (CompareOp::StartsWith, got) => got.is_some_and(|g| g.starts_with(v)),
                    (CompareOp::EndsWith, got) => got.is_some_and(|g| g.ends_with(v)),
                },
                Model::In(k, vs, negated) => get(k).is_some_and(|g| vs.contains(&g)) != *negated,
                Model::Not(m) => !m.eval(labels),
                Model::And(ms) => ms.iter().all(|m| m.eval(labels)),
                Model::Or(ms) => ms.iter().any(|m| m.eval(labels)),
            }
        }

        fn render(&self, style: &mut Style) -> String {
            let text = match self {
                Model::All => format!("all({})", style.blank()),
                Model::Global => format!("global({})", style.blank()),
                Model::Has(k) => format!("has({}{k}{})", style.blank(), style.blank()),
                Model::Compare(k, op, v) => {
                    let op = match op {
                        CompareOp::Eq => "==",
                        CompareOp::Ne => "!=",
                        CompareOp::Contains => "contains",
                        CompareOp::StartsWith => style.pick(&["starts with", "startswith", "starts \t with"]),
                        CompareOp::EndsWith => style.pick(&["ends with", "endswith"]),
                    };
                    // A word operator needs a blank after the key; `==` and `!=` do not.
                    let before = if op.starts_with(['=', '!']) { style.blank() } else { " " };
                    format!("{k}{before}{op}{}{}", style.blank(), style.quote(v))
                }
                Model::In(k, vs, negated) => {
                    let op = if *negated { style.pick(&["not in", "notin", "not  in"]) } else { "in" };
                    let items: Vec<String> = vs.iter().map(|v| style.quote(v)).collect();
                    let sep = style.pick(&[",", ", ", " , "]);
                    let trailing = if !vs.is_empty() && style.coin() { "," } else { "" };
                    format!("{k} {op}{}{{{}{trailing}}}", style.blank(), items.join(sep))
                }
                Model::Not(m) => {
                    let inner = m.render(style);
                    // Without parentheses `!` would bind to the first operand of a group only.
                    let inner = if matches!(**m, Model::And(_) | Model::Or(_)) { format!("({inner})") } else { inner };
                    format!("!{}{inner}", style.blank())
                }
                Model::And(ms) => {
                    let parts: Vec<String> = ms
                        .iter()
                        .map(|m| {
                            let part = m.render(style);
                            if matches!(m, Model::Or(_)) { format!("({part})") } else { part }
                        })
                        .collect();
                    parts.join(&format!("{}&&{}", style.blank(), style.blank()))
                }
                Model::Or(ms) => {
                    let parts: Vec<String> = ms.iter().map(|m| m.render(style)).collect();
                    parts.join(&format!("{}||{}", style.blank(), style.blank()))
                }
            };
            if style.chance(6) { format!("({}{text}{})", style.blank(), style.blank()) } else { text }
        }
    }

    /// Spelling choices, drawn from a seed (splitmix64) so that a failing case replays.
    struct Style(u64);

    impl Style {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn chance(&mut self, one_in: u64) -> bool {
            self.next().is_multiple_of(one_in)
        }
        fn coin(&mut self) -> bool {
            self.chance(2)
        }
        fn pick(&mut self, options: &[&'static str]) -> &'static str {
            options[(self.next() % options.len() as u64) as usize]
        }
        fn blank(&mut self) -> &'static str {
            self.pick(&["", "", " ", "\t", "  "])
        }
        fn quote(&mut self, v: &str) -> String {
            let quote = if v.contains('"') {
                '\''
            } else if v.contains('\'') || self.coin() {
                '"'
            } else {
                '\''
            };
            format!("{quote}{v}{quote}")
        }
    }

    fn model() -> impl Strategy<Value = Model> {
        let key = proptest::sample::select(&KEYS[..]);
        let value = proptest::sample::select(&VALUES[..]);
        let op = proptest::sample::select(vec![CompareOp::Eq, CompareOp::Ne, CompareOp::Contains, CompareOp::StartsWith, CompareOp::EndsWith]);
        let leaf = prop_oneof![
            1 => Just(Model::All),
            1 => Just(Model::Global),
            3 => key.clone().prop_map(Model::Has),
            6 => (key.clone(), op, value.clone()).prop_map(|(k, op, v)| Model::Compare(k, op, v)),
            3 => (key, proptest::collection::vec(value, 0..4), any::<bool>()).prop_map(|(k, vs, n)| Model::In(k, vs, n)),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                inner.clone().prop_map(|m| Model::Not(Box::new(m))),
                proptest::collection::vec(inner.clone(), 2..4).prop_map(Model::And),
                proptest::collection::vec(inner, 2..4).prop_map(Model::Or),
            ]
        })
    }

    fn label_sets() -> impl Strategy<Value = Vec<BTreeMap<String, String>>> {
        let pairs = proptest::collection::btree_map(
            proptest::sample::select(&KEYS[..]).prop_map(str::to_owned),
            proptest::sample::select(&VALUES[..]).prop_map(str::to_owned),
            0..4,
        );
        proptest::collection::vec(pairs, 1..6)
    }

    /// What reparsing the canonical form does to a tree: a `!` directly over a `!` cancels.
    fn cancel_double_negations(node: &Node) -> Node {
        match node {
            Node::Not(inner) => match &**inner {
                Node::Not(innermost) => cancel_double_negations(innermost),
                other => Node::Not(Box::new(cancel_double_negations(other))),
            },
            Node::And(ops) => Node::And(ops.iter().map(cancel_double_negations).collect()),
            Node::Or(ops) => Node::Or(ops.iter().map(cancel_double_negations).collect()),
            leaf => leaf.clone(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parsed_selectors_agree_with_the_model(m in model(), seed in any::<u64>(), sets in label_sets()) {
            let text = m.render(&mut Style(seed));
            let selector = Selector::parse(&text).map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
            for set in &sets {
                prop_assert_eq!(selector.matches_map(set), m.eval(set), "{:?} on {:?}", text, set);
            }
        }

        #[test]
        fn canonical_form_reparses_to_the_same_selector(m in model(), seed in any::<u64>(), sets in label_sets()) {
            let text = m.render(&mut Style(seed));
            let selector = sel(&text);
            let canonical = selector.to_string();
            let reparsed = Selector::parse(&canonical).map_err(|e| TestCaseError::fail(format!("{canonical:?}: {e}")))?;
            prop_assert_eq!(&reparsed.root, &cancel_double_negations(&selector.root), "{:?} -> {:?}", text, canonical);
            // After one reparse the form is a fixed point.
            prop_assert_eq!(sel(&reparsed.to_string()).to_string(), reparsed.to_string());
            for set in &sets {
                prop_assert_eq!(reparsed.matches_map(set), selector.matches_map(set));
            }
        }

        #[test]
        fn not_and_or_agree_with_their_operands(a in model(), b in model(), seed in any::<u64>(), sets in label_sets()) {
            let mut style = Style(seed);
            let (ta, tb) = (a.render(&mut style), b.render(&mut style));
            let (sa, sb) = (sel(&ta), sel(&tb));
            let not_a = sel(&format!("!({ta})"));
            let and = sel(&format!("({ta}) && ({tb})"));
            let or = sel(&format!("({ta})||({tb})"));
            for set in &sets {
                let (ma, mb) = (sa.matches_map(set), sb.matches_map(set));
                prop_assert_eq!(not_a.matches_map(set), !ma);
                prop_assert_eq!(and.matches_map(set), ma && mb);
                prop_assert_eq!(or.matches_map(set), ma || mb);
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in "[ -~\t\né]{0,40}") {
            if let Ok(selector) = Selector::parse(&text) {
                let canonical = selector.to_string();
                prop_assert!(Selector::parse(&canonical).is_ok(), "{:?} -> {:?}", text, canonical);
            }
        }

        #[test]
        fn near_miss_text_never_panics(parts in proptest::collection::vec(proptest::sample::select(vec![
            "a", "has(", "all(", "global(", ")", "(", "!", "&&", "||", "==", "!=", " in ", " not in ",
            " contains ", " starts with ", " ends", "with", "{", "}", ",", "'x'", "\"y\"", "'", " ", "\t",
        ]), 0..16)) {
            let text = parts.concat();
            if let Ok(selector) = Selector::parse(&text) {
                let canonical = selector.to_string();
                let reparsed = sel(&canonical);
                prop_assert_eq!(sel(&reparsed.to_string()).to_string(), reparsed.to_string());
            }
        }
    }
}
