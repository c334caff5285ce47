//! `/v1/tokens` for the typed client (`tiersync token …`).

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{Client, ClientError, encode_component};

/// A token as the node lists it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Public id.
    pub id: String,
    /// Who holds it.
    pub name: String,
    /// `operator`, `analyst` or `admin`.
    pub role: String,
    /// The only categories it may touch, if limited.
    #[serde(default)]
    pub categories: Option<Vec<String>>,
    /// Created, ms since the epoch.
    pub created_ms: u64,
    /// Revoked, ms since the epoch.
    #[serde(default)]
    pub revoked_ms: Option<u64>,
}

fn unexpected(url: String, e: serde_json::Error) -> ClientError {
    ClientError::Unexpected {
        url,
        status: 200,
        reason: format!("not a token list: {e}"),
    }
}

impl Client {
    /// `POST /v1/tokens`: a new token; the answer's `token` is shown once.
    pub fn token_create(
        &self,
        name: &str,
        role: &str,
        categories: Option<&[String]>,
    ) -> Result<Json, ClientError> {
        let url = format!("{}/v1/tokens", self.base);
        let mut body = json!({"name": name, "role": role});
        if let Some(c) = categories {
            body["categories"] = json!(c);
        }
        let r = self
            .agent
            .post(&url)
            .content_type("application/json")
            .send(&body.to_string());
        self.json(&url, r)
    }

    /// `GET /v1/tokens`: every token of the node, revoked ones included.
    pub fn tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        let url = format!("{}/v1/tokens", self.base);
        let body = self.json(&url, self.agent.get(&url).call())?;
        serde_json::from_value(body).map_err(|e| unexpected(url, e))
    }

    /// `DELETE /v1/tokens/{id}`: revoke a token.
    pub fn token_revoke(&self, id: &str) -> Result<TokenInfo, ClientError> {
        let url = format!("{}/v1/tokens/{}", self.base, encode_component(id));
        let body = self.json(&url, self.agent.delete(&url).call())?;
        serde_json::from_value(body).map_err(|e| unexpected(url, e))
    }
}
