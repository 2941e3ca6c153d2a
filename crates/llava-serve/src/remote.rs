//! Downloads for `http(s)` image URLs that cannot be turned against the server's own network:
//! each host is resolved here, its addresses checked, and the connection pinned to the checked
//! address (reqwest's `resolve`), so a DNS answer cannot change between check and connect.
//! Loopback, private, link-local and other non-public ranges are refused unless
//! `--allowed-media-domains` names the host. Redirects are followed by hand, each checked again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::Url;
use reqwest::redirect::Policy;

use crate::config::MediaPolicy;
use crate::error::ApiError;
use crate::media::too_many_bytes;

pub async fn fetch(url: &str, policy: &MediaPolicy) -> Result<Vec<u8>, ApiError> {
    let mut url = Url::parse(url).map_err(|e| ApiError::invalid(format!("bad image URL: {e}")))?;
    for hop in 0..=policy.max_redirects {
        let response = get(&url, policy).await?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "the image server redirected ({status}) without a Location"
                    ))
                })?;
            url = url.join(location).map_err(|e| {
                ApiError::invalid(format!("bad redirect from the image server: {e}"))
            })?;
            if hop == policy.max_redirects {
                break;
            }
            continue;
        }
        if !status.is_success() {
            return Err(ApiError::invalid(format!(
                "the image server answered {status}"
            )));
        }
        return body(response, policy.max_image_bytes).await;
    }
    Err(ApiError::invalid(format!(
        "the image URL redirected more than {} times",
        policy.max_redirects
    )))
}

/// One request, without following redirects, to an address checked for `url`'s host.
async fn get(url: &Url, policy: &MediaPolicy) -> Result<reqwest::Response, ApiError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ApiError::invalid(format!(
            "image URLs are fetched over http or https, not {}",
            url.scheme()
        )));
    }
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Err(ApiError::invalid("the image URL has no host"));
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let allowed = policy
        .allowed_media_domains
        .iter()
        .any(|d| d.eq_ignore_ascii_case(bare));
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| ApiError::invalid(format!("cannot resolve {bare}: {e}")))?
            .collect(),
    };
    let Some(addr) = addrs.iter().find(|a| allowed || is_public(a.ip())).copied() else {
        return Err(ApiError::invalid(format!(
            "{bare} resolves to a loopback, private or otherwise non-public address, which this server does not fetch from (--allowed-media-domains names hosts that may)"
        )));
    };
    let client = reqwest::Client::builder()
        .redirect(Policy::none())
        .timeout(policy.fetch_timeout)
        // A proxy would make the connection elsewhere than to the checked address.
        .no_proxy()
        .resolve(bare, addr)
        .build()
        .map_err(|e| ApiError::internal(format!("cannot start an HTTP client: {e}")))?;
    client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| ApiError::invalid(format!("cannot fetch the image: {e}")))
}

/// The body, cut off as soon as it passes `max_bytes`.
async fn body(mut response: reqwest::Response, max_bytes: usize) -> Result<Vec<u8>, ApiError> {
    if response
        .content_length()
        .is_some_and(|n| n > max_bytes as u64)
    {
        return Err(too_many_bytes(max_bytes));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ApiError::invalid(format!("cannot fetch the image: {e}")))?
    {
        if bytes.len() + chunk.len() > max_bytes {
            return Err(too_many_bytes(max_bytes));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Whether `ip` is on the public internet: not loopback, private, link-local, shared (CGNAT),
/// unspecified, broadcast, multicast, documentation or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (18..20).contains(&b))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        // NAT64 and 6to4 embed an IPv4 address that could be private.
        || (first == 0x0064 && ip.segments()[1] == 0xff9b)
        || first == 0x2002)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().expect("ip")), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(is_public(public.parse().expect("ip")), "{public}");
        }
    }
}
