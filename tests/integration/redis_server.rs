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
    /// With TLS: the loopback port and the CA certificate file.
    pub tls: Option<(u16, std::path::PathBuf)>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A server started with `extra` arguments after the usual ones (a later `--maxmemory-policy`
    /// wins over the default `noeviction`). A `restart` goes back to the usual ones.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = TempDir::new("redis");
        let url = format!("unix://{}", dir.join("redis.sock").display());
        let mut r = RedisServer {
            dir,
            child: None,
            url,
            tls: None,
        };
        r.spawn_with(extra);
        r.wait_ready();
        r
    }

    /// A server that also listens with TLS on a loopback port, with a self-signed certificate for
    /// `localhost` made by `openssl` (the unix socket stays for control commands).
    pub fn start_tls() -> RedisServer {
        let dir = TempDir::new("redis-tls");
        // A CA and a leaf certificate for `localhost` signed by it (rustls refuses a CA certificate
        // used as the server's own).
        let d = dir.path.display().to_string();
        let script = format!(
            "set -e; cd '{d}'; \
             openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
               -subj /CN=herald-test-ca -keyout ca.key -out ca.pem \
               -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign; \
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
               -keyout key.pem -out leaf.csr; \
             printf 'subjectAltName=DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > leaf.ext; \
             openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
               -extfile leaf.ext -out cert.pem"
        );
        let ok = Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("sh and openssl are installed")
            .success();
        assert!(ok, "openssl could not make test certificates");
        let cert = dir.join("ca.pem");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("unix://{}", dir.join("redis.sock").display());
        let mut r = RedisServer {
            dir,
            child: None,
            url,
            tls: Some((port, cert)),
        };
        r.spawn();
        r
    }

    /// The unix socket it listens on.
    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.join("redis.sock")
    }

    fn spawn(&mut self) {
        self.spawn_with(&[]);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Restarts it on the same socket and directory with `extra` arguments, so it loads the data
    /// saved there (`SAVE`), and returns as soon as it answers, while it is still loading (with
    /// `--key-load-delay`, loading takes a while).
    pub fn restart_loading(&mut self, extra: &[&str]) {
        self.stop();
        self.spawn_with(extra);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.is_loading() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start loading"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// True while the server answers `LOADING` (it is loading its data; `PING` is answered even
    /// then, a read is not).
    pub fn is_loading(&self) -> bool {
        self.command(&["EXISTS", "herald-test:loading"])
            .is_some_and(|r| r.starts_with("-LOADING"))
    }

    fn spawn_with(&mut self, extra: &[&str]) {
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
            .args(self.tls_args())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
    }

    fn tls_args(&self) -> Vec<String> {
        match &self.tls {
            None => Vec::new(),
            Some((port, ca)) => {
                let cert = self.dir.join("cert.pem").display().to_string();
                let key = self.dir.join("key.pem").display().to_string();
                vec![
                    "--tls-port".into(),
                    port.to_string(),
                    "--tls-cert-file".into(),
                    cert,
                    "--tls-key-file".into(),
                    key,
                    "--tls-ca-cert-file".into(),
                    ca.display().to_string(),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ]
            }
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
