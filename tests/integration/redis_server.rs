//! A private `redis-server` per test: Debian's binary on a unix socket in a temp dir, no TCP
//! (`--port 0`), no persistence, `noeviction`. Killed when dropped. `restart` starts a fresh one on the
//! same socket (the data is gone: that is what "Redis lost the data" looks like).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::TempDir;

pub struct RedisServer {
    dir: TempDir,
    child: Option<Child>,
    /// `unix://…/redis.sock`
    pub url: String,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = TempDir::new("redis");
        let url = format!("unix://{}", dir.join("redis.sock").display());
        let mut r = RedisServer {
            dir,
            child: None,
            url,
        };
        r.spawn();
        r
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.join("redis.sock")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--maxmemory-policy", "noeviction", "--dir"])
            .arg(&self.dir.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True when the server answers PING.
    pub fn ping(&self) -> bool {
        self.command(&["PING"])
            .is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Sends one command over a fresh connection; the raw RESP reply.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = UnixStream::connect(self.socket()).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Kills the server (SIGKILL): clients see the connection drop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A fresh, empty server on the same socket.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
