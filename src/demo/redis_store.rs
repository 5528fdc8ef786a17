//! [`RedisStore`]: the demo's posts in Redis, so every instance sharing the Redis serves the
//! same feed history. One list per user (`<prefix>feed:<userId>`, newest first, trimmed to
//! [`RedisStore::per_user`] entries); each entry is the post's JSON. Every command has a
//! timeout; a failing Redis makes posting and feed reads answer 503, never hang.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::store::{PostStore, StoredPost};
use super::Post;
use crate::ids::UserId;

/// Posts kept per user by default.
pub const DEFAULT_PER_USER: usize = 200;
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "feedhub:demo:";

/// Posts in Redis lists, one per recipient.
pub struct RedisStore {
    client: redis::Client,
    connection: OnceCell<redis::aio::MultiplexedConnection>,
    prefix: String,
    per_user: usize,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("per_user", &self.per_user)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store at `url` (`redis://host:port[/db]`) under `prefix`; connects on first use.
    pub fn new(url: &str, prefix: &str) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
        Ok(RedisStore {
            client,
            connection: OnceCell::new(),
            prefix: prefix.to_string(),
            per_user: DEFAULT_PER_USER,
            timeout: Duration::from_secs(2),
        })
    }

    fn key(&self, user: &str) -> String {
        format!("{}feed:{user}", self.prefix)
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let conn = tokio::time::timeout(
            self.timeout,
            self.connection.get_or_try_init(|| async {
                self.client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("cannot connect to Redis: {e}"))
            }),
        )
        .await
        .map_err(|_| "timed out connecting to Redis".to_string())??;
        Ok(conn.clone())
    }

    async fn run<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, String> {
        let mut conn = self.connection().await?;
        tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut conn))
            .await
            .map_err(|_| "Redis did not answer in time".to_string())?
            .map_err(|e| format!("Redis error: {e}"))
    }
}

#[async_trait]
impl PostStore for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn add(&self, post: &StoredPost) -> Result<(), String> {
        let json = serde_json::to_string(&post.post).map_err(|e| e.to_string())?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for user in &post.recipients {
            let key = self.key(user.as_str());
            pipe.lpush(&key, &json).ignore();
            pipe.ltrim(&key, 0, self.per_user as isize - 1).ignore();
        }
        self.run::<()>(&pipe).await
    }

    async fn feed(&self, user: &UserId, limit: usize) -> Result<Vec<Post>, String> {
        let mut pipe = redis::pipe();
        pipe.lrange(self.key(user.as_str()), 0, limit.max(1) as isize - 1);
        let (entries,): (Vec<String>,) = self.run(&pipe).await?;
        Ok(entries
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect())
    }
}
