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

/// Field positions of one YAML document.
#[derive(Debug, Default)]
pub struct Spans {
    positions: HashMap<FieldPath, Pos>,
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
            None => Ok(Self { positions: b.positions }),
        }
    }

    /// Position of `path`, or of its nearest indexed ancestor (a defaulted field has none of
    /// its own), or the start of the file.
    #[must_use]
    pub fn locate(&self, path: &FieldPath) -> Pos {
        (0..=path.0.len())
            .rev()
            .find_map(|n| self.positions.get(&FieldPath(path.0[..n].to_vec())))
            .copied()
            .unwrap_or(Pos { line: 1, column: 1 })
    }
}

enum Frame {
    Map {
        path: FieldPath,
        key: Option<String>,
        seen: HashMap<String, Pos>,
    },
    Seq {
        path: FieldPath,
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
    positions: HashMap<FieldPath, Pos>,
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
        let path = match self.stack.last_mut() {
            None => FieldPath::default(),
            Some(Frame::Map { path, key: key @ None, seen }) => {
                let name = match node {
                    Node::Scalar(s) => s,
                    Node::Alias => "*alias".to_owned(),
                    Node::Map | Node::Seq => {
                        *key = Some("?complex-key".to_owned());
                        self.stack.push(Frame::SkipKey { depth: 1 });
                        return;
                    }
                };
                let field = path.key(&name);
                if let Some(first) = seen.get(&name) {
                    if self.duplicate.is_none() {
                        self.duplicate = Some(IndexError {
                            pos,
                            field: field.clone(),
                            message: format!("duplicate key `{name}` (first defined at line {})", first.line),
                        });
                    }
                } else {
                    seen.insert(name.clone(), pos);
                }
                self.positions.insert(field, pos);
                *key = Some(name);
                return;
            }
            Some(Frame::Map { path, key: Some(k), .. }) => path.key(k),
            Some(Frame::Seq { path, next }) => {
                let p = path.index(*next);
                *next += 1;
                self.positions.insert(p.clone(), pos);
                p
            }
            Some(Frame::SkipKey { .. }) => unreachable!("SkipKey frames consume their own events"),
        };
        match node {
            Node::Map => self.stack.push(Frame::Map { path, key: None, seen: HashMap::new() }),
            Node::Seq => self.stack.push(Frame::Seq { path, next: 0 }),
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
    }

    #[test]
    fn field_paths_print_like_serde_paths() {
        assert_eq!(
            p(&["tcp", "redis-main", "backends", "0", "port"]).to_string(),
            "tcp.redis-main.backends[0].port"
        );
    }
}
