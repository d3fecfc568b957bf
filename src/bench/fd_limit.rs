//! The open-file limit: every connection is one descriptor in the generator and one in
//! the server, which inherits the limit when the generator starts it.

use super::BenchError;

/// Descriptors beyond the connections: runtimes, the store, log files, stdio.
const SPARE: libc::rlim_t = 256;

/// Raises RLIMIT_NOFILE so `connections` sockets fit, with the hard limit too when the
/// process may (root). Says on stderr when it raised the limit, and fails with the
/// numbers when the hard limit is too low.
pub fn ensure_for(connections: usize) -> Result<(), BenchError> {
    let needed = connections as libc::rlim_t + SPARE;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and reports failure by return value.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        // Unknown limit: let the connections themselves report EMFILE.
        return Ok(());
    }
    let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
    if soft >= needed {
        return Ok(());
    }
    // First try to lift the hard limit as well (works with CAP_SYS_RESOURCE), then
    // settle for the hard limit as it is.
    for wanted_hard in [hard.max(needed), hard] {
        let raised = libc::rlimit {
            rlim_cur: needed.min(wanted_hard),
            rlim_max: wanted_hard,
        };
        // SAFETY: setrlimit only reads the struct; on failure the old limit stays.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            let now = raised.rlim_cur;
            if now > soft {
                eprintln!(
                    "roomd bench: raised RLIMIT_NOFILE from {soft} to {now} (hard {wanted_hard}) \
                     for {connections} connections"
                );
            }
            if now >= needed {
                return Ok(());
            }
            return Err(BenchError::FileLimit {
                connections,
                needed,
                soft: now,
                hard: wanted_hard,
            });
        }
    }
    Err(BenchError::FileLimit {
        connections,
        needed,
        soft,
        hard,
    })
}
