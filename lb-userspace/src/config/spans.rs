//! Where each field of a registry file is: a map from field path to line and column.
//!
//! serde reports positions only for the errors it finds itself. Semantic checks (a VIP used
//! twice, a port mismatch) run on typed values, so they look their field's position up here.
//! Building the index also catches duplicate keys, which serde would silently collapse.

use std::{collections::HashMap, fmt};

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A field path such as `tcp.redis-main.backends[0].port`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FieldPath(pub Vec<Seg>);

impl FieldPath {
    #[must_use]
    pub fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_owned()));
        p
    }

    #[must_use]
    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        // yaml-rust2 lines are 1-based, columns 0-based.
        Self { line: m.line(), column: m.col() + 1 }
    }
}

/// A problem found while indexing: a syntax error or a duplicate key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexError {
    pub pos: Pos,
    pub field: FieldPath,
    pub message: String,
}

/// Field positions of one YAML document, as a tree: node 0 is the document, every other node
/// a field (mapping key or sequence index) under its parent. One entry per field, no path
/// copies: indexing runs on every reload.
#[derive(Debug)]
pub struct Spans {
    positions: Vec<Pos>,
    children: HashMap<(u32, Seg), u32>,
}

impl Default for Spans {
    fn default() -> Self {
        Self { positions: vec![Pos { line: 1, column: 1 }], children: HashMap::new() }
    }
}

impl Spans {
    /// Indexes `src`, failing on YAML syntax errors and duplicate keys.
    pub fn index(src: &str) -> Result<Self, IndexError> {
        let mut b = Builder::default();
        let mut parser = Parser::new_from_str(src);
        if let Err(e) = parser.load(&mut b, false) {
            return Err(IndexError {
                pos: Pos::from(*e.marker()),
                field: FieldPath::default(),
                message: format!("YAML syntax error: {}", e.info()),
            });
        }
        match b.duplicate {
            Some(err) => Err(err),
            None => Ok(b.spans),
        }
    }

    /// Position of `path`, or of its nearest indexed ancestor (a defaulted field has none of
    /// its own), or the start of the file.
    #[must_use]
    pub fn locate(&self, path: &FieldPath) -> Pos {
        let mut node = 0;
        for seg in &path.0 {
            match self.children.get(&(node, seg.clone())) {
                Some(&child) => node = child,
                None => break,
            }
        }
        self.positions[node as usize]
    }

    /// Adds field `seg` under `parent` at `pos`; `Err` with the first one's position when
    /// `parent` already has it.
    fn add(&mut self, parent: u32, seg: Seg, pos: Pos) -> Result<u32, Pos> {
        let next = u32::try_from(self.positions.len()).unwrap_or(u32::MAX);
        match self.children.entry((parent, seg)) {
            std::collections::hash_map::Entry::Occupied(e) => Err(self.positions[*e.get() as usize]),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(next);
                self.positions.push(pos);
                Ok(next)
            }
        }
    }

    /// The path from the document to `node`, for messages.
    fn path(&self, mut node: u32) -> FieldPath {
        let mut segs = Vec::new();
        while node != 0 {
            let Some(((parent, seg), _)) = self.children.iter().find(|(_, c)| **c == node) else { break };
            segs.push(seg.clone());
            node = *parent;
        }
        segs.reverse();
        FieldPath(segs)
    }
}

enum Frame {
    /// A mapping (node `node`), and the field its value being read belongs to.
    Map {
        node: u32,
        key: Option<u32>,
    },
    Seq {
        node: u32,
        next: usize,
    },
    /// Inside a non-scalar mapping key; nothing in it is a field.
    SkipKey {
        depth: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    spans: Spans,
    duplicate: Option<IndexError>,
}

enum Node {
    Scalar(String),
    Alias,
    Map,
    Seq,
}

impl Builder {
    fn node(&mut self, pos: Pos, node: Node) {
        let field = match self.stack.last_mut() {
            None => 0,
            Some(Frame::Map { node: map, key: key @ None }) => {
                let name = match node {
                    Node::Scalar(s) => s,
                    Node::Alias => "*alias".to_owned(),
                    Node::Map | Node::Seq => {
                        // Later events of this entry belong to no field; `u32::MAX` marks it.
                        *key = Some(u32::MAX);
                        self.stack.push(Frame::SkipKey { depth: 1 });
                        return;
                    }
                };
                let map = *map;
                if map == u32::MAX {
                    *key = Some(u32::MAX);
                    return;
                }
                match self.spans.add(map, Seg::Key(name.clone()), pos) {
                    Ok(id) => *key = Some(id),
                    Err(first) => {
                        *key = Some(u32::MAX);
                        if self.duplicate.is_none() {
                            let field = self.spans.path(map).key(&name);
                            self.duplicate = Some(IndexError {
                                pos,
                                field,
                                message: format!(
                                    "duplicate key `{name}` (first defined at line {})",
                                    first.line
                                ),
                            });
                        }
                    }
                }
                return;
            }
            Some(Frame::Map { key: Some(k), .. }) => *k,
            Some(Frame::Seq { node: seq, next }) => {
                let (seq, i) = (*seq, *next);
                *next += 1;
                if seq == u32::MAX {
                    u32::MAX
                } else {
                    self.spans.add(seq, Seg::Index(i), pos).unwrap_or(u32::MAX)
                }
            }
            Some(Frame::SkipKey { .. }) => unreachable!("SkipKey frames consume their own events"),
        };
        match node {
            Node::Map => self.stack.push(Frame::Map { node: field, key: None }),
            Node::Seq => self.stack.push(Frame::Seq { node: field, next: 0 }),
            Node::Scalar(_) | Node::Alias => self.value_done(),
        }
    }

    fn value_done(&mut self) {
        if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
            *key = None;
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if let Some(Frame::SkipKey { depth }) = self.stack.last_mut() {
            match ev {
                Event::MappingStart(..) | Event::SequenceStart(..) => *depth += 1,
                Event::MappingEnd | Event::SequenceEnd => {
                    *depth -= 1;
                    if *depth == 0 {
                        self.stack.pop();
                    }
                }
                _ => {}
            }
            return;
        }
        let pos = Pos::from(mark);
        match ev {
            Event::Scalar(v, ..) => self.node(pos, Node::Scalar(v)),
            Event::Alias(_) => self.node(pos, Node::Alias),
            Event::MappingStart(..) => self.node(pos, Node::Map),
            Event::SequenceStart(..) => self.node(pos, Node::Seq),
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(segs: &[&str]) -> FieldPath {
        FieldPath(
            segs.iter()
                .map(|s| s.parse::<usize>().map_or_else(|_| Seg::Key((*s).to_owned()), Seg::Index))
                .collect(),
        )
    }

    const DOC: &str = "version: 1\ntcp:\n  redis:\n    port: 6379\n    backends:\n      - host: a\n        port: 1\n      - {host: b, port: 2}\n";

    #[test]
    fn fields_are_located_by_line_and_column() {
        let s = Spans::index(DOC).unwrap();
        assert_eq!(s.locate(&p(&["version"])), Pos { line: 1, column: 1 });
        assert_eq!(s.locate(&p(&["tcp", "redis", "port"])), Pos { line: 4, column: 5 });
        assert_eq!(s.locate(&p(&["tcp", "redis", "backends", "0", "port"])), Pos { line: 7, column: 9 });
        assert_eq!(s.locate(&p(&["tcp", "redis", "backends", "1", "host"])), Pos { line: 8, column: 10 });
    }

    #[test]
    fn a_missing_field_is_located_at_its_nearest_ancestor() {
        let s = Spans::index(DOC).unwrap();
        assert_eq!(s.locate(&p(&["tcp", "redis", "vip"])), Pos { line: 3, column: 3 });
    }

    #[test]
    fn duplicate_keys_are_refused_with_both_lines() {
        let doc = "tcp:\n  a:\n    port: 1\n  b: {}\n  a:\n    port: 2\n";
        let e = Spans::index(doc).unwrap_err();
        assert_eq!(e.pos, Pos { line: 5, column: 3 });
        assert_eq!(e.field.to_string(), "tcp.a");
        assert!(e.message.contains("first defined at line 2"), "{}", e.message);
    }

    #[test]
    fn syntax_errors_carry_their_position() {
        let e = Spans::index("tcp:\n  a: [1, 2\n").unwrap_err();
        assert!(e.message.starts_with("YAML syntax error"), "{}", e.message);
        assert!(e.pos.line >= 2, "{e:?}");
    }

    #[test]
    fn complex_keys_do_not_confuse_the_index() {
        let s = Spans::index("? [a, b]\n: 1\nafter: 2\n").unwrap();
        assert_eq!(s.locate(&p(&["after"])), Pos { line: 3, column: 1 });
        // Fields under two complex keys are nobody's: no false duplicate.
        let s = Spans::index("? [a]\n: {x: 1}\n? [b]\n: {x: 2}\nafter: 3\n").unwrap();
        assert_eq!(s.locate(&p(&["after"])), Pos { line: 5, column: 1 });
    }

    #[test]
    fn a_duplicate_deep_in_a_sequence_names_its_whole_path() {
        let doc = "tcp:\n  a:\n    backends:\n      - {host: x, port: 1}\n      - {host: y, host: z}\n";
        let e = Spans::index(doc).unwrap_err();
        assert_eq!(e.field.to_string(), "tcp.a.backends[1].host");
        assert_eq!(e.pos, Pos { line: 5, column: 19 });
    }

    #[test]
    fn field_paths_print_like_serde_paths() {
        assert_eq!(
            p(&["tcp", "redis-main", "backends", "0", "port"]).to_string(),
            "tcp.redis-main.backends[0].port"
        );
    }
}
