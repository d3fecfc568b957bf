//! Which client a request comes from, through reverse proxies we trust.
//!
//! Only when the TCP peer is inside `--trusted-proxies` are `Forwarded` (RFC 7239) or,
//! without it, `X-Forwarded-For` believed. The chain is walked from the right (the hop
//! nearest to us) past every trusted proxy; the first address that is not one is the
//! client. A hop that cannot be read (`unknown`, an obfuscated name, garbage) stops the
//! walk at the proxy that wrote it, so a client can never pick its own address by
//! sending a header: it is always at most as far left as the last proxy we trust.
//!
//! The per-IP connection caps, handshake and HTTP rate limits, and connection logs use
//! [`client_ip`]; nothing else reads these headers.

use std::net::IpAddr;
use std::str::FromStr;

use actix_web::HttpRequest;

/// An address block, e.g. `10.0.0.0/8` or `::1/128` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// A `--trusted-proxies` entry that is not a CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an address or CIDR block (e.g. 10.0.0.0/8, 127.0.0.1, ::1/128)")]
pub struct BadCidr(pub String);

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(text: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(text.to_owned());
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text.trim(), None),
        };
        let network: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }
}

impl Cidr {
    /// Whether `ip` lies in this block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The client's address as seen through trusted proxies; None only when the request has
/// no peer address (tests).
pub fn client_ip(req: &HttpRequest, trusted: &[Cidr]) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    Some(resolve(peer, trusted, |name| {
        req.headers()
            .get_all(name)
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect()
    }))
}

/// [`client_ip`] over a header lookup (`name` -> every value of that header, in order).
fn resolve(peer: IpAddr, trusted: &[Cidr], header: impl Fn(&str) -> Vec<String>) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let forwarded = header("forwarded");
    let hops: Vec<Option<IpAddr>> = if !forwarded.is_empty() {
        forwarded
            .iter()
            .flat_map(|v| v.split(','))
            .map(forwarded_for)
            .collect()
    } else {
        header("x-forwarded-for")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|hop| parse_hop(hop.trim()))
            .collect()
    };
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        match hop {
            Some(ip) => {
                client = ip;
                if !is_trusted(ip) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// The `for=` address of one `Forwarded` element, if it is an address.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_hop(value.trim().trim_matches('"')))
            .flatten()
    })
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:80`, `[::1]`, `[::1]:80`, `::1`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (addr, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a literal address")
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter()
            .map(|c| c.parse().expect("a literal block"))
            .collect()
    }

    #[test]
    fn blocks_parse_and_contain() {
        let block: Cidr = "10.0.0.0/8".parse().expect("valid");
        assert!(block.contains(ip("10.200.1.1")));
        assert!(!block.contains(ip("11.0.0.1")));
        assert!(block.contains(ip("::ffff:10.1.2.3")));
        let one: Cidr = "127.0.0.1".parse().expect("valid");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: Cidr = "fd00::/8".parse().expect("valid");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let all: Cidr = "0.0.0.0/0".parse().expect("valid");
        assert!(all.contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "proxy", "10.0.0/8", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Vec<String> + 'a {
        move |name| {
            pairs
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_string())
                .collect()
        }
    }

    #[test]
    fn headers_are_believed_only_from_trusted_peers() {
        let trusted = cidrs(&["10.0.0.0/8"]);
        let xff = [("x-forwarded-for", "203.0.113.7")];
        assert_eq!(
            resolve(ip("10.0.0.5"), &trusted, headers(&xff)),
            ip("203.0.113.7")
        );
        assert_eq!(
            resolve(ip("198.51.100.1"), &trusted, headers(&xff)),
            ip("198.51.100.1"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            resolve(ip("10.0.0.5"), &[], headers(&xff)),
            ip("10.0.0.5"),
            "no trusted proxies: headers are ignored"
        );
    }

    #[test]
    fn the_chain_is_walked_from_the_right_past_trusted_hops_only() {
        let trusted = cidrs(&["10.0.0.0/8"]);
        // A client-forged left part is skipped: the first untrusted hop from the right wins.
        let chain = [("x-forwarded-for", "1.1.1.1, 203.0.113.7, 10.0.0.9")];
        assert_eq!(
            resolve(ip("10.0.0.5"), &trusted, headers(&chain)),
            ip("203.0.113.7")
        );
        let split = [
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "10.0.0.9"),
        ];
        assert_eq!(
            resolve(ip("10.0.0.5"), &trusted, headers(&split)),
            ip("203.0.113.7")
        );
        let garbage = [("x-forwarded-for", "203.0.113.7, nonsense")];
        assert_eq!(
            resolve(ip("10.0.0.5"), &trusted, headers(&garbage)),
            ip("10.0.0.5"),
            "an unreadable hop stops at the proxy that wrote it"
        );
    }

    #[test]
    fn forwarded_wins_over_x_forwarded_for() {
        let trusted = cidrs(&["10.0.0.0/8", "::1"]);
        let both = [
            (
                "forwarded",
                r#"for=192.0.2.60;proto=https, for="[2001:db8::17]:4711";by=10.0.0.1"#,
            ),
            ("x-forwarded-for", "198.51.100.99"),
        ];
        assert_eq!(
            resolve(ip("::1"), &trusted, headers(&both)),
            ip("2001:db8::17")
        );
        let ported = [("forwarded", "for=192.0.2.60:8443")];
        assert_eq!(
            resolve(ip("10.1.1.1"), &trusted, headers(&ported)),
            ip("192.0.2.60")
        );
        let unknown = [("forwarded", "for=unknown")];
        assert_eq!(
            resolve(ip("10.1.1.1"), &trusted, headers(&unknown)),
            ip("10.1.1.1")
        );
    }
}
