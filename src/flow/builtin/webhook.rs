//! The `webhook` built-in (docs/architecture.md, "Webhooks"): ends its job waiting for a `POST` to its URL, which
//! carries a random, unguessable token. The record keeps the full URL in its `wait` details (shown by `status`)
//! and, for the lookup, only the SHA-256 of the token.

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::check_params;
use crate::flow::node::{Node, NodeCtx, NodeError, NodeOutput, WaitRequest};
use crate::flow::{Wait, WaitReason};

/// The path under which workers serve webhooks: `POST /webhooks/<token>`.
pub const WEBHOOK_PATH: &str = "/webhooks/";

/// The base URL of webhook URLs when `FLOWCRAFT_WEBHOOK_BASE_URL` is not set (a worker's default webhook
/// address, seen from the same host).
pub const DEFAULT_WEBHOOK_BASE_URL: &str = "http://localhost:8081";

/// Bytes of randomness in a token (256 bits).
const TOKEN_BYTES: usize = 32;

/// `webhook`: waits for a request to its URL; its output and action are the request's. `params.timeout` as for
/// `wait`.
pub(crate) struct WebhookNode {
    base_url: String,
}

impl WebhookNode {
    /// A webhook node whose URLs start with `base_url` (a trailing `/` is dropped).
    pub(crate) fn new(base_url: &str) -> Self {
        Self { base_url: base_url.trim_end_matches('/').to_string() }
    }
}

#[async_trait]
impl Node for WebhookNode {
    fn check_params(&self, params: &Value) -> Vec<String> {
        check_params("webhook", params)
    }

    fn context_needs(&self, _params: &Value) -> crate::flow::ContextNeeds {
        crate::flow::ContextNeeds::none()
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let after = super::wait::wait_timeout("webhook", &ctx.params).map_err(NodeError::fatal)?;
        let url = webhook_url(&self.base_url, &new_token());
        Ok(NodeOutput::waiting(Value::Null, WaitRequest { reason: WaitReason::Webhook, after, url: Some(url) }))
    }
}

/// A fresh token: 256 bits from the thread's CSPRNG (`rand`'s ChaCha, seeded by the OS), URL-safe base64 without
/// padding (43 characters).
pub fn new_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The URL of a token: `base` + `/webhooks/` + token.
pub fn webhook_url(base: &str, token: &str) -> String {
    format!("{}{WEBHOOK_PATH}{token}", base.trim_end_matches('/'))
}

/// What the store keeps to find a token's node: the lowercase hex SHA-256 of the token. A request's token is
/// hashed and looked up by this value, so no comparison ever runs on the secret itself (constant time with
/// respect to it).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The lookup value of a waiting record's webhook ([`token_hash`] of the token at the end of its URL); `None`
/// for other waits.
pub fn stored_token(wait: &Wait) -> Option<String> {
    if wait.reason != WaitReason::Webhook {
        return None;
    }
    let (_, token) = wait.url.as_deref()?.rsplit_once(WEBHOOK_PATH)?;
    (!token.is_empty()).then(|| token_hash(token))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::flow::node::test_ctx;

    #[tokio::test]
    async fn webhook_waits_on_a_fresh_url_with_its_timeout() {
        let node = WebhookNode::new("https://hooks.example.com/");
        let out = node.run(test_ctx(json!({"timeout": "1h"}), json!("in"))).await.unwrap();
        let wait = out.wait.unwrap();
        assert_eq!((wait.reason, wait.after), (WaitReason::Webhook, Some(Duration::from_secs(3600))));
        let url = wait.url.unwrap();
        let token = url.strip_prefix("https://hooks.example.com/webhooks/").unwrap();
        assert_eq!(token.len(), 43);
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let again = node.run(test_ctx(json!({}), json!(1))).await.unwrap().wait.unwrap();
        assert_ne!(again.url.as_deref(), Some(url.as_str()), "every node waits on its own token");
        assert_eq!(again.after, None);
        assert!(node.run(test_ctx(json!({"timeout": "later"}), json!(1))).await.is_err());
        assert_eq!(
            check_params("webhook", &json!({"timeout": "later"})),
            ["webhook: params.timeout \"later\" is not a duration"]
        );
        assert!(check_params("webhook", &json!({"timeout": "30s"})).is_empty());
    }

    #[test]
    fn the_store_keeps_the_hash_of_a_webhook_token_only() {
        let url = webhook_url("http://h:1/", "abc");
        assert_eq!(url, "http://h:1/webhooks/abc");
        let wait = Wait { reason: WaitReason::Webhook, wake_at: None, url: Some(url), child_run_id: None, item: None };
        let stored = stored_token(&wait).unwrap();
        assert_eq!(stored, token_hash("abc"));
        assert_eq!(stored, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let other = Wait { reason: WaitReason::ExternalEvent, ..wait.clone() };
        assert_eq!(stored_token(&other), None);
        let empty = Wait { url: Some("http://h/webhooks/".into()), ..wait };
        assert_eq!(stored_token(&empty), None);
    }
}
