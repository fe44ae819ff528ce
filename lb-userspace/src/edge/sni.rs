//! The server name a TLS `ClientHello` asks for (SNI, RFC 6066), read without terminating TLS.

/// Largest `ClientHello` read: one full record of handshake bytes and a bit (post-quantum key
/// shares make hellos of about 1.8 KiB; 16 KiB leaves room for any real one).
pub const MAX_HELLO: usize = 16 * 1024 + 5 + 512;

/// What the bytes read so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Read more.
    Incomplete,
    /// Not a TLS `ClientHello` (or a broken one): close the connection.
    Invalid(&'static str),
    /// A whole `ClientHello`, and the host name it asks for, lowercase.
    Complete(Option<String>),
}

/// Parses the start of a TLS connection: handshake records until the `ClientHello` is whole
/// (it may span records).
#[must_use]
pub fn client_hello(buf: &[u8]) -> Hello {
    let mut hs: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(head) = buf.get(pos..pos + 5) else { return Hello::Incomplete };
        if head[0] != 0x16 {
            return Hello::Invalid("not a TLS handshake record");
        }
        if head[1] != 3 {
            return Hello::Invalid("not a TLS record version");
        }
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        if len == 0 || len > 16 * 1024 + 256 {
            return Hello::Invalid("bad TLS record length");
        }
        let Some(body) = buf.get(pos + 5..pos + 5 + len) else { return Hello::Incomplete };
        hs.extend_from_slice(body);
        pos += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Hello::Invalid("first handshake message is not a ClientHello");
            }
            let msg = usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
            if msg > MAX_HELLO {
                return Hello::Invalid("ClientHello too large");
            }
            if hs.len() >= 4 + msg {
                return match server_name(&hs[4..4 + msg]) {
                    Ok(name) => Hello::Complete(name),
                    Err(why) => Hello::Invalid(why),
                };
            }
        }
    }
}

/// Reads big-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated ClientHello");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<usize, &'static str> {
        Ok(usize::from(self.take(1)?[0]))
    }

    fn u16(&mut self) -> Result<usize, &'static str> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A field with a one- or two-byte length in front.
    fn vec8(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u8()?;
        self.take(n)
    }

    fn vec16(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The `host_name` of the `server_name` extension of a `ClientHello` body.
fn server_name(body: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    if r.0.is_empty() {
        return Ok(None); // no extensions
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(Reader(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type != 0 {
                continue;
            }
            let ok = !name.is_empty()
                && name.len() <= 253
                && name.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            if !ok {
                return Err("server name is not a host name");
            }
            let name = std::str::from_utf8(name).map_err(|_| "server name is not a host name")?;
            return Ok(Some(name.trim_end_matches('.').to_ascii_lowercase()));
        }
        return Ok(None);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `ClientHello` record asking for `name` (none when empty), with one more extension
    /// before it.
    fn hello(name: &str) -> Vec<u8> {
        let mut exts = vec![0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]; // ec_point_formats
        if !name.is_empty() {
            let n = name.len();
            let entry_len = 3 + n;
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&u16::try_from(entry_len + 2).unwrap().to_be_bytes());
            exts.extend_from_slice(&u16::try_from(entry_len).unwrap().to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
            exts.extend_from_slice(name.as_bytes());
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0]); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&u16::try_from(exts.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn the_name_is_read_from_whole_hellos_only() {
        let h = hello("Secure.Example.org");
        assert_eq!(client_hello(&h), Hello::Complete(Some("secure.example.org".into())));
        for cut in [0, 3, 5, 20, h.len() - 1] {
            assert_eq!(client_hello(&h[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        assert_eq!(client_hello(&hello("")), Hello::Complete(None));
    }

    #[test]
    fn a_hello_split_over_two_records_is_joined() {
        let h = hello("a.example");
        let hs = &h[5..];
        let (x, y) = hs.split_at(10);
        let mut two = Vec::new();
        for part in [x, y] {
            two.extend_from_slice(&[0x16, 3, 1]);
            two.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(client_hello(&two), Hello::Complete(Some("a.example".into())));
    }

    #[test]
    fn other_bytes_are_refused_not_guessed_at() {
        assert!(matches!(client_hello(b"GET / HTTP/1.1\r\n\r\n"), Hello::Invalid(_)));
        let mut h = hello("a.example");
        h[5] = 2; // a ServerHello
        assert!(matches!(client_hello(&h), Hello::Invalid(_)));
        let bad = hello("a b");
        assert!(matches!(client_hello(&bad), Hello::Invalid(_)));
        // A name length that runs past the hello's end.
        let mut h = hello("a.example");
        let at = h.len() - "a.example".len() - 1;
        h[at] = 0xff;
        assert_eq!(client_hello(&h), Hello::Invalid("truncated ClientHello"));
    }
}
