//! Header rules of a forwarding proxy (RFC 9110 section 7.6.1): hop-by-hop headers are removed in
//! both directions, the fixed list and every header the `Connection` header nominates (from a
//! response's map; a request's are left out as `proxy::upstream` writes its head). Everything
//! else passes through untouched. The fixed list is a static table; no allocation happens unless a
//! client nominates custom headers in `Connection`.

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

/// The request's id, which the gateway passes to vLLM and returns to the client.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers that describe one connection, never the message (`Proxy-Connection`, never standard,
/// is `Connection` as some old clients send it to a proxy).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The elements of a comma-separated list header (`Connection`, `Transfer-Encoding`), in order
/// over all its lines, trimmed; empty elements are skipped.
pub fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    elements(headers.get_all(name).iter())
}

/// Whether every coding `Transfer-Encoding` names (none, when it is absent) is chunked: the one
/// coding the gateway takes off a body and frames anew. One beneath it (`gzip, chunked`) could
/// not go on, and the body would arrive still coded with nothing saying so.
pub fn chunked_only(headers: &HeaderMap) -> bool {
    tokens(headers, header::TRANSFER_ENCODING).all(|coding| coding.eq_ignore_ascii_case("chunked"))
}

/// The elements of the lines of a comma-separated list header, as [`tokens`]. A line is taken
/// apart as bytes: one element that is not text (obs-text) leaves the others in force.
fn elements<'a>(lines: impl Iterator<Item = &'a HeaderValue>) -> impl Iterator<Item = &'a str> {
    lines
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .filter_map(|token| std::str::from_utf8(token.trim_ascii()).ok())
        .filter(|token| !token.is_empty())
}

/// Whether a `Connection` token is one that names no header.
fn names_none(token: &str) -> bool {
    token.eq_ignore_ascii_case("close") || token.eq_ignore_ascii_case("keep-alive")
}

/// Whether a line of `Connection` names headers to remove with it (anything but `keep-alive` and
/// `close`).
pub fn nominates(line: &HeaderValue) -> bool {
    // Usually the line is `keep-alive` or `close` alone, told without taking it apart.
    if line.to_str().is_ok_and(names_none) {
        return false;
    }
    elements(std::iter::once(line)).any(|token| !names_none(token))
}

/// Whether a line of `Connection` asks to close the connection.
pub fn asks_to_close(line: &HeaderValue) -> bool {
    if line.as_bytes().eq_ignore_ascii_case(b"keep-alive") {
        return false;
    }
    elements(std::iter::once(line)).any(|token| token.eq_ignore_ascii_case("close"))
}

/// The lengths of the names in [`HOP_BY_HOP`], one bit each: most names are told apart from
/// them by their length alone.
const HOP_BY_HOP_LENGTHS: u32 = 1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19;

/// Where `name` is in [`HOP_BY_HOP`], if it is.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let length = name.as_str().len();
    if length >= 32 || HOP_BY_HOP_LENGTHS & (1 << length) == 0 {
        return None;
    }
    HOP_BY_HOP.iter().position(|hop| hop == name)
}

/// The headers a message's `Connection` names (other than `close` and `keep-alive`), hop-by-hop
/// with it; empty, and nothing allocated, when it names none.
pub fn nominated(headers: &HeaderMap) -> Vec<HeaderName> {
    nominated_by(|| headers.get_all(header::CONNECTION).iter())
}

/// [`nominated`], of the `Connection` lines `lines` goes over.
fn nominated_by<'a, I>(lines: impl Fn() -> I) -> Vec<HeaderName>
where
    I: Iterator<Item = &'a HeaderValue>,
{
    if !lines().any(nominates) {
        return Vec::new();
    }
    elements(lines())
        .filter(|token| !names_none(token))
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect()
}

/// Whether `name` is hop-by-hop in a message whose `Connection` names `nominated`.
pub fn is_hop_by_hop(name: &HeaderName, nominated: &[HeaderName]) -> bool {
    hop_by_hop_index(name).is_some() || nominated.contains(name)
}

/// Removes the fixed hop-by-hop headers and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds the few that are there (most messages carry none, or only
    // `Connection`): a removal by name costs a lookup each.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(index) = hop_by_hop_index(name) {
            present |= 1 << index;
        }
    }
    if present == 0 {
        return;
    }
    // `Connection` (first in the table) goes with all its lines in one lookup, and the headers
    // it nominates after it.
    if present & 1 != 0
        && let Entry::Occupied(connection) = headers.entry(header::CONNECTION)
    {
        let nominated = nominated_by(|| connection.iter());
        connection.remove_entry_mult();
        for name in nominated {
            headers.remove(name);
        }
    }
    for (index, name) in HOP_BY_HOP.iter().enumerate().skip(1) {
        if present & (1 << index) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes CORS response headers, so that the gateway's own CORS layer is the only authority
/// (vLLM answers `Access-Control-Allow-Origin: *` by default; two such headers make browsers fail).
pub fn strip_cors(headers: &mut HeaderMap) {
    for name in [
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        header::ACCESS_CONTROL_ALLOW_METHODS,
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        header::ACCESS_CONTROL_MAX_AGE,
    ] {
        headers.remove(name);
    }
}

const EVENT_STREAM: &str = "text/event-stream";

/// True when the response is a Server-Sent Events stream.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim_start().get(..EVENT_STREAM.len()))
        .is_some_and(|media_type| media_type.eq_ignore_ascii_case(EVENT_STREAM))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn fixed_and_nominated_hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert("x-custom", HeaderValue::from_static("kept"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        strip_hop_by_hop(&mut headers);
        // (A removal moves the last header into its place: the order of names is not kept.)
        let mut left: Vec<_> = headers.keys().map(|name| name.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "x-custom"]);
    }

    #[test]
    fn the_length_filter_passes_every_hop_by_hop_name() {
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(index), "{name}");
        }
        for name in ["host", "user-agent", "content-type", "x-connection"] {
            let name = HeaderName::from_static(name);
            assert_eq!(hop_by_hop_index(&name), None, "{name}");
        }
    }

    #[test]
    fn a_connection_header_over_several_lines_goes_with_what_it_nominates() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.append(header::CONNECTION, HeaderValue::from_static("x-a, , X-B"));
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert("x-b", HeaderValue::from_static("2"));
        headers.insert("x-c", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|name| name.as_str()).collect();
        assert_eq!(left, ["x-c"]);
    }

    #[test]
    fn a_connection_line_with_a_byte_that_is_not_text_still_nominates_the_rest() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-a, \xe9, close").expect("obs-text is a valid value"),
        );
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert("x-c", HeaderValue::from_static("3"));
        assert!(asks_to_close(&headers[header::CONNECTION]));
        assert_eq!(nominated(&headers), [HeaderName::from_static("x-a")]);
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|name| name.as_str()).collect();
        assert_eq!(left, ["x-c"]);
    }

    #[test]
    fn event_stream_is_recognised_with_parameters_and_case() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Text/Event-Stream; charset=utf-8"),
        );
        assert!(is_event_stream(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_event_stream(&headers));
    }
}
