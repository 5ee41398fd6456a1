//! lb-probe: the servers and clients of the datapath tests and the demo.
//!
//! `serve` answers every TCP line and UDP datagram with `<name> <client address> <payload>`;
//! the client commands print one JSON [`Attempt`] per request.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use lb_tests::probe::{Attempt, errno_name};

#[derive(Debug, Parser)]
#[command(name = "lb-probe")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve TCP and UDP on [::]:PORT (both families), answering with NAME.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// COUNT short TCP connections to ADDR, one request each.
    Tcp {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Bytes of each request line (padded; the answer echoes it): more than a segment
        /// takes path MTU discovery.
        #[arg(long, default_value_t = 0)]
        size: usize,
    },
    /// COUNT UDP requests to ADDR, from one socket: unconnected (sendto/recvfrom) or
    /// connected.
    Udp {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        connected: bool,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// One connection to ADDR, kept open: a request now, then one per line on stdin. With
    /// --udp a connected UDP socket that, like a resolver, reconnects after an error and
    /// retries once (both attempts are printed).
    Hold {
        addr: SocketAddr,
        #[arg(long)]
        udp: bool,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Benchmark: COUNT times socket, connect, close (with an RST, so no TIME_WAIT piles
    /// up) to ADDR; prints the connect latencies' summary as JSON.
    ConnectLoop {
        addr: SocketAddr,
        #[arg(long)]
        count: u32,
    },
    /// Benchmark: new TCP connections to ADDR, one request and answer each, for SECONDS;
    /// prints the number done as JSON.
    Crr {
        addr: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    /// Benchmark: COUNT requests and answers over one TCP connection to ADDR; prints the
    /// round trips' summary as JSON.
    Rr {
        addr: SocketAddr,
        #[arg(long)]
        count: u32,
    },
    /// Benchmark: prints `ready`, then tries one short TCP request to ADDR after another
    /// (PAUSE_US apart) until the answer comes from backend NAME (or, with --not, until it
    /// does not), for at most TIMEOUT_MS; prints JSON `{"done", "attempts"}` at once then.
    Until {
        addr: SocketAddr,
        #[arg(long)]
        backend: String,
        #[arg(long)]
        not: bool,
        #[arg(long, default_value_t = 200)]
        pause_us: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Benchmark traffic: transmits COUNT copies of one UDP frame from SRC to DST out of
    /// DEV (a veth: they arrive at its peer), made in the kernel by an XDP_TX program run in
    /// live-frames mode; prints JSON `{"sent", "seconds"}`.
    XdpFlood {
        #[arg(long)]
        dev: String,
        /// DEV's MAC address.
        #[arg(long)]
        src_mac: String,
        /// The peer's MAC address.
        #[arg(long)]
        dst_mac: String,
        #[arg(long)]
        src: SocketAddr,
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long)]
        count: u32,
    },
    /// Robustness traffic: TCP SYNs to DST (IPv4) from random spoofed sources in
    /// 198.18.0.0/15, which nothing answers, through a raw socket, RATE per second at most,
    /// until SECONDS have passed or COUNT were sent; prints JSON `{"sent", "seconds"}`.
    SynFlood {
        dst: SocketAddr,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 50_000)]
        rate: u64,
    },
    /// Benchmark sink: drops every packet arriving on DEV at tc ingress until stdin closes;
    /// prints `ready` once attached.
    TcSink {
        #[arg(long)]
        dev: String,
    },
    /// One HTTP/1.0 GET of PATH to ADDR: prints the status code on a line, then the body.
    HttpGet {
        addr: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

fn print(a: &Attempt) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(a).expect("serializes"));
    let _ = out.flush();
}

fn failed(e: &io::Error, started: Instant) -> Attempt {
    Attempt {
        error: Some(errno_name(e)),
        micros: started.elapsed().as_micros() as u64,
        ..Attempt::default()
    }
}

/// Fills backend and client from a reply `<name> <client> <payload>`.
fn answered(reply: &str, peer: Option<SocketAddr>, started: Instant) -> Attempt {
    let mut words = reply.split_whitespace();
    Attempt {
        backend: words.next().map(str::to_owned),
        client: words.next().map(str::to_owned),
        peer: peer.map(|p| p.to_string()),
        error: None,
        micros: started.elapsed().as_micros() as u64,
    }
}

fn request(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>) -> io::Result<String> {
    request_of(stream, reader, 0)
}

/// One request line of `size` bytes at least ("ping" padded), and its answer.
fn request_of(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    size: usize,
) -> io::Result<String> {
    let mut line = b"ping".to_vec();
    line.resize(size.max(line.len()), b'x');
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line)
}

fn tcp_once(addr: SocketAddr, timeout: Duration, size: usize) -> Attempt {
    let started = Instant::now();
    let result = (|| {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        let peer = stream.peer_addr().ok();
        let mut reader = BufReader::new(stream.try_clone()?);
        Ok::<_, io::Error>((request_of(&mut stream, &mut reader, size)?, peer))
    })();
    match result {
        Ok((reply, peer)) => answered(&reply, peer, started),
        Err(e) => failed(&e, started),
    }
}

/// An unbound-port UDP socket of `addr`'s family with a receive timeout.
fn udp_socket(addr: SocketAddr, timeout: Duration) -> io::Result<UdpSocket> {
    let any: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("valid");
    let sock = UdpSocket::bind(any)?;
    sock.set_read_timeout(Some(timeout))?;
    Ok(sock)
}

fn udp(addr: SocketAddr, count: u32, connected: bool, timeout: Duration) -> io::Result<()> {
    let sock = udp_socket(addr, timeout)?;
    if connected {
        let started = Instant::now();
        if let Err(e) = sock.connect(addr) {
            // The connect is the attempt: report it once per request asked for.
            let attempt = failed(&e, started);
            (0..count).for_each(|_| print(&attempt));
            return Ok(());
        }
    }
    let mut buf = [0u8; 512];
    for _ in 0..count {
        let started = Instant::now();
        let result = if connected {
            sock.send(b"ping")
                .and_then(|_| sock.recv(&mut buf))
                .map(|n| (n, sock.peer_addr().ok()))
        } else {
            sock.send_to(b"ping", addr)
                .and_then(|_| sock.recv_from(&mut buf))
                .map(|(n, from)| (n, Some(from)))
        };
        print(&match result {
            Ok((n, peer)) => answered(&String::from_utf8_lossy(&buf[..n]), peer, started),
            Err(e) => failed(&e, started),
        });
    }
    Ok(())
}

fn hold(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let started = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            print(&failed(&e, started));
            return Ok(());
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    let peer = stream.peer_addr().ok();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut once = |started| match request(&mut stream, &mut reader) {
        Ok(reply) => answered(&reply, peer, started),
        Err(e) => failed(&e, started),
    };
    print(&once(started));
    for line in io::stdin().lock().lines() {
        line?;
        print(&once(Instant::now()));
    }
    Ok(())
}

fn hold_udp(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let connect = || -> io::Result<UdpSocket> {
        let sock = udp_socket(addr, timeout)?;
        sock.connect(addr)?;
        Ok(sock)
    };
    let once = |sock: &UdpSocket| {
        let started = Instant::now();
        let mut buf = [0u8; 512];
        match sock.send(b"ping").and_then(|_| sock.recv(&mut buf)) {
            Ok(n) => answered(
                &String::from_utf8_lossy(&buf[..n]),
                sock.peer_addr().ok(),
                started,
            ),
            Err(e) => failed(&e, started),
        }
    };
    let mut sock = connect()?;
    print(&once(&sock));
    for line in io::stdin().lock().lines() {
        line?;
        let attempt = once(&sock);
        print(&attempt);
        if attempt.error.is_some() {
            sock = connect()?;
            print(&once(&sock));
        }
    }
    Ok(())
}

/// A closed-by-RST connection to `addr`: the connect's duration.
fn connect_once(addr: SocketAddr) -> io::Result<Duration> {
    use socket2::{Domain, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let started = Instant::now();
    let sock = Socket::new(domain, Type::STREAM, None)?;
    sock.connect(&addr.into())?;
    let took = started.elapsed();
    sock.set_linger(Some(Duration::ZERO))?;
    drop(sock);
    Ok(took)
}

fn summary(mut samples: Vec<Duration>, errors: u32, first_error: Option<String>) {
    samples.sort();
    let pick = |q: f64| {
        samples
            .get(((samples.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "{}",
        serde_json::json!({"count": samples.len(), "errors": errors, "first_error": first_error,
                           "p50_us": pick(0.5), "p99_us": pick(0.99)})
    );
}

fn connect_loop(addr: SocketAddr, count: u32) {
    let mut samples = Vec::with_capacity(count as usize);
    let (mut errors, mut first_error) = (0, None);
    for _ in 0..count {
        match connect_once(addr) {
            Ok(d) => samples.push(d),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| errno_name(&e));
            }
        }
    }
    summary(samples, errors, first_error);
}

fn crr(addr: SocketAddr, seconds: f64) {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let (mut done, mut errors) = (0u64, 0u64);
    while Instant::now() < end {
        let one = || -> io::Result<()> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut reader = BufReader::new(stream.try_clone()?);
            request(&mut stream, &mut reader)?;
            socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))
        };
        match one() {
            Ok(()) => done += 1,
            Err(_) => errors += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"done": done, "errors": errors, "seconds": seconds})
    );
}

fn rr(addr: SocketAddr, count: u32) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut samples = Vec::with_capacity(count as usize);
    let (mut errors, mut first_error) = (0, None);
    for _ in 0..count {
        let started = Instant::now();
        match request(&mut stream, &mut reader) {
            Ok(_) => samples.push(started.elapsed()),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| errno_name(&e));
            }
        }
    }
    summary(samples, errors, first_error);
    Ok(())
}

fn until(addr: SocketAddr, backend: &str, not: bool, pause: Duration, timeout: Duration) {
    println!("ready");
    let _ = io::stdout().flush();
    let end = Instant::now() + timeout;
    let mut attempts = 0u64;
    let done = loop {
        attempts += 1;
        let a = tcp_once(addr, Duration::from_millis(500), 0);
        if (a.backend.as_deref() == Some(backend)) != not {
            break true;
        }
        if Instant::now() >= end {
            break false;
        }
        thread::sleep(pause);
    };
    println!(
        "{}",
        serde_json::json!({"done": done, "attempts": attempts})
    );
}

fn ifindex(dev: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(dev).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: a valid NUL-terminated name.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

fn mac(text: &str) -> io::Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| io::ErrorKind::InvalidInput)?;
    bytes
        .try_into()
        .map_err(|_| io::ErrorKind::InvalidInput.into())
}

fn xdp_flood(
    dev: &str,
    (src_mac, dst_mac): (&str, &str),
    src: SocketAddr,
    dst: SocketAddr,
    count: u32,
) -> io::Result<()> {
    let index = ifindex(dev)?;
    let mut frame = lb_tests::packet::frame(lb_tests::packet::UDP, src, dst, b"lb-bench flood");
    frame[..6].copy_from_slice(&mac(dst_mac)?);
    frame[6..12].copy_from_slice(&mac(src_mac)?);
    let prog = lb_tests::xdpgen::load_generator(&frame)?;
    let took = lb_tests::xdpgen::transmit(&prog, &frame, index, count)?;
    println!(
        "{}",
        serde_json::json!({"sent": count, "seconds": took.as_secs_f64()})
    );
    Ok(())
}

fn syn_flood(dst: SocketAddr, seconds: u64, count: u64, rate: u64) -> io::Result<()> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    if !dst.is_ipv4() || rate == 0 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // IPPROTO_RAW: the datagrams carry their own IP header (with the spoofed source).
    let sock = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    let to = SockAddr::from(SocketAddr::new(dst.ip(), 0));
    let (started, limit) = (Instant::now(), Duration::from_secs(seconds));
    let mut sent = 0u64;
    while sent < count && started.elapsed() < limit {
        // Paced in steps of a millisecond: ahead of the rate, wait.
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(started.elapsed())
            && ahead > Duration::from_millis(1)
        {
            thread::sleep(ahead);
        }
        let src = SocketAddr::new(
            [
                198,
                fastrand::u8(18..=19),
                fastrand::u8(..),
                fastrand::u8(1..255),
            ]
            .into(),
            fastrand::u16(1024..),
        );
        let frame = lb_tests::packet::tcp_frame(src, dst, lb_tests::packet::SYN, b"");
        // Past the Ethernet header.
        sock.send_to(&frame[14..], &to)?;
        sent += 1;
    }
    println!(
        "{}",
        serde_json::json!({"sent": sent, "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(())
}

fn tc_sink(dev: &str) -> io::Result<()> {
    let prog = lb_tests::xdpgen::load_sink()?;
    let _link = lb_tests::xdpgen::attach_tc_ingress(&prog, ifindex(dev)?)?;
    println!("ready");
    io::stdout().flush()?;
    let mut rest = String::new();
    while io::stdin().read_line(&mut rest)? > 0 {}
    Ok(())
}

fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<()> {
    let (status, body) = lb_tests::http_get(addr, path, timeout)?;
    println!("{status}\n{body}");
    Ok(())
}

fn serve(name: String, port: u16) -> io::Result<()> {
    let tcp = TcpListener::bind(("::", port))?;
    let udp = UdpSocket::bind(("::", port))?;
    let udp_name = name.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let reply = format!("{udp_name} {from} {}", String::from_utf8_lossy(&buf[..n]));
            let _ = udp.send_to(reply.as_bytes(), from);
        }
    });
    for stream in tcp.incoming() {
        let Ok(mut stream) = stream else { continue };
        // Answers go out at once, in one write each: no Nagle delay behind a delayed ACK.
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        thread::spawn(move || {
            let client = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let Ok(clone) = stream.try_clone() else {
                return;
            };
            for line in BufReader::new(clone).lines() {
                let Ok(line) = line else { return };
                let answer = format!("{name} {client} {line}\n");
                if stream.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

fn main() -> io::Result<()> {
    match Args::parse().command {
        Cmd::Serve { name, port } => serve(name, port),
        Cmd::Tcp {
            addr,
            count,
            timeout_ms,
            size,
        } => {
            for _ in 0..count {
                print(&tcp_once(addr, Duration::from_millis(timeout_ms), size));
            }
            Ok(())
        }
        Cmd::Udp {
            addr,
            count,
            connected,
            timeout_ms,
        } => udp(addr, count, connected, Duration::from_millis(timeout_ms)),
        Cmd::Hold {
            addr,
            udp: false,
            timeout_ms,
        } => hold(addr, Duration::from_millis(timeout_ms)),
        Cmd::Hold {
            addr,
            udp: true,
            timeout_ms,
        } => hold_udp(addr, Duration::from_millis(timeout_ms)),
        Cmd::HttpGet {
            addr,
            path,
            timeout_ms,
        } => http_get(addr, &path, Duration::from_millis(timeout_ms)),
        Cmd::ConnectLoop { addr, count } => {
            connect_loop(addr, count);
            Ok(())
        }
        Cmd::Crr { addr, seconds } => {
            crr(addr, seconds);
            Ok(())
        }
        Cmd::Rr { addr, count } => rr(addr, count),
        Cmd::SynFlood {
            dst,
            seconds,
            count,
            rate,
        } => syn_flood(dst, seconds, count, rate),
        Cmd::XdpFlood {
            dev,
            src_mac,
            dst_mac,
            src,
            dst,
            count,
        } => xdp_flood(&dev, (&src_mac, &dst_mac), src, dst, count),
        Cmd::TcSink { dev } => tc_sink(&dev),
        Cmd::Until {
            addr,
            backend,
            not,
            pause_us,
            timeout_ms,
        } => {
            until(
                addr,
                &backend,
                not,
                Duration::from_micros(pause_us),
                Duration::from_millis(timeout_ms),
            );
            Ok(())
        }
    }
}
