//! libpq's TLS options of a PostgreSQL connection string, and the connector that applies them.
//!
//! tokio-postgres knows the `sslmode`s `disable`, `prefer` and `require` only, and none of `sslrootcert`,
//! `sslcert`, `sslkey`. [`split_tls_options`] takes libpq's TLS options out of a connection string (URL or
//! `key=value` form) and leaves tokio-postgres the rest, with an `sslmode` it knows; [`PgConnector`] then
//! connects as libpq does:
//!
//! | `sslmode` | TLS | certificate check |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (default) | when the server offers it; a failed handshake retries in clear text | none |
//! | `require` | always | none; the chain (as `verify-ca`) when `sslrootcert` is given |
//! | `verify-ca` | always | the chain up to a trusted CA |
//! | `verify-full` | always | the chain and the host name |
//!
//! `sslrootcert` names the CA file to trust instead of the default set (system roots and
//! `FLOWCRAFT_TLS_CA_FILE`); `sslrootcert=system` trusts the system roots and needs `verify-full`, as in libpq 16.
//! `sslcert` / `sslkey` name a client certificate (else `FLOWCRAFT_TLS_CERT_FILE` / `FLOWCRAFT_TLS_KEY_FILE`);
//! `sslsni=0` sends no server name; `sslpassword` is dropped (encrypted keys are not supported: the key must be
//! unencrypted PEM).

use std::path::PathBuf;

use deadpool_postgres::Connect;
use futures::future::BoxFuture;
use percent_encoding::percent_decode_str;
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;
use crate::tls::{ClientTls, Roots, TlsSettings, Verify};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it (libpq tries clear text first; here it is treated as `prefer`).
    Allow,
    /// TLS when the server offers it, clear text otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS, no certificate check (the chain when `sslrootcert` is given).
    Require,
    /// TLS, the chain is checked.
    VerifyCa,
    /// TLS, the chain and the host name are checked.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, StoreError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(StoreError::config(format!(
                    "invalid PostgreSQL sslmode {other:?}: use disable, allow, prefer, require, verify-ca or verify-full"
                )));
            }
        })
    }

    /// The `sslmode` tokio-postgres is given.
    fn for_tokio_postgres(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow | SslMode::Prefer => "prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
        }
    }
}

/// The TLS options of a PostgreSQL connection string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LibpqTls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: a CA file, or `system`.
    pub root_cert: Option<String>,
    /// `sslcert`.
    pub cert: Option<PathBuf>,
    /// `sslkey`.
    pub key: Option<PathBuf>,
    /// `sslsni` (default on).
    pub sni: bool,
}

impl LibpqTls {
    /// The rustls options of these settings; `None` when no TLS is attempted.
    pub fn client_tls(&self) -> Result<Option<ClientTls>, StoreError> {
        let roots = match self.root_cert.as_deref() {
            None => Roots::Default,
            Some("system") if self.mode != SslMode::VerifyFull => {
                return Err(StoreError::config(format!(
                    "PostgreSQL sslrootcert=system needs sslmode=verify-full (a weaker sslmode {:?} would trust any \
                     public certificate for any host)",
                    self.mode
                )));
            }
            Some("system") => Roots::System,
            Some(path) => Roots::File(PathBuf::from(path)),
        };
        let verify = match self.mode {
            SslMode::Disable => return Ok(None),
            SslMode::Allow | SslMode::Prefer => Verify::None,
            SslMode::Require if self.root_cert.is_some() => Verify::ChainOnly,
            SslMode::Require => Verify::None,
            SslMode::VerifyCa => Verify::ChainOnly,
            SslMode::VerifyFull => Verify::Full,
        };
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => {
                return Err(StoreError::config(
                    "PostgreSQL sslcert and sslkey must be given together (a client certificate needs its key)",
                ));
            }
        };
        Ok(Some(ClientTls { verify, roots, identity, sni: self.sni }))
    }
}

/// Take libpq's TLS options out of a connection string: returns the string for tokio-postgres (with an `sslmode`
/// it understands) and the options.
pub fn split_tls_options(conn: &str) -> Result<(String, LibpqTls), StoreError> {
    let mut tls = LibpqTls { sni: true, ..LibpqTls::default() };
    let is_url = conn.starts_with("postgres://") || conn.starts_with("postgresql://");
    let (head, pairs) = if is_url {
        split_url(conn)
    } else {
        match split_key_values(conn) {
            Ok(pairs) => (String::new(), pairs),
            // Not libpq's key=value form either: tokio-postgres reports what is wrong with it.
            Err(_) => return Ok((conn.to_string(), tls)),
        }
    };
    let mut kept = Vec::new();
    for (key, value, raw) in pairs {
        match key.as_str() {
            "sslmode" => tls.mode = SslMode::parse(&value)?,
            "sslrootcert" => tls.root_cert = Some(value),
            "sslcert" => tls.cert = Some(PathBuf::from(value)),
            "sslkey" => tls.key = Some(PathBuf::from(value)),
            "sslsni" => tls.sni = value != "0",
            "sslpassword" => {}
            "sslcrl" | "sslcrldir" | "sslcertmode" | "requirepeer" | "gssencmode" | "krbsrvname" => {
                return Err(StoreError::config(format!("the PostgreSQL connection option {key} is not supported")));
            }
            _ => kept.push(raw),
        }
    }
    let mode = format!("sslmode={}", tls.mode.for_tokio_postgres());
    kept.push(mode);
    let rest = if is_url { format!("{head}?{}", kept.join("&")) } else { kept.join(" ") };
    Ok((rest, tls))
}

/// A URL's part before its query, and its query parameters as `(decoded key, decoded value, raw pair)`.
fn split_url(url: &str) -> (String, Vec<(String, String, String)>) {
    let Some((head, query)) = url.split_once('?') else {
        return (url.to_string(), Vec::new());
    };
    let pairs = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|raw| {
            let (k, v) = raw.split_once('=').unwrap_or((raw, ""));
            let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
            (decode(k), decode(v), raw.to_string())
        })
        .collect();
    (head.to_string(), pairs)
}

/// libpq's `key = value` form (values may be single-quoted, with `\'` and `\\` escapes), as
/// `(key, value, raw pair)`.
fn split_key_values(conn: &str) -> Result<Vec<(String, String, String)>, StoreError> {
    let chars: Vec<char> = conn.chars().collect();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= chars.len() {
            return Ok(pairs);
        }
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '=' {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        skip_ws(&mut i);
        if chars.get(i) != Some(&'=') {
            return Err(StoreError::config(format!(
                "invalid PostgreSQL connection string: missing \"=\" after {key:?} (use a postgres:// URL or key=value \
                 pairs)"
            )));
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = String::new();
        if chars.get(i) == Some(&'\'') {
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(StoreError::config(format!(
                            "invalid PostgreSQL connection string: unterminated quoted value of {key:?}"
                        )));
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') if i + 1 < chars.len() => {
                        value.push(chars[i + 1]);
                        i += 2;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
        }
        let raw: String = chars[start..i].iter().collect();
        pairs.push((key, value, raw));
    }
}

/// Connects the pool's connections as libpq would with the given `sslmode`: TLS with the configured checks, and
/// for `prefer` a retry in clear text when the TLS handshake fails.
pub struct PgConnector {
    tls: Option<MakeRustlsConnect>,
    prefer: bool,
}

impl PgConnector {
    /// The connector of these options.
    pub fn new(options: &LibpqTls, settings: &TlsSettings) -> Result<Self, StoreError> {
        let tls = match options.client_tls()? {
            Some(client) => {
                let config = settings
                    .client_config(&client)
                    .map_err(|e| StoreError::config(format!("PostgreSQL TLS settings: {e}")))?;
                Some(MakeRustlsConnect::new(config))
            }
            None => None,
        };
        Ok(Self { tls, prefer: matches!(options.mode, SslMode::Prefer | SslMode::Allow) })
    }
}

impl Connect for PgConnector {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        let pg_config = pg_config.clone();
        let tls = self.tls.clone();
        let prefer = self.prefer;
        Box::pin(async move {
            let Some(tls) = tls else {
                let (client, connection) = pg_config.connect(NoTls).await?;
                return Ok((client, spawn_connection(connection)));
            };
            match pg_config.connect(tls).await {
                Ok((client, connection)) => Ok((client, spawn_connection(connection))),
                Err(error) if prefer && is_tls_failure(&error) => {
                    tracing::debug!(error = %error, "TLS handshake with PostgreSQL failed; sslmode=prefer retries in clear text.");
                    let mut plain = pg_config;
                    plain.ssl_mode(PgSslMode::Disable);
                    let (client, connection) = plain.connect(NoTls).await?;
                    Ok((client, spawn_connection(connection)))
                }
                Err(error) => Err(error),
            }
        })
    }
}

fn spawn_connection<T>(connection: tokio_postgres::Connection<tokio_postgres::Socket, T>) -> JoinHandle<()>
where
    T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error, "PostgreSQL connection closed with an error.");
        }
    })
}

/// Whether a connection error is a TLS failure (a handshake error, or a server without TLS when TLS is required).
pub fn is_tls_failure(error: &tokio_postgres::Error) -> bool {
    crate::tls::find_rustls_error(error).is_some() || error.to_string().starts_with("error performing TLS handshake")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_are_taken_out() {
        let (rest, tls) = split_tls_options(
            "postgres://app:pw@db:5432/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=a&sslsni=0",
        )
        .unwrap();
        assert_eq!(rest, "postgres://app:pw@db:5432/x?application_name=a&sslmode=require");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert!(!tls.sni);
        let (rest, tls) = split_tls_options("postgresql://db/x").unwrap();
        assert_eq!(rest, "postgresql://db/x?sslmode=prefer");
        assert_eq!(tls.mode, SslMode::Prefer);
        assert!(rest.parse::<tokio_postgres::Config>().is_ok(), "{rest}");
    }

    #[test]
    fn key_value_options_are_taken_out() {
        let (rest, tls) = split_tls_options(
            "host=db user=app password='a b\\'c' sslmode = verify-ca sslcert=/c.pem sslkey=/k.pem sslpassword=x",
        )
        .unwrap();
        assert_eq!(rest, "host=db user=app password='a b\\'c' sslmode=require");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.cert, Some(PathBuf::from("/c.pem")));
        assert!(rest.parse::<tokio_postgres::Config>().is_ok(), "{rest}");
        assert!(split_key_values("host=db user").is_err());
        assert!(split_key_values("host='db").is_err());
        // Left to tokio-postgres, which says what is wrong.
        assert_eq!(split_tls_options("not a url").unwrap().0, "not a url");
    }

    #[test]
    fn modes_map_to_checks() {
        let opts = |mode, root: Option<&str>| LibpqTls {
            mode,
            root_cert: root.map(str::to_string),
            sni: true,
            ..LibpqTls::default()
        };
        assert_eq!(opts(SslMode::Disable, None).client_tls().unwrap(), None);
        let verify = |mode, root| opts(mode, root).client_tls().unwrap().map(|c| c.verify);
        assert_eq!(verify(SslMode::Prefer, None), Some(Verify::None));
        assert_eq!(verify(SslMode::Require, None), Some(Verify::None));
        assert_eq!(verify(SslMode::Require, Some("/ca.pem")), Some(Verify::ChainOnly));
        assert_eq!(verify(SslMode::VerifyCa, None), Some(Verify::ChainOnly));
        assert_eq!(verify(SslMode::VerifyFull, Some("system")), Some(Verify::Full));
        assert!(opts(SslMode::Require, Some("system")).client_tls().is_err());
        assert!(SslMode::parse("verify_full").is_err());
        let half = LibpqTls { cert: Some("/c".into()), ..opts(SslMode::Require, None) };
        assert!(half.client_tls().is_err());
        assert!(split_tls_options("postgres://h/d?sslcrl=/x").is_err());
    }
}
