//! searchloop-core: the contracts and the agent loop of searchloop, with no heavy dependency.
//!
//! - [`policy`]: the served model as the loop and the trainer see it ([`Policy`]), and the
//!   [`PolicySlot`] that swaps models blue/green.
//! - [`tool`]: typed tools ([`Tool`]) erased to [`DynTool`] in a [`ToolRegistry`].
//! - [`protocol`]: Search-R1's action protocol and the runtime's prefilled action tags.
//! - [`agent`]: the episode loop producing a [`Trajectory`].
//! - [`reward`]: exact match, F1, format, and the ledger-to-reward policy.
//! - [`sink`]: where finished episodes go.
//! - [`scripted`]: a byte-level scripted policy for tests and overhead benchmarks.
//! - `conformance` (feature `conformance`): the suite every tool plugin runs.
//!
//! Backends (mistral.rs, tantivy, SQL, HTTP, candle) live in plugin crates; this crate depends
//! on none of them.

pub mod agent;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod device;
pub mod error;
pub mod policy;
pub mod protocol;
pub mod reward;
pub mod sampling;
pub mod scripted;
pub mod sink;
pub mod tool;
pub mod trajectory;

pub use agent::{Agent, AgentConfig, EpisodeRequest, EpisodeRewardWeights};
pub use device::Device;
pub use error::{Error, Result};
pub use policy::{ChatMessage, FinishReason, Policy, PolicySlot, Role, Sample, SamplingParams};
pub use protocol::{Action, DEFAULT_MAX_QUESTION_CHARS, ProtocolConfig, SolutionStep};
pub use reward::{RewardEntry, RewardPolicy};
pub use sink::{JsonlSink, TrajectorySink};
pub use tool::{DynTool, Tool, ToolError, ToolLimits, ToolOutcome, ToolRegistry};
pub use trajectory::{
    EpisodeEnd, Segment, SegmentKind, Split, TaskInfo, Timing, ToolCallRecord, Trajectory,
};
