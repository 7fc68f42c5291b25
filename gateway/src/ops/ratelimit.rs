//! Rate-limited warnings: in the core, where the data path logs what unauthenticated
//! peers can trigger; the admin thread rolls the window (`roll_window`).

pub use devgate_core::ratelimit::*;
