//! The egress policy of the `http` node: which addresses a request may reach.
//!
//! Denied by default, because a blueprint or a run input must not turn a worker into a proxy into its own
//! network: loopback, unspecified, link-local (with the cloud metadata endpoints `169.254.169.254` and
//! `fd00:ec2::254`), private (`10/8`, `172.16/12`, `192.168/16`, `fc00::/7`), shared (`100.64/10`), multicast and
//! reserved addresses. Everything else is allowed.
//!
//! Allow and deny lists (`FLOWCRAFT_HTTP_ALLOW`, `FLOWCRAFT_HTTP_DENY`, comma-separated) hold CIDRs (`10.1.0.0/16`),
//! addresses (`10.1.2.3`) and host names (`shop.default.svc.cluster.local`, or `*.example.com` for every name
//! under `example.com`). The most specific entry decides: a host name entry before any CIDR, a longer host
//! pattern before a shorter one, a longer prefix before a shorter one, and `deny` when both lists hold an entry
//! as specific. An allowed entry lifts a default denial; with no entry matching, the default applies. So
//! `FLOWCRAFT_HTTP_DENY=0.0.0.0/0,::/0` with an allow list makes the allow list the only destinations.
//!
//! The policy is enforced on the addresses a host name resolves to (the `http` node's DNS resolver drops the
//! denied ones and connects only to what it returns, so a name cannot be re-pointed between check and connect),
//! on addresses written in URLs, and again on every redirect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

/// An entry of an allow or deny list is not a CIDR, an address or a host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid egress {list} entry '{entry}': expected a CIDR (10.0.0.0/8), an address or a host name (*.example.com)"
)]
pub struct EgressEntryError {
    /// `allow` or `deny`.
    pub list: &'static str,
    /// The entry.
    pub entry: String,
}

/// A destination the policy refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress to {destination} is denied: {why}")]
pub struct EgressDenied {
    /// The host and address.
    pub destination: String,
    /// Which rule refused it.
    pub why: String,
}

/// A host name entry: an exact name, or every name under a suffix (`*.example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostPattern {
    name: String,
    wildcard: bool,
}

impl HostPattern {
    /// How specifically this pattern matches `host` (longer is more specific, exact beats wildcard), if it does.
    fn specificity(&self, host: &str) -> Option<usize> {
        if self.wildcard {
            let under = host.len() > self.name.len()
                && host.ends_with(&self.name)
                && host.as_bytes()[host.len() - self.name.len() - 1] == b'.';
            under.then_some(2 * self.name.len())
        } else {
            (host == self.name).then_some(2 * self.name.len() + 1)
        }
    }
}

/// Which addresses and hosts the `http` node may reach. The default denies the ranges listed in the module
/// documentation and allows everything else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    allow_nets: Vec<IpNet>,
    deny_nets: Vec<IpNet>,
    allow_hosts: Vec<HostPattern>,
    deny_hosts: Vec<HostPattern>,
}

/// The ranges denied unless allowed, with what they are.
const DEFAULT_DENIED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "an unspecified address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address (cloud metadata)"),
    ("10.0.0.0/8", "a private address"),
    ("172.16.0.0/12", "a private address"),
    ("192.168.0.0/16", "a private address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("192.0.0.0/24", "an IETF protocol address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("fe80::/10", "a link-local address"),
    ("fc00::/7", "a private (unique local) address (cloud metadata)"),
    ("ff00::/8", "a multicast address"),
];

impl EgressPolicy {
    /// A policy from comma-separated allow and deny lists (empty entries are ignored).
    pub fn new(allow: &str, deny: &str) -> Result<Self, EgressEntryError> {
        let mut policy = Self::default();
        for (list, text) in [("allow", allow), ("deny", deny)] {
            for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                policy.add(list, entry)?;
            }
        }
        Ok(policy)
    }

    fn add(&mut self, list: &'static str, entry: &str) -> Result<(), EgressEntryError> {
        let invalid = || EgressEntryError { list, entry: entry.to_string() };
        let net = IpNet::from_str(entry).ok().or_else(|| IpAddr::from_str(entry).ok().map(IpNet::from));
        if let Some(net) = net {
            let nets = if list == "allow" { &mut self.allow_nets } else { &mut self.deny_nets };
            nets.push(net.trunc());
            return Ok(());
        }
        let (wildcard, name) = match entry.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, entry),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(invalid());
        }
        let hosts = if list == "allow" { &mut self.allow_hosts } else { &mut self.deny_hosts };
        hosts.push(HostPattern { name, wildcard });
        Ok(())
    }

    /// The decision of the host name entries for `host`: `Some(true)` allowed, `Some(false)` denied, `None` when
    /// no host entry matches.
    fn host_decision(&self, host: &str) -> Option<bool> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let best = |patterns: &[HostPattern]| patterns.iter().filter_map(|p| p.specificity(&host)).max();
        match (best(&self.allow_hosts), best(&self.deny_hosts)) {
            (None, None) => None,
            (Some(a), Some(d)) => Some(a > d),
            (allow, _) => Some(allow.is_some()),
        }
    }

    /// Check a host name before it is resolved: denied when a host entry denies it (its addresses are checked
    /// when it is resolved).
    pub fn check_host(&self, host: &str) -> Result<(), EgressDenied> {
        match self.host_decision(host) {
            Some(false) => {
                Err(EgressDenied { destination: host.to_string(), why: "the host is in the deny list".into() })
            }
            _ => Ok(()),
        }
    }

    /// Check an address, reached through `host` (a name) or written as it is (`None`).
    pub fn check(&self, host: Option<&str>, ip: IpAddr) -> Result<(), EgressDenied> {
        let destination = match host {
            Some(h) if h.parse::<IpAddr>().is_err() => format!("{h} ({ip})"),
            _ => ip.to_string(),
        };
        let denied = |why: String| Err(EgressDenied { destination: destination.clone(), why });
        if let Some(allowed) = host.and_then(|h| self.host_decision(h)) {
            return if allowed { Ok(()) } else { denied("the host is in the deny list".into()) };
        }
        let ip = canonical(ip);
        let best = |nets: &[IpNet]| nets.iter().filter(|n| n.contains(&ip)).map(IpNet::prefix_len).max();
        match (best(&self.allow_nets), best(&self.deny_nets)) {
            (Some(a), Some(d)) if a > d => return Ok(()),
            (_, Some(_)) => return denied("the address is in the deny list".into()),
            (Some(_), None) => return Ok(()),
            (None, None) => {}
        }
        match default_denial(ip) {
            Some(what) => denied(format!("{what}, denied unless allowed (FLOWCRAFT_HTTP_ALLOW)")),
            None => Ok(()),
        }
    }
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`, or NAT64's `64:ff9b::7f00:1`) as the IPv4 address it
/// reaches.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// What a default-denied address is, if it is one.
fn default_denial(ip: IpAddr) -> Option<&'static str> {
    DEFAULT_DENIED
        .iter()
        .find(|(net, _)| IpNet::from_str(net).is_ok_and(|n| n.contains(&ip)))
        .map(|(_, what)| *what)
        .or_else(|| (ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED)).then_some("an unspecified address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_deny_internal_addresses() {
        let p = EgressPolicy::default();
        for denied in [
            "127.0.0.1",
            "169.254.169.254",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "0.0.0.0",
            "100.100.100.200",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            let err = p.check(None, ip(denied)).unwrap_err();
            assert!(err.to_string().contains("denied"), "{denied}: {err}");
        }
        for allowed in ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "172.32.0.1"] {
            assert!(p.check(None, ip(allowed)).is_ok(), "{allowed}");
        }
        let err = p.check(Some("metadata.google.internal"), ip("169.254.169.254")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "egress to metadata.google.internal (169.254.169.254) is denied: a link-local address (cloud metadata), \
             denied unless allowed (FLOWCRAFT_HTTP_ALLOW)"
        );
    }

    #[test]
    fn the_most_specific_entry_decides() {
        let p = EgressPolicy::new("10.0.0.0/8, 127.0.0.1, shop.default.svc.cluster.local", "10.9.0.0/16").unwrap();
        assert!(p.check(None, ip("10.1.2.3")).is_ok(), "allowed CIDR lifts the default denial");
        assert!(p.check(None, ip("10.9.1.1")).is_err(), "a longer deny prefix wins");
        assert!(p.check(None, ip("127.0.0.1")).is_ok());
        assert!(p.check(None, ip("127.0.0.2")).is_err());
        assert!(p.check(Some("shop.default.svc.cluster.local"), ip("192.168.7.7")).is_ok(), "a host entry lifts it");
        assert!(p.check(Some("SHOP.default.svc.cluster.local."), ip("192.168.7.7")).is_ok());
        assert!(p.check(Some("other.default.svc.cluster.local"), ip("192.168.7.7")).is_err());

        // only the allow list
        let only = EgressPolicy::new("*.example.com,203.0.113.0/24", "0.0.0.0/0,::/0").unwrap();
        assert!(only.check(Some("api.example.com"), ip("198.51.100.1")).is_ok());
        assert!(only.check(Some("example.com"), ip("198.51.100.1")).is_err(), "*.x does not match x");
        assert!(only.check(None, ip("203.0.113.9")).is_ok());
        assert!(only.check(None, ip("8.8.8.8")).is_err());
        assert!(only.check(Some("evil.com"), ip("8.8.8.8")).is_err());

        // deny beats allow at equal specificity; an exact name beats a wildcard
        let p = EgressPolicy::new("1.2.3.0/24,*.example.com", "1.2.3.0/24,bad.example.com").unwrap();
        assert!(p.check(None, ip("1.2.3.4")).is_err());
        assert!(p.check(Some("bad.example.com"), ip("8.8.8.8")).is_err());
        assert!(p.check_host("bad.example.com").is_err());
        assert!(p.check_host("good.example.com").is_ok());
        assert!(p.check(Some("good.example.com"), ip("127.0.0.1")).is_ok());
    }

    #[test]
    fn entries_are_validated() {
        assert!(EgressPolicy::new("", " , ").is_ok());
        assert!(EgressPolicy::new("fd00::/8,::1", "*.internal").is_ok());
        let err = EgressPolicy::new("10.0.0.0/33", "").unwrap_err();
        assert_eq!(err.entry, "10.0.0.0/33");
        assert!(err.to_string().contains("allow"), "{err}");
        assert!(EgressPolicy::new("", "http://x").is_err());
        assert!(EgressPolicy::new("", "a..b").is_err());
        assert!(EgressPolicy::new("*", "").is_err());
    }
}
