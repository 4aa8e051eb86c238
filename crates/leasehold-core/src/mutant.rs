//! Deliberately weakened rules of the [`Machine`](crate::machine::Machine), for the simulation's
//! mutation tests: a simulation that does not catch each of them checks too little. Only built
//! with the `chaos-mutants` feature, which is off by default.

/// One rule of the machine weakened on purpose. See
/// [`Machine::with_mutant`](crate::machine::Machine::with_mutant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutant {
    /// Validity without the drift margin: `valid_for = lease_duration`, so a leader whose clock
    /// runs slow trusts its term longer than the lock keeps it.
    NoDriftMargin,
    /// Validity counted from the reply of a successful acquire or renew instead of its send
    /// instant, so a slow reply stretches the term past the lock's expiry.
    RenewFromReply,
}
