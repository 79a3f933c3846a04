//! The Anodot 3.0 side of delivery: the stream schema each point is posted to (found
//! by name, or created), and the watermarks that tell Anodot a bucket of a stream is
//! complete.

use std::collections::{BTreeMap, HashSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{now_epoch, DeliveryError, Engine};
use crate::sinks::anodot::api::{ApiError, PostOutcome};
use crate::sinks::anodot::encode3::{self, Stream};
use crate::sinks::anodot::retry::Failure;
use crate::sinks::anodot::spool::{self, FileCursor};
use crate::sinks::anodot::Point;

impl Engine {
    /// Finds or creates the 3.0 schemas the points need.
    pub(super) async fn ensure_schemas(
        &mut self,
        points: &[(String, Point)],
        stop: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let mut needed: Vec<(String, Stream)> = Vec::new();
        for (model, p) in points {
            let k = (model.clone(), encode3::stream_of(p.what()));
            if !self.schemas.contains_key(&k) && !needed.contains(&k) {
                needed.push(k);
            }
        }
        for (model, stream) in needed {
            let sample: Vec<Point> = points.iter().filter(|(m, _)| *m == model).map(|(_, p)| p.clone()).collect();
            self.schema_id(&model, stream, &sample, stop).await?;
        }
        Ok(())
    }

    async fn schema_id(
        &mut self,
        model: &str,
        stream: Stream,
        sample: &[Point],
        stop: &CancellationToken,
    ) -> Result<String, DeliveryError> {
        if let Some(id) = self.schemas.get(&(model.to_string(), stream)) {
            return Ok(id.clone());
        }
        let name = stream.schema_name(&self.settings.anodot.schema_prefix, model);
        let mut retry = self.retry();
        loop {
            let found = match self.client.find_schema(&name).await {
                Ok(Some(id)) => Ok(id),
                Ok(None) => {
                    let schema = encode3::schema(&name, stream, sample);
                    let created = self.client.create_schema(&schema).await;
                    if created.is_ok() {
                        info!(message = "Anodot stream schema created.", schema = %name);
                    }
                    created
                }
                Err(e) => Err(e),
            };
            match found {
                Ok(id) => {
                    self.schemas.insert((model.to_string(), stream), id.clone());
                    return Ok(id);
                }
                Err(e) => {
                    let reason = format!("stream schema {name}: {e}");
                    let failure = match e {
                        ApiError::Transient(_) => Failure::Transient { reason, retry_after: None },
                        ApiError::Fatal(_) => Failure::Halt { reason },
                    };
                    self.pause(&mut retry, failure, 0, stop).await?;
                }
            }
        }
    }

    /// Posts, per model and stream, the watermark of the latest bucket that is complete
    /// and answered for, with every earlier bucket of that model answered for too.
    pub(super) async fn post_watermarks(&mut self, stop: &CancellationToken) -> Result<(), DeliveryError> {
        let files = spool::list(&self.root)?;
        let width = self.settings.bucket.as_secs().max(1) as i64;
        let horizon = self.settings.label_horizon.as_secs() as i64;
        let now = now_epoch();
        // (model, stream) -> files whose watermark bit is to be set, and the watermark.
        let mut due: BTreeMap<(String, Stream), (Vec<String>, i64)> = BTreeMap::new();
        let mut blocked: HashSet<String> = HashSet::new();
        for f in &files {
            if blocked.contains(&f.model) {
                continue;
            }
            let c = self.cursor.get(&f.key);
            if !c.settled(f.size) {
                blocked.insert(f.model.clone());
                continue;
            }
            let end = f.bucket_start + width;
            for stream in Stream::ALL {
                if c.watermarks & stream.bit() != 0 {
                    continue;
                }
                if stream == Stream::Labels && now < end + horizon + width {
                    continue;
                }
                let entry = due.entry((f.model.clone(), stream)).or_insert_with(|| (Vec::new(), end));
                entry.0.push(f.key.clone());
                entry.1 = entry.1.max(end);
            }
        }
        for ((model, stream), (keys, watermark)) in due {
            let id = self.schema_id(&model, stream, &[], stop).await?;
            let mut retry = self.retry();
            loop {
                match self.client.post_watermark(&id, watermark).await {
                    PostOutcome::Answered { .. } => break,
                    PostOutcome::Refused { rejected, .. } => {
                        let why = rejected.first().map(|e| e.description.clone()).unwrap_or_default();
                        warn!(message = "Anodot refused a watermark.", model = %model, watermark, reason = %why);
                        break;
                    }
                    PostOutcome::Failed(failure) => self.pause(&mut retry, failure, 0, stop).await?,
                }
            }
            self.totals.watermarks += 1;
            self.metrics.watermarks.inc();
            let updates: Vec<(String, FileCursor)> = keys
                .into_iter()
                .map(|k| {
                    let mut c = self.cursor.get(&k);
                    c.watermarks |= stream.bit();
                    (k, c)
                })
                .collect();
            self.cursor.commit(&updates)?;
        }
        Ok(())
    }
}
