//! The lag-driven autoscaler (in progress): one control loop per function.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use weir_broker_bridge::{BrokerKind, LagProbe};

use crate::config::ScalingConfig;
use crate::pool::InstancePool;

/// Run the control loop of one function until `shutdown`.
pub async fn control_loop(
    function: Arc<str>,
    broker: BrokerKind,
    pool: Arc<InstancePool>,
    probe: Option<Arc<dyn LagProbe>>,
    settings: ScalingConfig,
    shutdown: CancellationToken,
) {
    let _ = (function, broker, pool, probe, settings);
    shutdown.cancelled().await;
}
