//! Redaction of credentials in URLs and in text that may quote them (logs, errors, statuses, events).
//!
//! URL-parser based: the password of the user info and the values of credential-like query parameters
//! (`password`, `token`, `sslpassword`, `key`, ...) are replaced by `***`; the rest of the URL stays readable so a
//! message still says which host, port and database it was about.

/// Query parameters whose values are credentials.
const SECRET_PARAMS: &[&str] = &[
    "password",
    "passwd",
    "pass",
    "pwd",
    "token",
    "access_token",
    "secret",
    "sslpassword",
    "key",
    "api_key",
    "apikey",
];

/// The mask written in place of a credential.
pub const MASK: &str = "***";

/// `url` with its password and credential query parameters masked. A text that does not parse as a URL with a
/// scheme and host is masked whole (it may be a credential itself).
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return MASK.to_string();
    };
    if parsed.password().is_some() && parsed.set_password(Some(MASK)).is_err() {
        return MASK.to_string();
    }
    let secret_query = parsed.query_pairs().any(|(k, _)| is_secret_param(&k));
    if secret_query {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_param(&k) { MASK.to_string() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

fn is_secret_param(name: &str) -> bool {
    SECRET_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name))
}

/// The credentials of `url` (its password, raw and percent-decoded, and its credential query values), for
/// [`scrub`]. Empty when it has none.
pub fn credentials(url: &str) -> Vec<String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return vec![url.to_string()];
    };
    let mut out = Vec::new();
    if let Some(password) = parsed.password() {
        out.push(password.to_string());
        if let Ok(decoded) = percent_decode(password) {
            out.push(decoded);
        }
    }
    for (k, v) in parsed.query_pairs() {
        if is_secret_param(&k) {
            out.push(v.into_owned());
        }
    }
    out.retain(|s| !s.is_empty());
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out.dedup();
    out
}

fn percent_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b)))
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
}

/// `text` with every occurrence of each credential replaced by [`MASK`] (for messages built by libraries that
/// may quote a URL or a password).
pub fn scrub(text: &str, credentials: &[String]) -> String {
    let mut out = text.to_string();
    for c in credentials.iter().filter(|c| !c.is_empty()) {
        out = out.replace(c.as_str(), MASK);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_with_special_characters_are_masked() {
        for pw in ["p/w", "p@w", "p:w", "p%25w", "p%3Fw", "s3cr3t"] {
            let url = format!("amqp://user:{pw}@rabbit:5672/%2f");
            let red = redact_url(&url);
            // A raw `/` ends the authority: such a URL does not parse and is masked whole.
            let expected = if pw.contains('/') { MASK } else { "amqp://user:***@rabbit:5672/%2f" };
            assert_eq!(red, expected, "{url}");
            let creds = credentials(&url);
            let text = format!("cannot connect to {url}: refused");
            let scrubbed = scrub(&text, &creds);
            assert!(!scrubbed.contains(pw), "{scrubbed}");
        }
        let decoded = scrub("auth failed for p?w", &credentials("postgres://u:p%3Fw@db/x"));
        assert_eq!(decoded, "auth failed for ***");
    }

    #[test]
    fn credential_query_parameters_are_masked() {
        let red = redact_url("postgres://db:5432/app?sslmode=require&password=hunter2&sslpassword=x");
        assert!(red.contains("sslmode=require") && !red.contains("hunter2") && !red.contains("=x"), "{red}");
        assert_eq!(redact_url("redis://cache:6379/0"), "redis://cache:6379/0");
        assert_eq!(redact_url("not a url with hunter2"), MASK);
        assert_eq!(credentials("redis://cache:6379/"), Vec::<String>::new());
    }
}
