//! SSRF defences: the host allowlist, the address classification, and the DNS resolver that
//! drops refused addresses before a connection is made.
//!
//! The allowlist is checked on every URL the tool requests, the first and each redirect's. The
//! resolver runs after it, so a name on the allowlist that resolves to a private or metadata
//! address (a misconfigured record, DNS rebinding) is still refused: the connection is only ever
//! made to an address this module returned. IP-literal hosts skip DNS in the HTTP client, so
//! [`HostGuard::check_url`] classifies them itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use crate::error::HttpSearchError;

/// Cloud instance-metadata endpoints (AWS, GCP, Azure, Alibaba, Oracle, ECS, EKS). They are refused
/// even when private addresses are allowed: no search API lives there, and credentials do.
const METADATA_ADDRESSES: [IpAddr; 7] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
];

/// How an address is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// A public unicast address: always allowed.
    Public,
    /// Loopback, private (RFC 1918, unique-local) or shared (CGNAT): allowed with
    /// `allow_private`.
    Private(&'static str),
    /// Metadata, link-local, unspecified, multicast, broadcast or reserved: never allowed.
    Forbidden(&'static str),
}

/// Classifies an address, looking through IPv4-mapped, IPv4-compatible, NAT64 and 6to4 forms
/// so an IPv4 address cannot be smuggled inside an IPv6 one.
fn classify(ip: IpAddr) -> Class {
    if METADATA_ADDRESSES.contains(&ip) {
        return Class::Forbidden("cloud metadata");
    }
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => classify(IpAddr::V4(v4)),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        Class::Private("loopback")
    } else if ip.is_private() {
        Class::Private("private")
    } else if a == 100 && (64..128).contains(&b) {
        Class::Private("shared (carrier-grade NAT)")
    } else if ip.is_link_local() {
        Class::Forbidden("link-local")
    } else if ip.is_unspecified() || a == 0 {
        Class::Forbidden("unspecified")
    } else if ip.is_multicast() {
        Class::Forbidden("multicast")
    } else if ip.is_broadcast() || a >= 240 {
        Class::Forbidden("reserved")
    } else if (a, b, c) == (192, 0, 0) || (a == 198 && (18..20).contains(&b)) {
        Class::Forbidden("special-purpose")
    } else {
        Class::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> Class {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Class::Private("loopback")
    } else if ip.is_unspecified() {
        Class::Forbidden("unspecified")
    } else if first & 0xfe00 == 0xfc00 {
        Class::Private("unique-local")
    } else if first & 0xffc0 == 0xfe80 {
        Class::Forbidden("link-local")
    } else if ip.is_multicast() {
        Class::Forbidden("multicast")
    } else {
        Class::Public
    }
}

/// The IPv4 address inside an IPv6 one, for the forms that route to IPv4.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(mapped) = ip.to_ipv4_mapped() {
        Some(mapped)
    } else if s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified() {
        // IPv4-compatible (deprecated, still routed by some stacks).
        Some(low)
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 well-known prefix.
        Some(low)
    } else if s[0] == 0x2002 {
        // 6to4: the IPv4 address follows the prefix.
        Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ))
    } else {
        None
    }
}

/// Why `ip` is refused, or `None` when it may be connected to.
pub(crate) fn refusal(ip: IpAddr, allow_private: bool) -> Option<&'static str> {
    match classify(ip) {
        Class::Public => None,
        Class::Private(_) if allow_private => None,
        Class::Private(kind) | Class::Forbidden(kind) => Some(kind),
    }
}

/// One `allowed_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// Exactly this host (a domain, lowercase, or an IP address in URL form).
    Exact(String),
    /// Any subdomain of this domain (`*.example.com`), not the domain itself.
    Subdomains(String),
}

/// The allowlist and the private-address switch, checked on every URL before it is requested.
#[derive(Debug, Clone)]
pub(crate) struct HostGuard {
    patterns: Vec<HostPattern>,
    allow_private: bool,
}

impl HostGuard {
    /// Parses `allowed_hosts` entries: host names, IP addresses, or `*.domain`.
    pub(crate) fn new(entries: &[String], allow_private: bool) -> Result<Self, String> {
        let mut patterns = Vec::with_capacity(entries.len());
        for entry in entries {
            let (wildcard, host) = match entry.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, entry.as_str()),
            };
            // Host::parse accepts some text a URL would read differently (a port, a path), so
            // those are rejected first; a bracketed IPv6 address is the one form with ':'.
            let plausible = !host.is_empty()
                && (host.starts_with('[') || !host.contains([':', '/', '@', '*', ' ']));
            let parsed = plausible
                .then(|| Host::parse(host).ok())
                .flatten()
                .ok_or_else(|| {
                    format!("allowed_hosts entry '{entry}' is not a host name or IP address")
                })?;
            if wildcard && !matches!(parsed, Host::Domain(_)) {
                return Err(format!(
                    "allowed_hosts entry '{entry}': wildcards only apply to domain names"
                ));
            }
            let canonical = parsed.to_string();
            patterns.push(if wildcard {
                HostPattern::Subdomains(canonical)
            } else {
                HostPattern::Exact(canonical)
            });
        }
        Ok(Self {
            patterns,
            allow_private,
        })
    }

    /// Whether a resolver should let private addresses through.
    pub(crate) fn allow_private(&self) -> bool {
        self.allow_private
    }

    /// Checks a URL about to be requested: http(s), an allowed host, and for an IP-literal host
    /// an allowed address.
    pub(crate) fn check_url(&self, url: &Url) -> Result<(), HttpSearchError> {
        let host = url.host().ok_or_else(|| HttpSearchError::HostNotAllowed {
            host: String::new(),
        })?;
        let name = host.to_string();
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HttpSearchError::Redirect(format!(
                "scheme '{}' is not http or https",
                url.scheme()
            )));
        }
        let listed = self.patterns.iter().any(|pattern| match pattern {
            HostPattern::Exact(exact) => *exact == name,
            HostPattern::Subdomains(domain) => name
                .strip_suffix(domain.as_str())
                .is_some_and(|prefix| prefix.ends_with('.') && prefix.len() > 1),
        });
        if !listed {
            return Err(HttpSearchError::HostNotAllowed { host: name });
        }
        let literal = match host {
            Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
            Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
            Host::Domain(_) => None,
        };
        if let Some(address) = literal
            && let Some(kind) = refusal(address, self.allow_private)
        {
            return Err(HttpSearchError::AddressRefused {
                host: name,
                address,
                kind,
            });
        }
        Ok(())
    }
}

/// A DNS resolver that returns only the addresses [`refusal`] lets through, and fails with
/// [`HttpSearchError::AddressRefused`] when none is left.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuardedResolver {
    /// Whether loopback and private addresses are allowed.
    pub(crate) allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let allow_private = self.allow_private;
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match refusal(addr.ip(), allow_private) {
                    None => true,
                    Some(kind) => {
                        first_refusal.get_or_insert((addr.ip(), kind));
                        false
                    }
                })
                .collect();
            match first_refusal {
                Some((address, kind)) if allowed.is_empty() => {
                    Err(Box::new(HttpSearchError::AddressRefused {
                        host,
                        address,
                        kind,
                    })
                        as Box<dyn std::error::Error + Send + Sync>)
                }
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn addresses_are_classified() {
        for public in ["8.8.8.8", "93.184.216.34", "2606:4700::1111"] {
            assert_eq!(refusal(ip(public), false), None, "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "::1",
            "fd12::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
        ] {
            assert!(refusal(ip(private), false).is_some(), "{private}");
            assert_eq!(refusal(ip(private), true), None, "{private}");
        }
        for never in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
            "169.254.1.1",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
        ] {
            assert!(refusal(ip(never), true).is_some(), "{never}");
        }
        assert_eq!(refusal(ip("169.254.169.254"), true), Some("cloud metadata"));
    }

    #[test]
    fn allowlist_matches_exact_hosts_and_subdomains() {
        let guard = HostGuard::new(
            &[
                "Search.Example.com".into(),
                "*.corp.test".into(),
                "127.0.0.1".into(),
            ],
            true,
        )
        .unwrap();
        let ok = |u: &str| guard.check_url(&Url::parse(u).unwrap());
        assert!(ok("https://search.example.com/x").is_ok());
        assert!(ok("http://a.corp.test/").is_ok());
        assert!(ok("http://127.0.0.1:9/").is_ok());
        assert!(ok("http://corp.test/").is_err());
        assert!(ok("http://evilcorp.test/").is_err());
        assert!(ok("http://example.com/").is_err());
        assert!(ok("http://search.example.com.evil.test/").is_err());
        assert!(HostGuard::new(&["http://x".into()], false).is_err());
        assert!(HostGuard::new(&["x:80".into()], false).is_err());
        assert!(HostGuard::new(&["*.127.0.0.1".into()], false).is_err());
        assert!(HostGuard::new(&[String::new()], false).is_err());
    }

    #[test]
    fn literal_addresses_are_refused_by_default() {
        let guard = HostGuard::new(&["127.0.0.1".into(), "169.254.169.254".into()], false).unwrap();
        for url in [
            "http://127.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
        ] {
            let err = guard.check_url(&Url::parse(url).unwrap()).unwrap_err();
            assert!(
                matches!(err, HttpSearchError::AddressRefused { .. }),
                "{url}: {err}"
            );
        }
    }
}
