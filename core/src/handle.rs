//! The name of one connection, valid across workers.

/// Names one connection: the worker that owns it, its slot there, and the slot's
/// generation (so a handle to a closed connection never reaches its slot's next tenant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnHandle {
    /// Owning worker.
    pub worker: u16,
    /// Slot in the worker's connection table.
    pub slot: u32,
    /// Generation of the slot when the connection was accepted.
    pub generation: u32,
}
