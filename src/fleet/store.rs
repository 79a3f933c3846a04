//! The fleet's keys in Redis (one server or a Redis Cluster).
//!
//! Per bucket of a model, under the hash tag `{MODEL:START}` so that they share a
//! cluster slot and one Lua script sees them together:
//! - `PREFIX:fp:{MODEL:START}`: hash of partial states, one field per replica process;
//! - `PREFIX:fc:{MODEL:START}`: the claim, holding its fencing token, with the lease as TTL;
//! - `PREFIX:ft:{MODEL:START}`: the fencing counter (each claim takes the next token);
//! - `PREFIX:fd:{MODEL:START}`: the done marker, set when the merged bucket was emitted.
//!
//! And `PREFIX:fdue`, a sorted set of `MODEL\x1fSTART` by the time the bucket may be
//! claimed; `PREFIX:fref:{MODEL}:VERSION:SIGNATURE`, the shared drift references.
//! Every key but the index and the references has a TTL; the index loses a member
//! when its bucket is done.

use crate::monitor::Reference;
use crate::tfserving::StreamKey;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, Script};
use std::time::Duration;

/// How long a Redis call may take before it counts as failed.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes a partial unless the bucket is already claimed or done.
/// KEYS: partials, claim, done. ARGV: field, state, ttl ms.
const WRITE_LUA: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// Claims a bucket: fails when it is done or a live lease holds it; else takes the
/// next fencing token and returns it with every partial.
/// KEYS: partials, claim, fence, done. ARGV: lease ms, retention ms.
const CLAIM_LUA: &str = r#"
if redis.call('EXISTS', KEYS[4]) == 1 then return {'done', 0, {}} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'held', 0, {}} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone', 0, {}} end
local token = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('SET', KEYS[2], token, 'PX', ARGV[1])
return {'claimed', token, redis.call('HVALS', KEYS[1])}
"#;

/// Renews a lease if the token still holds it. KEYS: claim. ARGV: token, lease ms.
const RENEW_LUA: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Marks a bucket done if the token still holds its claim, and drops its partials.
/// KEYS: claim, done, partials. ARGV: token, retention ms.
const FINISH_LUA: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[3], KEYS[1])
return 1
"#;

/// A connection to one Redis or a Redis Cluster; the fleet and the labels' Redis
/// store both open theirs with `Connection::open`.
#[derive(Clone)]
pub enum Connection {
    /// One Redis: reconnects by itself, pipelines concurrent requests.
    Single(ConnectionManager),
    /// A cluster: routes each command to its slot's node.
    Cluster(ClusterConnection),
}

impl Connection {
    /// Connects to one Redis (one URL) or a cluster (several node URLs).
    pub async fn open(nodes: &[String]) -> Result<Connection, RedisError> {
        Ok(match nodes {
            [] => return Err(RedisError::from((ErrorKind::InvalidClientConfig, "no Redis address given"))),
            [url] => {
                let client = redis::Client::open(url.as_str())?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(REDIS_TIMEOUT)
                    .set_response_timeout(REDIS_TIMEOUT);
                Connection::Single(ConnectionManager::new_with_config(client, config).await?)
            }
            many => {
                let client = redis::cluster::ClusterClient::builder(many.to_vec())
                    .connection_timeout(REDIS_TIMEOUT)
                    .response_timeout(REDIS_TIMEOUT)
                    .build()?;
                Connection::Cluster(client.get_async_connection().await?)
            }
        })
    }

    /// Runs one command on whichever kind of connection this is.
    pub async fn query<T: FromRedisValue>(&self, cmd: Cmd) -> Result<T, RedisError> {
        match self.clone() {
            Connection::Single(mut c) => cmd.query_async(&mut c).await,
            Connection::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }
}

/// The outcome of a claim.
#[derive(Debug)]
pub enum Claim {
    /// This replica holds the bucket until the lease ends: its partials.
    Claimed { token: i64, partials: Vec<Vec<u8>> },
    /// Another replica holds a live lease.
    Held,
    /// Already emitted.
    Done,
    /// No partial left (expired, or never written).
    Gone,
}

/// A connection to the fleet's Redis with its keys and scripts.
#[derive(Clone)]
pub struct FleetStore {
    connection: Connection,
    prefix: String,
}

fn redis_error(e: RedisError) -> String {
    e.to_string()
}

impl FleetStore {
    /// Connects to one Redis (one URL) or a cluster (several node URLs).
    pub async fn connect(nodes: &[String], prefix: &str) -> Result<FleetStore, String> {
        let connection = Connection::open(nodes).await.map_err(redis_error)?;
        Ok(FleetStore { connection, prefix: prefix.to_string() })
    }

    fn keys(&self, model: &str, start: i64) -> [String; 4] {
        let tag = format!("{{{model}:{start}}}");
        let p = &self.prefix;
        [format!("{p}:fp:{tag}"), format!("{p}:fc:{tag}"), format!("{p}:ft:{tag}"), format!("{p}:fd:{tag}")]
    }

    fn index_key(&self) -> String {
        format!("{}:fdue", self.prefix)
    }

    fn reference_key(&self, key: &StreamKey) -> String {
        let version = key.version.map(|v| v.to_string()).unwrap_or_default();
        format!("{}:fref:{{{}}}:{version}:{}", self.prefix, key.model, key.signature)
    }

    async fn query<T: FromRedisValue>(&self, cmd: Cmd) -> Result<T, String> {
        self.connection.query(cmd).await.map_err(redis_error)
    }

    /// `EVALSHA`, falling back to `EVAL` when the node does not know the script yet.
    async fn eval<T: FromRedisValue>(&self, source: &str, keys: &[&str], args: &[&[u8]]) -> Result<T, String> {
        let script = Script::new(source);
        let build = |verb: &str, body: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(body).arg(keys.len()).arg(keys);
            for a in args {
                cmd.arg(*a);
            }
            cmd
        };
        let first = self.connection.query::<T>(build("EVALSHA", script.get_hash())).await;
        match first {
            Err(e) if e.kind() == ErrorKind::NoScriptError => self.query(build("EVAL", source)).await,
            other => other.map_err(redis_error),
        }
    }

    /// Writes this replica's partial of a bucket and registers the bucket as due at
    /// `due_ms` (the earliest registration wins). False when the bucket was already
    /// claimed or emitted: the partial came too late.
    pub async fn write_partial(
        &self,
        model: &str,
        start: i64,
        replica: &str,
        state: &[u8],
        due_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, String> {
        // The index first: a partial never exists without its index entry.
        let member = format!("{model}\x1f{start}");
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(self.index_key()).arg("NX").arg(due_ms).arg(&member);
        self.query::<i64>(zadd).await?;
        let [partials, claim, _, done] = self.keys(model, start);
        let ttl = ttl_ms.max(1).to_string();
        let written: i64 =
            self.eval(WRITE_LUA, &[&partials, &claim, &done], &[replica.as_bytes(), state, ttl.as_bytes()]).await?;
        Ok(written == 1)
    }

    /// Buckets due at `now_ms`, oldest first.
    pub async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<(String, i64)>, String> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(self.index_key()).arg("-inf").arg(now_ms).arg("LIMIT").arg(0).arg(limit);
        let members: Vec<String> = self.query(cmd).await?;
        Ok(members
            .into_iter()
            .filter_map(|m| {
                let (model, start) = m.rsplit_once('\x1f')?;
                Some((model.to_string(), start.parse().ok()?))
            })
            .collect())
    }

    /// Tries to claim a bucket for `lease_ms`.
    pub async fn claim(&self, model: &str, start: i64, lease_ms: i64, retention_ms: i64) -> Result<Claim, String> {
        let [partials, claim, fence, done] = self.keys(model, start);
        let (lease, retention) = (lease_ms.to_string(), retention_ms.to_string());
        let (status, token, states): (String, i64, Vec<Vec<u8>>) = self
            .eval(CLAIM_LUA, &[&partials, &claim, &fence, &done], &[lease.as_bytes(), retention.as_bytes()])
            .await?;
        Ok(match status.as_str() {
            "claimed" => Claim::Claimed { token, partials: states },
            "held" => Claim::Held,
            "done" => Claim::Done,
            _ => Claim::Gone,
        })
    }

    /// Renews the lease if `token` still holds it; false when it was lost.
    pub async fn renew(&self, model: &str, start: i64, token: i64, lease_ms: i64) -> Result<bool, String> {
        let [_, claim, _, _] = self.keys(model, start);
        let (token, lease) = (token.to_string(), lease_ms.to_string());
        let renewed: i64 = self.eval(RENEW_LUA, &[&claim], &[token.as_bytes(), lease.as_bytes()]).await?;
        Ok(renewed == 1)
    }

    /// Marks the bucket emitted if `token` still holds it; false when it was lost.
    pub async fn finish(&self, model: &str, start: i64, token: i64, retention_ms: i64) -> Result<bool, String> {
        let [partials, claim, _, done] = self.keys(model, start);
        let (token, retention) = (token.to_string(), retention_ms.to_string());
        let finished: i64 =
            self.eval(FINISH_LUA, &[&claim, &done, &partials], &[token.as_bytes(), retention.as_bytes()]).await?;
        Ok(finished == 1)
    }

    /// Removes a bucket from the due index.
    pub async fn forget_due(&self, model: &str, start: i64) -> Result<(), String> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(self.index_key()).arg(format!("{model}\x1f{start}"));
        self.query::<i64>(cmd).await.map(|_| ())
    }

    /// The shared drift reference of a stream, if one was published.
    pub async fn reference(&self, key: &StreamKey) -> Result<Option<Reference>, String> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.reference_key(key));
        let json: Option<Vec<u8>> = self.query(cmd).await?;
        Ok(json.and_then(|j| serde_json::from_slice(&j).ok()))
    }

    /// Publishes a reference unless one was published first; returns the one in use.
    pub async fn publish_reference(&self, key: &StreamKey, candidate: &Reference) -> Result<Reference, String> {
        let json = serde_json::to_vec(candidate).map_err(|e| e.to_string())?;
        let mut set = redis::cmd("SET");
        set.arg(self.reference_key(key)).arg(json).arg("NX");
        let _: Option<String> = self.query(set).await?;
        Ok(self.reference(key).await?.unwrap_or_else(|| candidate.clone()))
    }
}
