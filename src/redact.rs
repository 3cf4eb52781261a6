//! Secrets never printed: the one redaction used for every log line, error, run error, custom resource status
//! and event that can contain a URL or a connection string.
//!
//! - [`redact_url`] redacts one URL: its user info (user name and password: a user name can be a token) and the
//!   values of query and fragment parameters whose name is secret-like ([`is_secret_name`]: `password`, `token`,
//!   `sslpassword`, `key`, `secret`, `access_token`, `sig`, `apikey`, … case-insensitive).
//! - [`redact_text`] finds the URLs inside a message (`scheme://…` up to white space or a quote) and redacts
//!   each, and redacts `name=value` pairs with a secret-like name outside URLs (libpq's `password=…`
//!   connection strings).
//! - [`credentials`] and [`scrub`] mask the known secrets of a URL wherever a library quotes them (a driver
//!   error may print a bare password).
//!
//! URLs are parsed with the `url` crate. A URL the parser rejects, or one whose path holds an `@` while it has no
//! user info (a raw `/`, `?` or `#` in a password ends the authority early: `amqp://u:12/34@host`), is redacted
//! by text: everything between `://` and its last `@` is user info. That can hide a harmless `@` later in such a
//! URL (`https://host/@scope/pkg` prints as `https://***@scope/pkg`): redacting too much is the safe side.

/// What replaces a secret.
pub const MASK: &str = "***";

/// Whether a parameter name (query, fragment or `name=value` pair) names a secret. Case-insensitive; `-` and `_`
/// are treated alike.
pub fn is_secret_name(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase().replace('-', "_");
    const EXACT: &[&str] = &[
        "key",
        "sig",
        "pwd",
        "pass",
        "auth",
        "code",
        "apikey",
        "api_key",
        "private_key",
        "privatekey",
        "client_key",
        "sslkey_password",
    ];
    const CONTAINS: &[&str] =
        &["password", "passwd", "secret", "token", "signature", "credential", "apikey", "api_key", "access_key"];
    EXACT.contains(&n.as_str()) || CONTAINS.iter().any(|c| n.contains(c))
}

/// Redact one URL (or connection string): user info and secret-like parameter values become `***`.
///
/// A libpq `key=value` connection string loses its `password=…`; any other text that is not a URL is masked
/// whole (a value meant to be a URL may be a bare secret).
pub fn redact_url(input: &str) -> String {
    match input.find("://") {
        Some(i) if i > 0 && is_scheme(&input[..i]) => redact_one_url(input),
        _ if is_key_value_string(input) => redact_pairs(input),
        _ => MASK.to_string(),
    }
}

/// `host=db user=app …`: every white-space separated word is a `key=value` pair.
fn is_key_value_string(input: &str) -> bool {
    let mut words = input.split_whitespace().peekable();
    words.peek().is_some() && words.all(|w| w.split_once('=').is_some_and(|(k, _)| !k.is_empty()))
}

/// Redact every URL found in a message and every `name=value` pair with a secret-like name; the rest of the text
/// is kept as it is.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((start, end)) = next_url(rest) {
        out.push_str(&redact_pairs(&rest[..start]));
        out.push_str(&redact_one_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(&redact_pairs(rest));
    out
}

fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Where the next `scheme://…` token of `text` starts and ends (byte offsets).
fn next_url(text: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let sep = from + found;
        let start = text[..sep]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map(|(i, _)| i)
            .unwrap_or(sep);
        // The scheme must start with a letter: skip leading digits and signs ("1http://" -> "http://").
        let start = text[start..sep].find(|c: char| c.is_ascii_alphabetic()).map(|i| start + i).unwrap_or(sep);
        if start < sep {
            let end = text[sep..]
                .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
                .map(|i| sep + i)
                .unwrap_or(text.len());
            return Some((start, end));
        }
        from = sep + 3;
    }
    None
}

fn redact_one_url(input: &str) -> String {
    match url::Url::parse(input) {
        Ok(url) if !hidden_user_info(input, &url) => redact_parsed(url),
        _ => redact_by_text(input),
    }
}

/// The parser was misled by a raw `/`, `?` or `#` in a password, which ends the authority early: the URL parsed
/// without user info although the part before its query holds an `@`, or its path holds an `@` (the rest of the
/// password: `amqp://u:p@ss/word@host/`).
fn hidden_user_info(input: &str, url: &url::Url) -> bool {
    if url.path().contains('@') {
        return true;
    }
    if !url.username().is_empty() || url.password().is_some() {
        return false;
    }
    let after_scheme = input.find("://").map(|i| &input[i + 3..]).unwrap_or(input);
    let before_query = after_scheme.split(['?', '#']).next().unwrap_or(after_scheme);
    before_query.contains('@')
}

fn redact_parsed(mut url: url::Url) -> String {
    if !url.username().is_empty() || url.password().is_some() {
        // Neither call can fail on a URL that has user info (it has a host).
        let _ = url.set_password(None);
        let _ = url.set_username(MASK);
    }
    if let Some(query) = url.query().map(redact_params)
        && url.query() != Some(query.as_str())
    {
        url.set_query(Some(&query));
    }
    if let Some(fragment) = url.fragment().map(redact_params)
        && url.fragment() != Some(fragment.as_str())
    {
        url.set_fragment(Some(&fragment));
    }
    url.to_string()
}

/// A URL the parser could not make sense of: everything between `://` and the last `@` is user info; the
/// parameters after the first `?` are redacted by name.
fn redact_by_text(input: &str) -> String {
    let Some(sep) = input.find("://") else {
        return redact_pairs(input);
    };
    let (scheme, rest) = input.split_at(sep + 3);
    let rest = match rest.rfind('@') {
        Some(at) => format!("{MASK}{}", &rest[at..]),
        None => rest.to_string(),
    };
    match rest.split_once('?') {
        Some((head, query)) => format!("{scheme}{head}?{}", redact_params(query)),
        None => format!("{scheme}{rest}"),
    }
}

/// `a=1&password=x#…` → `a=1&password=***`, keeping every other byte as it was.
fn redact_params(params: &str) -> String {
    params
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret_name(&percent_encoding::percent_decode_str(name).decode_utf8_lossy()) => {
                format!("{name}={MASK}")
            }
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Redact `name=value` pairs with a secret-like name in free text (`password=x`, `password='x y'`).
fn redact_pairs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let name_start = rest[..eq]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            .last()
            .map(|(i, _)| i)
            .unwrap_or(eq);
        let name = &rest[name_start..eq];
        if name.is_empty() || !is_secret_name(name) {
            out.push_str(&rest[..=eq]);
            rest = &rest[eq + 1..];
            continue;
        }
        out.push_str(&rest[..=eq]);
        let value = &rest[eq + 1..];
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            // libpq quoting: '…' with \' and \\ escapes.
            let mut escaped = false;
            let close = quoted.char_indices().find(|&(_, c)| {
                let end = c == '\'' && !escaped;
                escaped = c == '\\' && !escaped;
                end
            });
            close.map(|(i, _)| i + 2).unwrap_or(value.len())
        } else {
            value.find(|c: char| c.is_whitespace() || matches!(c, '&' | ',' | ';' | '"' | ')')).unwrap_or(value.len())
        };
        if value_len > 0 {
            out.push_str(MASK);
        }
        rest = &value[value_len..];
    }
    out.push_str(rest);
    out
}

/// The credentials of `url` (its password, raw and percent-decoded, and its secret-like query values), for
/// [`scrub`]; not the user name, which is too often a common word to be replaced in free text. A text that is not
/// a URL is a credential itself. Empty when it has none.
pub fn credentials(url: &str) -> Vec<String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return vec![url.to_string()];
    };
    let mut out = Vec::new();
    // A raw `/`, `?` or `#` in the password misleads the parser: the user info then ends at the last `@`.
    if hidden_user_info(url, &parsed)
        && let Some(after) = url.find("://").map(|i| &url[i + 3..])
        && let Some((user_info, _)) = after.rsplit_once('@')
        && let Some((_, password)) = user_info.split_once(':')
    {
        out.push(password.to_string());
        out.push(percent_encoding::percent_decode_str(password).decode_utf8_lossy().into_owned());
    }
    if let Some(raw) = parsed.password() {
        out.push(raw.to_string());
        out.push(percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned());
    }
    for (k, v) in parsed.query_pairs() {
        if is_secret_name(&k) {
            out.push(v.into_owned());
        }
    }
    out.retain(|s| !s.is_empty());
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out.dedup();
    out
}

/// `text` with every occurrence of each credential replaced by [`MASK`] (for messages built by libraries that
/// may quote a URL or a password), and then [`redact_text`].
pub fn scrub(text: &str, credentials: &[String]) -> String {
    let mut out = text.to_string();
    for c in credentials.iter().filter(|c| !c.is_empty()) {
        out = out.replace(c.as_str(), MASK);
    }
    redact_text(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passwords with every character that breaks naive redaction.
    const NASTY: &[&str] = &["p/ss", "p@ss", "p:ss", "p%ss", "p?ss", "p#ss", "a/b@c:d%e?f", "s3cr3t", "%2Fx%40"];

    #[test]
    fn user_info_is_redacted_whatever_the_password_holds() {
        for pw in NASTY {
            for scheme in ["amqp", "amqps", "postgres", "redis", "rediss", "https"] {
                let url = format!("{scheme}://user:{pw}@db.example.com:1234/vhost");
                let out = redact_url(&url);
                assert!(!out.contains(pw), "{url} -> {out}");
                assert!(!out.contains("user"), "the user name is user info too: {url} -> {out}");
                assert!(out.contains("db.example.com"), "{url} -> {out}");
                assert!(out.starts_with(&format!("{scheme}://")), "{out}");
                let text = format!("connecting to {url} failed: refused");
                let out = redact_text(&text);
                assert!(!out.contains(pw), "{text} -> {out}");
                assert!(out.starts_with("connecting to ") && out.ends_with(" failed: refused"), "{out}");
            }
        }
    }

    #[test]
    fn percent_encoded_passwords_are_redacted() {
        let out = redact_url("amqp://guest:pa%2Fss%40w@rabbit:5672/%2f");
        assert_eq!(out, "amqp://***@rabbit:5672/%2f");
        assert_eq!(redact_url("postgres://root@127.0.0.1:5432/test"), "postgres://***@127.0.0.1:5432/test");
    }

    #[test]
    fn urls_without_secrets_are_unchanged() {
        for url in [
            "redis://127.0.0.1:6379/",
            "rediss://cache.example.com:6380/0#insecure",
            "amqp://127.0.0.1:5672/%2f",
            "postgres://db:5432/app?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            "https://api.example.com/v1/items?page=2&limit=10",
        ] {
            assert_eq!(redact_url(url), url);
            let text = format!("GET {url} failed");
            assert_eq!(redact_text(&text), text);
        }
    }

    #[test]
    fn secret_query_parameters_are_redacted_case_insensitively() {
        let out = redact_url(
            "https://h/p?token=abc&Password=def&sslpassword=ghi&KEY=jkl&secret=mno&access_token=pqr&sig=stu&apikey=vwx&page=1",
        );
        for secret in ["abc", "def", "ghi", "jkl", "mno", "pqr", "stu", "vwx"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(out.contains("page=1") && out.contains("Password=***") && out.contains("KEY=***"), "{out}");
        let out = redact_url("https://h/cb#access_token=abc&state=ok");
        assert!(!out.contains("abc") && out.contains("state=ok"), "{out}");
        let out = redact_url("https://h/p?X-Amz-Signature=abc&X-Amz-Credential=def&X-Amz-Security-Token=ghi");
        assert!(!out.contains("abc") && !out.contains("def") && !out.contains("ghi"), "{out}");
    }

    #[test]
    fn unparseable_urls_are_redacted_by_text() {
        // A raw '?' or '#' in the password, and a bad port: the parser gives up; nothing leaks anyway.
        for url in ["amqp://u:pa?ss@h/vh", "amqp://u:pa#ss@h/vh", "amqp://u:s3cr3t@h:notaport/x?token=t0k"] {
            let out = redact_url(url);
            assert!(!out.contains("pa?ss") && !out.contains("pa#ss") && !out.contains("s3cr3t"), "{url} -> {out}");
            assert!(!out.contains("t0k"), "{out}");
            assert!(out.contains("@h"), "{out}");
        }
        // A raw '/' in a numeric password parses as host:port/path: the '@' in the path gives it away.
        let out = redact_url("amqp://u:123/456@h/vh");
        assert_eq!(out, "amqp://***@h/vh");
        // An '@' and a '/' in the password: the first part parses as user info, the rest as a path.
        assert_eq!(redact_url("amqp://app:r@bbit/pw@mq:5672/%2f"), "amqp://***@mq:5672/%2f");
    }

    #[test]
    fn text_without_urls_is_kept_but_loses_password_pairs() {
        assert_eq!(redact_text("plain message: 3 nodes failed"), "plain message: 3 nodes failed");
        assert_eq!(redact_text(""), "");
        assert_eq!(redact_text("a = b, x=1"), "a = b, x=1");
        assert_eq!(redact_text("ratio 1:2 :// nothing"), "ratio 1:2 :// nothing");
        assert_eq!(redact_text("host=db user=app password=s3cr3t dbname=x"), "host=db user=app password=*** dbname=x");
        assert_eq!(redact_text("password='a b\\' c' port=5"), "password=*** port=5");
        assert_eq!(redact_url("host=db password=p@ss:/x"), "host=db password=***");
        // A value that should be a URL but is not one may be a bare secret.
        assert_eq!(redact_url("hunter2"), MASK);
        assert_eq!(redact_url("not a url with hunter2"), MASK);
        // Non-ASCII text survives.
        assert_eq!(redact_text("échec: ünïcode ✓"), "échec: ünïcode ✓");
    }

    #[test]
    fn several_urls_in_one_message() {
        let text = "error sending request for url (https://u:pw1@a.example/x?token=t1): redirect to \
                    \"https://b.example/y?sig=t2\" via amqp://g:pw2@c:5672/%2f";
        let out = redact_text(text);
        for secret in ["pw1", "t1", "t2", "pw2"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(out.starts_with("error sending request for url (https://***@a.example/x?token=***"), "{out}");
        assert!(out.contains("https://b.example/y?sig=***"), "{out}");
        assert!(out.ends_with("amqp://***@c:5672/%2f"), "{out}");
    }

    #[test]
    fn credentials_are_scrubbed_wherever_a_library_quotes_them() {
        let url = "postgres://app:p%3Fw@db/x?sslpassword=k3y";
        let creds = credentials(url);
        for secret in ["p%3Fw", "p?w", "k3y"] {
            assert!(creds.iter().any(|c| c == secret), "{creds:?}");
        }
        let scrubbed = scrub("auth failed for p?w (key k3y) at https://u:z9@h/", &creds);
        assert_eq!(scrubbed, "auth failed for *** (key ***) at https://***@h/");
        assert_eq!(credentials("redis://cache:6379/"), Vec::<String>::new());
        assert_eq!(credentials("not a url"), vec!["not a url".to_string()]);
    }

    #[test]
    fn secret_names() {
        for name in ["password", "PASSWORD", "sslpassword", "token", "access_token", "key", "secret", "sig", "apikey"] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["page", "sslmode", "sslrootcert", "sslkey", "keyfile", "monkey", "user", "host"] {
            assert!(!is_secret_name(name), "{name}");
        }
    }
}
