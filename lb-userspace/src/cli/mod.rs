//! What `lbctl` shows, computed from the maps' contents: pure, so it is unit-tested. One
//! file per view; [`packet`] builds the frames `lbctl explain` runs through the XDP program.

pub mod packet;

mod affinity;
mod capacity;
mod explain;
mod external;
mod flows;
mod maglev;
mod services;
mod stats;
mod table;

pub use affinity::{AffinityRow, affinity, affinity_table, external_affinity, sort_affinity};
pub use capacity::{CapacityRow, capacity, capacity_table, shares_table};
pub use explain::{
    Explanation, NorthSouthPath, Pick, SocketPath, XdpRun, explain, explain_text, xdp_run,
};
pub use external::{Counters, ExternalRow, external, external_table};
pub use flows::{FlowRow, flows, flows_table};
pub use maglev::{MaglevSummary, Share, maglev, maglev_text};
pub use services::{
    BackendRow, ServiceDetail, ServiceRow, SlotRow, backends, backends_table, detail_text,
    service_detail, services, services_table,
};
pub use stats::{
    BackendStatsRow, ServiceStatsRow, backend_stats, backend_stats_table, service_stats,
    service_stats_table, stats, stats_table,
};

#[cfg(test)]
mod tests;
