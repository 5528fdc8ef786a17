//! The feed hub at `/hubs/feed`: authenticated users only; every connection is registered
//! under its user id, and the user's backplane channel is `feed-<userId>`, so
//! `PUBLISH feed-42 <json>` from anyone reaches every connection of user 42 on every node as
//! `FeedUpdated(<json>)`.

use crate::backplane::channel::UserChannelStyle;
use crate::hub::{HubBuilder, HubContext, HubDefinition, HubError};

/// The path of the feed hub.
pub const FEED_HUB_PATH: &str = "/hubs/feed";

/// The client method feed events invoke.
pub const FEED_TARGET: &str = "FeedUpdated";

/// The feed hub declaration.
pub fn feed_hub() -> HubDefinition {
    HubBuilder::new(FEED_HUB_PATH)
        .configure(|o| {
            o.require_auth = true;
            o.user_channels = UserChannelStyle::Plain("feed-".to_string());
            o.feed_target = FEED_TARGET.to_string();
            // A feed must not lose events over a network blip: resume on a new socket.
            o.stateful_reconnect = true;
            // A feed outliving its token would keep delivering to someone logged out.
            o.close_on_token_expiry = true;
        })
        // Lets a page show who it is connected as (and check the connection end to end).
        .method("WhoAmI", |ctx: HubContext, (): ()| async move {
            Ok::<_, HubError>(ctx.user_id().map(str::to_string))
        })
        .build()
}
