//! Where the demo post service keeps posts: the [`PostStore`] trait and its in-memory
//! implementation. Each post is stored with its recipients (author + author's friends), so
//! a user's feed is the newest posts addressed to them. Every store is bounded.

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;

use super::Post;
use crate::ids::UserId;

/// A post together with the users whose feed it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPost {
    /// The post (the feed event's payload).
    pub post: Post,
    /// Who sees it: the author and the author's friends.
    pub recipients: Vec<UserId>,
}

/// Storage of the demo posts. Implementations must bound what they keep.
#[async_trait]
pub trait PostStore: Send + Sync {
    /// A short name for logs ("memory", "redis").
    fn name(&self) -> &'static str;
    /// Stores a post.
    async fn add(&self, post: &StoredPost) -> Result<(), String>;
    /// The newest posts in `user`'s feed, newest first, at most `limit`.
    async fn feed(&self, user: &UserId, limit: usize) -> Result<Vec<Post>, String>;
}

/// Keeps the newest `capacity` posts in memory (one instance only; lost on restart).
#[derive(Debug)]
pub struct MemoryStore {
    capacity: usize,
    posts: Mutex<VecDeque<StoredPost>>,
}

impl MemoryStore {
    /// A store that keeps at most `capacity` posts (the oldest are dropped first).
    pub fn new(capacity: usize) -> MemoryStore {
        MemoryStore {
            capacity: capacity.max(1),
            posts: Mutex::new(VecDeque::new()),
        }
    }
}

#[async_trait]
impl PostStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn add(&self, post: &StoredPost) -> Result<(), String> {
        let mut posts = self.posts.lock().unwrap_or_else(|p| p.into_inner());
        while posts.len() >= self.capacity {
            posts.pop_front();
        }
        posts.push_back(post.clone());
        Ok(())
    }

    async fn feed(&self, user: &UserId, limit: usize) -> Result<Vec<Post>, String> {
        let posts = self.posts.lock().unwrap_or_else(|p| p.into_inner());
        Ok(posts
            .iter()
            .rev()
            .filter(|p| p.recipients.contains(user))
            .take(limit)
            .map(|p| p.post.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::Author;

    fn post(n: u32, recipients: &[&str]) -> StoredPost {
        StoredPost {
            post: Post {
                id: format!("p{n}"),
                author: Author {
                    id: "1001".into(),
                    name: "Alice".into(),
                },
                text: format!("post {n}"),
                created_at: "2026-01-01T00:00:00.000Z".into(),
            },
            recipients: recipients.iter().map(|r| UserId::new(r).unwrap()).collect(),
        }
    }

    #[tokio::test]
    async fn feed_is_newest_first_filtered_and_bounded() {
        let store = MemoryStore::new(3);
        for n in 0..5 {
            let r: &[&str] = if n % 2 == 0 {
                &["1001", "1002"]
            } else {
                &["1003"]
            };
            store.add(&post(n, r)).await.unwrap();
        }
        let bob = UserId::new("1002").unwrap();
        let ids: Vec<String> = store
            .feed(&bob, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        // Only posts 2..5 are kept; of those 2 and 4 are Bob's.
        assert_eq!(ids, vec!["p4", "p2"]);
        assert_eq!(store.feed(&bob, 1).await.unwrap().len(), 1);
        let carol = UserId::new("1003").unwrap();
        assert_eq!(store.feed(&carol, 10).await.unwrap()[0].id, "p3");
    }
}
