//! Reconnect delays: exponential backoff with full jitter (AWS architecture blog,
//! "Exponential Backoff And Jitter"), so many clients cut by one server restart do not
//! come back in lockstep.

use std::time::Duration;

use super::options::Reconnect;

/// The ceiling of attempt `attempt` (1-based): `min(cap, base * 2^(attempt-1))`.
pub(crate) fn ceiling(policy: &Reconnect, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    policy
        .base
        .checked_mul(1u32 << doublings)
        .unwrap_or(policy.cap)
        .min(policy.cap)
}

/// A uniformly random delay in `0 ..= ceiling(policy, attempt)`.
pub(crate) fn delay(policy: &Reconnect, attempt: u32) -> Duration {
    ceiling(policy, attempt).mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Reconnect {
        Reconnect {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            max_attempts: None,
        }
    }

    #[test]
    fn ceiling_doubles_from_base_up_to_cap() {
        let p = policy();
        assert_eq!(ceiling(&p, 1), Duration::from_millis(100));
        assert_eq!(ceiling(&p, 2), Duration::from_millis(200));
        assert_eq!(ceiling(&p, 5), Duration::from_millis(1600));
        assert_eq!(ceiling(&p, 6), Duration::from_secs(2));
        assert_eq!(ceiling(&p, u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let p = policy();
        let delays: Vec<Duration> = (0..200).map(|_| delay(&p, 3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        // Full jitter spreads over the whole range, not just near the ceiling.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(200)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(200)));
    }
}
