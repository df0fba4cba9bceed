//! A client for memd's control protocol: connect (waiting for the service
//! to be ready), authenticate, and make typed calls.
//!
//! ```no_run
//! let mut c = memd_client::Client::connect(&memd_client::Options::discover(None, None)?)?;
//! let status = c.status()?;
//! println!("{} free of {}", status.free_bytes, status.total_bytes);
//! # Ok::<(), memd_client::Error>(())
//! ```
//!
//! memd has two roles, each with its token: a client may allocate and
//! read every view; the operator may also stop the service, inject faults,
//! drop caches, run stress and check invariants.
//!
//! Token discovery, first hit wins: an explicit token (`--token`), the
//! `MEMD_TOKEN` environment variable, then a file `.memd/token` in the
//! current directory or any parent (written by `cargo xtask run`). The
//! operator's token ([`Options::discover_for`] with `operator`): an
//! explicit token, `MEMD_OPERATOR_TOKEN`, `MEMD_TOKEN`, a file
//! `.memd/operator-token` found the same way, then `.memd/token` (with the
//! client's token the service refuses operator operations with EPERM).
//! The environment comes before the files, so a token set for one service
//! is never traded for the operator token of the local `cargo xtask run`.
//! The address: explicit (`--addr`), `MEMD_ADDR`, a file `.memd/addr`
//! found the same way, else `127.0.0.1:5555`.

pub mod fleet;
pub mod qmp;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use memd_wire as wire;
use memd_wire::*;

/// Default service address (QEMU user networking forwards it).
pub const DEFAULT_ADDR: &str = "127.0.0.1:5555";

/// What went wrong.
#[derive(Debug)]
pub enum Error {
    /// The service answered with an error.
    Server(WireError),
    /// Could not connect, or the connection broke.
    Connect(String),
    /// The service sent something this client does not understand.
    Protocol(String),
    /// No token was given or found.
    NoToken,
    /// A fleet file or a token file it names cannot be read or written.
    Fleet(String),
}

impl Error {
    /// The errno of a server error.
    pub fn code(&self) -> Option<i32> {
        match self {
            Error::Server(e) => Some(e.code),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Server(e) => write!(f, "memd: {e}"),
            Error::Connect(e) => write!(f, "connection: {e}"),
            Error::Protocol(e) => write!(f, "protocol: {e}"),
            Error::Fleet(e) => write!(f, "fleet: {e}"),
            Error::NoToken => f.write_str(
                "no token: pass --token, set MEMD_TOKEN (MEMD_OPERATOR_TOKEN for the operator), or run `cargo xtask run` (it writes .memd/token and .memd/operator-token)",
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        Error::Server(e)
    }
}

/// Result of client calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Options {
    /// Service address.
    pub addr: String,
    /// Auth token.
    pub token: String,
    /// Name shown in the per-client view.
    pub client: String,
    /// How long to keep retrying until the service answers the hello.
    pub ready_timeout: Duration,
    /// Read/write timeout once connected (None: wait forever).
    pub io_timeout: Option<Duration>,
}

/// Finds `.memd/<name>` in `start` or any parent.
pub fn find_memd_file(start: &Path, name: &str) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|d| d.join(".memd").join(name))
        .find(|p| p.is_file())
}

fn read_trimmed(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Where a role's token is kept: an environment variable, and a file
/// name in `.memd/`.
struct TokenSource {
    var: &'static str,
    file: &'static str,
}

const CLIENT_TOKEN: TokenSource = TokenSource {
    var: "MEMD_TOKEN",
    file: "token",
};
const OPERATOR_TOKEN: TokenSource = TokenSource {
    var: "MEMD_OPERATOR_TOKEN",
    file: "operator-token",
};

/// The first token of `sources` in the environment (a variable set and
/// not empty, as `env` reads it), else the first in their files in
/// `.memd/` upwards from `cwd`.
fn token_from(
    sources: &[&TokenSource],
    cwd: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    sources
        .iter()
        .find_map(|s| env(s.var).filter(|t| !t.is_empty()))
        .or_else(|| {
            let cwd = cwd?;
            sources
                .iter()
                .find_map(|s| find_memd_file(cwd, s.file).and_then(|p| read_trimmed(&p)))
        })
}

/// The token for a role: explicit, else from the role's sources (the
/// operator's own first, then the client's).
fn role_token(
    explicit: Option<&str>,
    operator: bool,
    cwd: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String> {
    if let Some(t) = explicit {
        return Ok(t.to_string());
    }
    let sources: &[&TokenSource] = if operator {
        &[&OPERATOR_TOKEN, &CLIENT_TOKEN]
    } else {
        &[&CLIENT_TOKEN]
    };
    token_from(sources, cwd, env).ok_or(Error::NoToken)
}

fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// The client token: explicit, else `MEMD_TOKEN`, else `.memd/token`
/// upwards from the current directory.
pub fn discover_token(explicit: Option<&str>) -> Result<String> {
    let cwd = std::env::current_dir().ok();
    role_token(explicit, false, cwd.as_deref(), &process_env)
}

/// The operator token: explicit, else `MEMD_OPERATOR_TOKEN`, `MEMD_TOKEN`,
/// `.memd/operator-token`, `.memd/token` (upwards from the current
/// directory), the first found.
pub fn discover_operator_token(explicit: Option<&str>) -> Result<String> {
    let cwd = std::env::current_dir().ok();
    role_token(explicit, true, cwd.as_deref(), &process_env)
}

/// The address: explicit, else `MEMD_ADDR`, else `.memd/addr` upwards, else
/// [`DEFAULT_ADDR`].
pub fn discover_addr(explicit: Option<&str>) -> String {
    if let Some(a) = explicit {
        return a.to_string();
    }
    if let Ok(a) = std::env::var("MEMD_ADDR") {
        if !a.is_empty() {
            return a;
        }
    }
    std::env::current_dir()
        .ok()
        .and_then(|cwd| find_memd_file(&cwd, "addr"))
        .and_then(|p| read_trimmed(&p))
        .unwrap_or_else(|| DEFAULT_ADDR.to_string())
}

impl Options {
    /// Options from explicit values and the discovery rules, with the
    /// client token.
    pub fn discover(addr: Option<&str>, token: Option<&str>) -> Result<Options> {
        Self::discover_for(addr, token, false)
    }

    /// Options from explicit values and the discovery rules, with the
    /// operator's token when `operator` (falling back to the client's when
    /// there is none), else the client token.
    pub fn discover_for(
        addr: Option<&str>,
        token: Option<&str>,
        operator: bool,
    ) -> Result<Options> {
        Ok(Options {
            addr: discover_addr(addr),
            token: role_token(
                token,
                operator,
                std::env::current_dir().ok().as_deref(),
                &process_env,
            )?,
            client: format!("memd-client/{}", std::process::id()),
            ready_timeout: Duration::from_secs(10),
            io_timeout: Some(Duration::from_secs(120)),
        })
    }

    /// Options for `addr` and `token`, without discovery.
    pub fn new(addr: impl Into<String>, token: impl Into<String>) -> Options {
        Options {
            addr: addr.into(),
            token: token.into(),
            client: format!("memd-client/{}", std::process::id()),
            ready_timeout: Duration::from_secs(10),
            io_timeout: Some(Duration::from_secs(120)),
        }
    }
}

/// An authenticated connection.
pub struct Client {
    stream: TcpStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    pending: Vec<u8>,
    hello: HelloAck,
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| Error::Connect(format!("{addr}: {e}")))?
        .next()
        .ok_or_else(|| Error::Connect(format!("{addr}: no address")))
}

impl Client {
    /// Connects and authenticates, retrying until `ready_timeout`: QEMU's
    /// user networking accepts a connection before the guest listens and
    /// then drops it, so a reset or EOF before the hello reply means "not
    /// ready yet". A server error in the hello (wrong token or version) is
    /// final.
    pub fn connect(opts: &Options) -> Result<Client> {
        let addr = resolve(&opts.addr)?;
        let deadline = Instant::now() + opts.ready_timeout;
        let mut delay = Duration::from_millis(20);
        loop {
            match Self::try_connect(addr, opts) {
                Ok(c) => return Ok(c),
                Err(
                    e @ (Error::Server(_) | Error::Protocol(_) | Error::NoToken | Error::Fleet(_)),
                ) => return Err(e),
                Err(Error::Connect(e)) => {
                    if Instant::now() + delay > deadline {
                        return Err(Error::Connect(format!(
                            "{}: not ready after {:?}: {e}",
                            opts.addr, opts.ready_timeout
                        )));
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    fn try_connect(addr: SocketAddr, opts: &Options) -> Result<Client> {
        let conn_err = |e: io::Error| Error::Connect(e.to_string());
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(conn_err)?;
        stream.set_nodelay(true).map_err(conn_err)?;
        // Bounded wait for the hello reply, so a forwarder that accepted
        // without a listener behind it is noticed.
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(conn_err)?;
        let mut c = Client {
            stream,
            decoder: FrameDecoder::new(),
            buf: vec![0; 64 * 1024],
            pending: Vec::new(),
            hello: HelloAck {
                version: 0,
                conn: 0,
                quota: Quota {
                    pages: 0,
                    bytes: 0,
                    handles: 0,
                    caches: 0,
                },
                role: memd_wire::Role::Client,
            },
        };
        let resp = c.request(&Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: opts.token.clone(),
            client: opts.client.clone(),
        }))?;
        match resp {
            Response::Hello(ack) => c.hello = ack,
            Response::Error { error, .. } => return Err(Error::Server(error)),
            other => return Err(Error::Protocol(format!("unexpected hello reply {other:?}"))),
        }
        c.stream
            .set_read_timeout(opts.io_timeout)
            .map_err(conn_err)?;
        Ok(c)
    }

    /// What the service said in its hello.
    pub fn hello(&self) -> &HelloAck {
        &self.hello
    }

    /// Sends one request frame without waiting.
    pub fn send(&mut self, req: &Request) -> Result<()> {
        let frame = to_frame(req).map_err(|e| Error::Protocol(e.to_string()))?;
        self.stream
            .write_all(&frame)
            .map_err(|e| Error::Connect(e.to_string()))
    }

    /// Receives one response frame.
    pub fn recv(&mut self) -> Result<Response> {
        loop {
            let mut input = &self.pending[..];
            let got = self
                .decoder
                .feed(&mut input)
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let used = self.pending.len() - input.len();
            self.pending.drain(..used);
            if let Some(body) = got {
                return decode_body(&body).map_err(|e| Error::Protocol(e.to_string()));
            }
            let n = self
                .stream
                .read(&mut self.buf)
                .map_err(|e| Error::Connect(e.to_string()))?;
            if n == 0 {
                return Err(Error::Connect("connection closed by memd".into()));
            }
            self.pending.extend_from_slice(&self.buf[..n]);
        }
    }

    /// One request, one response.
    pub fn request(&mut self, req: &Request) -> Result<Response> {
        self.send(req)?;
        self.recv()
    }

    /// One operation.
    pub fn call(&mut self, op: Op) -> Result<Reply> {
        match self.request(&Request::Call(op))? {
            Response::Call(r) => r.map_err(Error::Server),
            Response::Error { error, .. } => Err(Error::Server(error)),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Many operations in one frame; one result per operation run.
    pub fn batch(
        &mut self,
        ops: Vec<Op>,
        stop_on_error: bool,
    ) -> Result<Vec<Result<Reply, WireError>>> {
        match self.request(&Request::Batch(Batch { stop_on_error, ops }))? {
            Response::Batch(r) => Ok(r),
            Response::Error { error, .. } => Err(Error::Server(error)),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }
}

fn unexpected<T>(r: Reply) -> Result<T> {
    Err(Error::Protocol(format!("unexpected reply {r:?}")))
}

/// Views arrive boxed (single structs) or as vectors; callers get the
/// value itself.
trait IntoView<T> {
    fn into_view(self) -> T;
}

impl<T> IntoView<T> for Box<T> {
    fn into_view(self) -> T {
        *self
    }
}

impl<T> IntoView<Vec<T>> for Vec<T> {
    fn into_view(self) -> Vec<T> {
        self
    }
}

impl IntoView<CheckReport> for CheckReport {
    fn into_view(self) -> CheckReport {
        self
    }
}

macro_rules! view {
    ($(#[$m:meta])* $name:ident, $op:ident, $variant:ident, $ty:ty) => {
        $(#[$m])*
        pub fn $name(&mut self) -> Result<$ty> {
            match self.call(Op::$op)? {
                Reply::$variant(v) => Ok(v.into_view()),
                r => unexpected(r),
            }
        }
    };
}

/// A new object: handle, address, usable size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    /// Its handle.
    pub handle: Handle,
    /// Address in the guest.
    pub addr: u64,
    /// Usable size.
    pub size: u64,
}

fn object(r: Reply) -> Result<Object> {
    match r {
        Reply::Object { handle, addr, size } => Ok(Object { handle, addr, size }),
        r => unexpected(r),
    }
}

fn done(r: Reply) -> Result<()> {
    match r {
        Reply::Done => Ok(()),
        r => unexpected(r),
    }
}

fn created(r: Reply) -> Result<Handle> {
    match r {
        Reply::Created { handle } => Ok(handle),
        r => unexpected(r),
    }
}

/// Typed calls, one per operation.
impl Client {
    view!(/// Service status.
        status, Status, Status, Status);
    view!(/// `/proc/meminfo`.
        meminfo, Meminfo, Meminfo, MemInfo);
    view!(/// `/proc/zoneinfo`.
        zoneinfo, Zoneinfo, Zoneinfo, Vec<ZoneInfo>);
    view!(/// `/proc/buddyinfo`.
        buddyinfo, Buddyinfo, Buddyinfo, Vec<BuddyZone>);
    /// `/proc/slabinfo`, every cache, fetched a page
    /// ([`memd_wire::VIEW_PAGE`]) at a time.
    pub fn slabinfo(&mut self) -> Result<Vec<SlabInfo>> {
        self.pages(
            memd_wire::VIEW_PAGE,
            |start| Op::Slabinfo { start },
            |r| match r {
                Reply::Slabinfo(page) => Ok(page),
                r => unexpected(r),
            },
        )
    }
    /// Every mempool, fetched a page at a time.
    pub fn mempools(&mut self) -> Result<Vec<MempoolInfo>> {
        self.pages(
            memd_wire::VIEW_PAGE,
            |start| Op::Mempools { start },
            |r| match r {
                Reply::Mempools(page) => Ok(page),
                r => unexpected(r),
            },
        )
    }
    view!(/// The contiguous region.
        cma, Cma, Cma, CmaInfo);
    view!(/// Per-client usage.
        clients, Clients, Clients, Vec<ClientInfo>);
    /// Every DMA buffer, fetched a page ([`memd_wire::DMA_LIST_PAGE`]) at
    /// a time.
    pub fn dma_buffers(&mut self) -> Result<Vec<DmaBufferInfo>> {
        self.pages(
            memd_wire::DMA_LIST_PAGE,
            |start| Op::DmaBuffers { start },
            |r| match r {
                Reply::DmaBuffers(page) => Ok(page),
                r => unexpected(r),
            },
        )
    }

    /// Every page of a paged listing: `op(start)` asks for the page from
    /// `start`, and a page shorter than `full` entries is the last.
    /// Entries created or freed meanwhile may be missed or seen twice, as
    /// with a /proc file read in pieces.
    fn pages<T>(
        &mut self,
        full: usize,
        op: impl Fn(u64) -> Op,
        page: impl Fn(Reply) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let mut all = Vec::new();
        loop {
            let got = page(self.call(op(all.len() as u64))?)?;
            let last = got.len() < full;
            all.extend(got);
            if last {
                return Ok(all);
            }
        }
    }
    view!(/// Run the invariant checkers.
        check, Check, Check, CheckReport);

    /// Allocate `2^order` pages: (handle, physical address).
    pub fn alloc_pages(&mut self, order: u8, gfp: Gfp) -> Result<(Handle, u64)> {
        match self.call(Op::AllocPages { order, gfp })? {
            Reply::Pages { handle, phys, .. } => Ok((handle, phys)),
            r => unexpected(r),
        }
    }
    /// Free pages.
    pub fn free_pages(&mut self, handle: Handle) -> Result<()> {
        done(self.call(Op::FreePages { handle })?)
    }
    /// kmalloc.
    pub fn kmalloc(&mut self, size: u64, gfp: Gfp) -> Result<Object> {
        object(self.call(Op::Kmalloc { size, gfp })?)
    }
    /// kfree.
    pub fn kfree(&mut self, handle: Handle) -> Result<()> {
        done(self.call(Op::Kfree { handle })?)
    }
    /// Create a slab cache shaped as `spec` says.
    pub fn cache_create(&mut self, spec: CacheSpec) -> Result<Handle> {
        created(self.call(Op::CacheCreate(spec))?)
    }
    /// Allocate from a cache.
    pub fn cache_alloc(&mut self, cache: Handle, gfp: Gfp) -> Result<Object> {
        object(self.call(Op::CacheAlloc { cache, gfp })?)
    }
    /// Free to a cache.
    pub fn cache_free(&mut self, cache: Handle, object: Handle) -> Result<()> {
        done(self.call(Op::CacheFree { cache, object })?)
    }
    /// Shrink a cache: pages returned.
    pub fn cache_shrink(&mut self, cache: Handle) -> Result<u64> {
        match self.call(Op::CacheShrink { cache })? {
            Reply::Shrunk { pages } => Ok(pages),
            r => unexpected(r),
        }
    }
    /// Shrink every cache and drain the per-CPU page lists: pages returned.
    pub fn drop_caches(&mut self) -> Result<u64> {
        match self.call(Op::DropCaches)? {
            Reply::Shrunk { pages } => Ok(pages),
            r => unexpected(r),
        }
    }
    /// Destroy a cache.
    pub fn cache_destroy(&mut self, cache: Handle) -> Result<()> {
        done(self.call(Op::CacheDestroy { cache })?)
    }
    /// Create a mempool.
    pub fn pool_create(&mut self, backing: PoolBacking, min_nr: u32) -> Result<Handle> {
        created(self.call(Op::PoolCreate { backing, min_nr })?)
    }
    /// Allocate from a mempool.
    pub fn pool_alloc(&mut self, pool: Handle, gfp: Gfp) -> Result<Object> {
        object(self.call(Op::PoolAlloc { pool, gfp })?)
    }
    /// Free to a mempool.
    pub fn pool_free(&mut self, pool: Handle, object: Handle) -> Result<()> {
        done(self.call(Op::PoolFree { pool, object })?)
    }
    /// Destroy a mempool.
    pub fn pool_destroy(&mut self, pool: Handle) -> Result<()> {
        done(self.call(Op::PoolDestroy { pool })?)
    }
    /// Allocate a DMA buffer.
    pub fn dma_alloc(&mut self, len: u64, align: u64, mask: DmaMask) -> Result<DmaBufferInfo> {
        self.dma_alloc_in(len, align, mask, false)
    }
    /// Allocate a DMA buffer that, when `movable`, may come from
    /// ZONE_MOVABLE (memory plugged at run time).
    pub fn dma_alloc_in(
        &mut self,
        len: u64,
        align: u64,
        mask: DmaMask,
        movable: bool,
    ) -> Result<DmaBufferInfo> {
        match self.call(Op::DmaAlloc {
            len,
            align,
            mask,
            movable,
        })? {
            Reply::Dma(i) => Ok(*i),
            r => unexpected(r),
        }
    }
    /// Free a DMA buffer.
    pub fn dma_free(&mut self, handle: Handle) -> Result<()> {
        done(self.call(Op::DmaFree { handle })?)
    }
    /// Write bytes into a DMA buffer.
    pub fn dma_write(&mut self, handle: Handle, offset: u64, data: Vec<u8>) -> Result<()> {
        done(self.call(Op::DmaWrite {
            handle,
            offset,
            data,
        })?)
    }
    /// Read bytes from a DMA buffer.
    pub fn dma_read(&mut self, handle: Handle, offset: u64, len: u32) -> Result<Vec<u8>> {
        match self.call(Op::DmaRead {
            handle,
            offset,
            len,
        })? {
            Reply::Data(d) => Ok(d),
            r => unexpected(r),
        }
    }
    /// Fill a DMA buffer with the seed's pattern.
    pub fn dma_fill(&mut self, handle: Handle, seed: u64) -> Result<()> {
        done(self.call(Op::DmaFill { handle, seed })?)
    }
    /// Checksum a range of a DMA buffer (`len` 0: to the end).
    pub fn dma_checksum(&mut self, handle: Handle, offset: u64, len: u64) -> Result<u64> {
        match self.call(Op::DmaChecksum {
            handle,
            offset,
            len,
        })? {
            Reply::Checksum(c) => Ok(c),
            r => unexpected(r),
        }
    }
    /// Write a DMA buffer to the disk.
    pub fn dma_write_disk(&mut self, handle: Handle, sector: u64) -> Result<DiskTransfer> {
        match self.call(Op::DmaWriteDisk { handle, sector })? {
            Reply::Transfer(t) => Ok(t),
            r => unexpected(r),
        }
    }
    /// Read the disk into a DMA buffer.
    pub fn dma_read_disk(&mut self, handle: Handle, sector: u64) -> Result<DiskTransfer> {
        match self.call(Op::DmaReadDisk { handle, sector })? {
            Reply::Transfer(t) => Ok(t),
            r => unexpected(r),
        }
    }
    /// In-guest stress run on one CPU.
    pub fn stress(&mut self, ops: u64, seed: u64) -> Result<StressReport> {
        self.stress_on(ops, seed, 1)
    }
    /// In-guest stress run on `cpus` CPUs at once.
    pub fn stress_on(&mut self, ops: u64, seed: u64, cpus: u32) -> Result<StressReport> {
        match self.call(Op::Stress { ops, seed, cpus })? {
            Reply::Stress(s) => Ok(s),
            r => unexpected(r),
        }
    }
    /// Set a fault-injection rule.
    pub fn fault_inject(&mut self, target: FaultTarget, config: FaultConfig) -> Result<()> {
        done(self.call(Op::FaultInject { target, config })?)
    }
    /// Both fault-injection rules with their counters.
    pub fn faults(&mut self) -> Result<FaultStatus> {
        match self.call(Op::Faults)? {
            Reply::Faults(f) => Ok(*f),
            r => unexpected(r),
        }
    }
    /// Stop the service.
    pub fn shutdown(&mut self) -> Result<()> {
        done(self.call(Op::Shutdown)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory tree `root/.memd/` with the given files, and `root/a/b`
    /// to search from.
    fn tree(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("memd-client-roles-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join(".memd")).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        for (file, text) in files {
            std::fs::write(root.join(".memd").join(file), text).unwrap();
        }
        root
    }

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |var| {
            vars.iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn each_role_finds_its_own_token() {
        let root = tree("both", &[("token", "cl\n"), ("operator-token", " op \n")]);
        let deep = root.join("a/b");
        let none = env_of(&[]);
        assert_eq!(role_token(None, false, Some(&deep), &none).unwrap(), "cl");
        assert_eq!(role_token(None, true, Some(&deep), &none).unwrap(), "op");
        // The variables beat the files.
        let vars = env_of(&[("MEMD_TOKEN", "cl-env"), ("MEMD_OPERATOR_TOKEN", "op-env")]);
        assert_eq!(
            role_token(None, false, Some(&deep), &vars).unwrap(),
            "cl-env"
        );
        assert_eq!(
            role_token(None, true, Some(&deep), &vars).unwrap(),
            "op-env"
        );
        // An explicit token wins for either role.
        assert_eq!(
            role_token(Some("x"), true, Some(&deep), &vars).unwrap(),
            "x"
        );
        assert_eq!(
            role_token(Some("x"), false, Some(&deep), &vars).unwrap(),
            "x"
        );
        // An empty variable counts as unset.
        let empty = env_of(&[("MEMD_OPERATOR_TOKEN", "")]);
        assert_eq!(role_token(None, true, Some(&deep), &empty).unwrap(), "op");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_operator_falls_back_to_the_client_token() {
        let root = tree("client-only", &[("token", "cl\n")]);
        let deep = root.join("a/b");
        let none = env_of(&[]);
        assert_eq!(role_token(None, true, Some(&deep), &none).unwrap(), "cl");
        let vars = env_of(&[("MEMD_TOKEN", "cl-env")]);
        assert_eq!(
            role_token(None, true, Some(&deep), &vars).unwrap(),
            "cl-env"
        );
        // A client token in the environment (set for some service) comes
        // before an operator token in a file (of the local `xtask run`).
        let both = tree("env-over-file", &[("operator-token", "op\n")]);
        assert_eq!(
            role_token(None, true, Some(&both.join("a/b")), &vars).unwrap(),
            "cl-env"
        );
        std::fs::remove_dir_all(&both).unwrap();
        // The client never takes the operator's token.
        let root2 = tree("operator-only", &[("operator-token", "op\n")]);
        let deep2 = root2.join("a/b");
        assert!(matches!(
            role_token(None, false, Some(&deep2), &none),
            Err(Error::NoToken)
        ));
        assert_eq!(role_token(None, true, Some(&deep2), &none).unwrap(), "op");
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&root2).unwrap();
    }
}
