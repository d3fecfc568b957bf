//! The machine's floor for F1's traffic: how many small frames per second loopback TCP
//! carries from one sending thread to one receiving thread over many connections, with
//! no WebSocket, no runtime and no server logic, and what each frame costs each side in
//! CPU. `roomd bench fanout` F1 (5,000 subscribers, 100 posts/s) needs about 400,000
//! frames/s at its default batch interval; this says what the kernel alone charges for
//! that, with both ends on the same cores, as the server and the generator are.
//!
//!   cargo bench --bench loopback_floor
//!
//! One sender thread writes a 150-byte message to each of `ROOMD_FLOOR_CONNS` (5,000)
//! connections in turn, at `ROOMD_FLOOR_RATE` frames/s in total (0: as fast as it can),
//! for `ROOMD_FLOOR_SECS` (5) seconds; one receiver thread waits on epoll and reads
//! every ready connection into one buffer. Each thread's CPU time is its own
//! (`RUSAGE_THREAD`), so the kernel's loopback work lands on whichever side does it, as
//! in the real runs (the sender's `send` also runs the receiver's TCP input). Loopback
//! only; stops by itself.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FRAME: usize = 150;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) of the calling thread.
fn thread_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given; RUSAGE_THREAD is Linux's.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

struct Side {
    frames: u64,
    cpu_s: f64,
}

fn main() {
    let conns = env_or("ROOMD_FLOOR_CONNS", 5000) as usize;
    let rate = env_or("ROOMD_FLOOR_RATE", 0);
    let secs = env_or("ROOMD_FLOOR_SECS", 5);
    raise_fd_limit(conns * 2 + 64);

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut senders = Vec::with_capacity(conns);
    let mut receivers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let client = TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        for s in [&client, &server] {
            s.set_nodelay(true).expect("nodelay");
            s.set_nonblocking(true).expect("nonblocking");
        }
        senders.push(server);
        receivers.push(client);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || receive(receivers, &stop))
    };
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || send(senders, rate, &stop))
    };
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    let got = receiver.join().expect("receiver");
    let secs = secs as f64;
    let per_frame_us = |side: &Side| side.cpu_s * 1e6 / got.frames.max(1) as f64;
    println!(
        "loopback_floor: {conns} connections, {FRAME}-byte frames, rate {}, {secs} s",
        if rate == 0 {
            "unlimited".to_string()
        } else {
            format!("{rate}/s")
        }
    );
    println!(
        "  sent {:.0}/s, received {:.0}/s",
        sent.frames as f64 / secs,
        got.frames as f64 / secs
    );
    println!(
        "  sender   {:.2} CPU-s ({:.0}% of a core), {:.2} µs per frame received",
        sent.cpu_s,
        sent.cpu_s / secs * 100.0,
        per_frame_us(&sent)
    );
    println!(
        "  receiver {:.2} CPU-s ({:.0}% of a core), {:.2} µs per frame received",
        got.cpu_s,
        got.cpu_s / secs * 100.0,
        per_frame_us(&got)
    );
    println!(
        "{{\"bench\":\"loopback_floor\",\"connections\":{conns},\"rate\":{rate},\"sent_per_s\":{:.0},\"received_per_s\":{:.0},\"sender_us_per_frame\":{:.3},\"receiver_us_per_frame\":{:.3}}}",
        sent.frames as f64 / secs,
        got.frames as f64 / secs,
        per_frame_us(&sent),
        per_frame_us(&got)
    );
}

/// Writes one frame to each connection in turn; a full socket skips its turn.
fn send(mut conns: Vec<TcpStream>, rate: u64, stop: &AtomicBool) -> Side {
    let frame = [b'x'; FRAME];
    let started = Instant::now();
    let cpu0 = thread_cpu_s();
    let mut frames = 0u64;
    'outer: loop {
        for conn in conns.iter_mut() {
            if frames.is_multiple_of(1024) {
                if stop.load(Ordering::Relaxed) {
                    break 'outer;
                }
                if rate > 0 {
                    let due = Duration::from_secs_f64(frames as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            match conn.write(&frame) {
                Ok(_) => frames += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("send: {e}"),
            }
        }
    }
    Side {
        frames,
        cpu_s: thread_cpu_s() - cpu0,
    }
}

/// Waits on epoll (edge-triggered) and drains every ready connection.
fn receive(mut conns: Vec<TcpStream>, stop: &AtomicBool) -> Side {
    // SAFETY: plain epoll calls on descriptors this thread owns for its whole life.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epoll >= 0, "epoll_create1");
    for (i, conn) in conns.iter().enumerate() {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: i as u64,
        };
        // SAFETY: as above.
        let rc =
            unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, conn.as_raw_fd(), &mut event) };
        assert_eq!(rc, 0, "epoll_ctl");
    }
    let cpu0 = thread_cpu_s();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `events` has room for the count given.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 50) };
        for event in events.iter().take(n.max(0) as usize) {
            let conn = &mut conns[event.u64 as usize];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(got) => {
                        bytes += got as u64;
                        if got < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("recv: {e}"),
                }
            }
        }
    }
    // SAFETY: closing the epoll descriptor created above.
    unsafe { libc::close(epoll) };
    Side {
        frames: bytes / FRAME as u64,
        cpu_s: thread_cpu_s() - cpu0,
    }
}

/// Raises the soft open-file limit to `needed` (or the hard limit).
fn raise_fd_limit(needed: usize) {
    // SAFETY: getrlimit/setrlimit on a struct this function owns.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit
                .rlim_max
                .min(needed as libc::rlim_t)
                .max(limit.rlim_cur);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
