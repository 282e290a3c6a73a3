//! Where kept activations wait between forward and backward: on the GPU, in pinned host memory, or
//! in a file. Layer inputs at long sequence outgrow GPU memory (256 GiB at 1M tokens for Llama-8B),
//! so most go to the host and, when that runs out, to disk. The store keeps that off the critical
//! path: copies run on a side stream (src/ffi/transfer.rs) and file I/O on a background thread, so
//! `put` returns at once and `prefetch` one layer ahead hides the way back behind compute. Memory
//! stays bounded on the disk path: a write frees its pinned staging buffer when done, `put` waits
//! when `MAX_WRITES_IN_FLIGHT` writes are pending, and at most `MAX_READS_AHEAD` items are being
//! read back (or read and not yet taken) besides the one `take` asks for; further prefetches wait
//! their turn.
use crate::ffi::transfer::{self, host_bytes, host_bytes_mut, CopyEvent};
use crate::plan::memory::Place;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::{Device, Kind, Tensor};

/// Disk writes whose pinned staging buffers may be held at once before `put` waits.
const MAX_WRITES_IN_FLIGHT: usize = 2;
/// Disk items being read back (or read and not yet taken) at once.
const MAX_READS_AHEAD: usize = 2;

/// Handle to one kept tensor; given back to `take`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Key {
    store: u64,
    id: u64,
}

/// Tells stores apart, so a key given to the wrong store is an error rather than another item.
static NEXT_STORE: AtomicU64 = AtomicU64::new(0);

/// A tensor's bytes in a file: raw, contiguous, in the tensor's own kind.
#[derive(Debug)]
struct DiskItem {
    path: PathBuf,
    shape: Vec<i64>,
    kind: Kind,
    bytes: u64,
}

enum Slot {
    /// On the compute device, as given (Place::Device, and Place::Host on a CPU run).
    Kept(Tensor),
    /// In pinned host memory; the copy may still run on the side stream.
    Host { tensor: Tensor, _copied: CopyEvent },
    /// In a file; the write may still be pending.
    Disk(DiskItem),
    /// On its way back: read on the I/O thread, then copied to the device on the side stream.
    Reading(DiskItem),
    /// On the compute device once `ready` completes; `file` (Disk) is deleted at `take`.
    Arrived { tensor: Tensor, ready: CopyEvent, file: Option<DiskItem> },
    /// Its copy, write or read failed; `take` reports this (and deletes the file, if any).
    Failed { msg: String, file: Option<DiskItem> },
}

enum Job {
    /// Write `staging` to `path` once `copied` (the device-to-host copy) completes.
    Write { id: u64, path: PathBuf, staging: Tensor, copied: CopyEvent },
    /// Read `path` into `staging`, then (GPU) copy it to `to.0` after `to.1` on the side stream.
    Read { id: u64, path: PathBuf, staging: Tensor, to: Option<(Tensor, CopyEvent)> },
}

enum Done {
    Written { id: u64, result: Result<(), String> },
    Read { id: u64, result: Result<(Tensor, CopyEvent), String> },
}

#[derive(Debug, Default, Clone, Copy)]
struct Bytes {
    now: u64,
    peak: u64,
}

impl Bytes {
    fn add(&mut self, n: u64) {
        self.now += n;
        self.peak = self.peak.max(self.now);
    }

    fn sub(&mut self, n: u64) {
        self.now = self.now.saturating_sub(n);
    }
}

pub struct ActivationStore {
    store: u64,
    device: Device,
    dir: PathBuf,
    next_id: u64,
    slots: HashMap<u64, Slot>,
    /// Disk items with a write pending, and their bytes (pinned staging held by the I/O thread).
    writing: HashMap<u64, u64>,
    /// Prefetched disk items waiting for a read slot, oldest first.
    deferred: VecDeque<u64>,
    /// Write failures not yet reported.
    errors: Vec<String>,
    host: Bytes,
    disk: Bytes,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    cancel: Arc<AtomicBool>,
    io: Option<JoinHandle<()>>,
}

impl ActivationStore {
    /// `device` is the compute device; disk files go under `offload_dir` (empty path:
    /// `std::env::temp_dir()`) in a per-process folder `ulysses-<host>-<pid>-rank<rank>`, created
    /// here and removed on drop. A process killed with -9 or by MPI_Abort cannot remove its own:
    /// the folders of this host's processes that are gone are removed here first.
    pub fn new(device: Device, offload_dir: &Path, rank: usize) -> Result<Self> {
        let base = if offload_dir.as_os_str().is_empty() { std::env::temp_dir() } else { offload_dir.to_path_buf() };
        let host = host_name();
        remove_stale_folders(&base, &host);
        let dir = base.join(format!("ulysses-{host}-{}-rank{rank}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create the activation offload folder {}; set memory.offload_dir to a writable folder",
                dir.display()
            )
        })?;
        let (jobs, job_rx) = channel();
        let (done_tx, done) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let io_cancel = cancel.clone();
        let io = std::thread::Builder::new()
            .name(format!("ulysses-store-rank{rank}"))
            .spawn(move || io_loop(job_rx, done_tx, io_cancel))
            .context("cannot start the activation store's I/O thread")?;
        Ok(ActivationStore {
            store: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
            device,
            dir,
            next_id: 0,
            slots: HashMap::new(),
            writing: HashMap::new(),
            deferred: VecDeque::new(),
            errors: Vec::new(),
            host: Bytes::default(),
            disk: Bytes::default(),
            jobs: Some(jobs),
            done,
            cancel,
            io: Some(io),
        })
    }

    /// The per-process folder holding this store's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts keeping `t` (on the compute device) at `place`; returns at once (copies run on the
    /// side stream, disk writes on a background thread after the device-to-host copy completes),
    /// except that a disk `put` waits while `MAX_WRITES_IN_FLIGHT` writes are pending. The store
    /// owns `t`: it must not be modified in place afterwards. Reports earlier write failures.
    pub fn put(&mut self, t: Tensor, place: Place) -> Result<Key> {
        self.poll()?;
        if t.device() != self.device {
            bail!("activation store: expected a tensor on {:?}, found one on {:?}", self.device, t.device());
        }
        let id = self.next_id;
        self.next_id += 1;
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let slot = match (place, self.device) {
            (Place::Device, _) | (Place::Host, Device::Cpu) => Slot::Kept(t),
            (Place::Host, _) => {
                let (tensor, copied) = transfer::to_host(&t)?;
                self.host.add(bytes);
                Slot::Host { tensor, _copied: copied }
            }
            (Place::Disk, _) => {
                while self.writing.len() >= MAX_WRITES_IN_FLIGHT {
                    self.recv_one()?;
                }
                self.report_errors()?;
                let (staging, copied) = match self.device {
                    Device::Cpu => (t.f_contiguous()?, CopyEvent::complete()),
                    _ => transfer::to_host(&t)?,
                };
                let item =
                    DiskItem { path: self.dir.join(format!("{id}.bin")), shape: t.size(), kind: t.kind(), bytes };
                self.send(Job::Write { id, path: item.path.clone(), staging, copied })?;
                self.writing.insert(id, bytes);
                self.host.add(bytes);
                self.disk.add(bytes);
                Slot::Disk(item)
            }
        };
        self.slots.insert(id, slot);
        Ok(Key { store: self.store, id })
    }

    /// Starts bringing the item back toward the compute device (disk read on the background
    /// thread into pinned memory, then a host-to-device copy on the side stream); idempotent.
    /// Call it a layer ahead so the copies overlap compute; a disk item beyond
    /// `MAX_READS_AHEAD` starts when an earlier one is taken.
    pub fn prefetch(&mut self, key: &Key) -> Result<()> {
        self.poll()?;
        self.start(self.id(key)?, false)
    }

    /// The item on the compute device, safe to use on the compute stream (implies `prefetch`;
    /// waits for the disk read, not for the copy: the compute stream waits for that). Removes it
    /// from the store, freeing its host memory and deleting its file. Reports write failures.
    pub fn take(&mut self, key: Key) -> Result<Tensor> {
        let id = self.id(&key)?;
        self.deferred.retain(|&d| d != id);
        self.poll()?;
        self.start(id, true)?;
        while matches!(self.slots.get(&id), Some(Slot::Reading(_))) {
            self.recv_one()?;
        }
        let slot = self.slots.remove(&id).ok_or_else(|| anyhow!("activation store: no item {id}"))?;
        let (tensor, file) = match slot {
            Slot::Kept(t) => (Ok(t), None),
            Slot::Arrived { tensor, ready, file } => (ready.wait().map(|_| tensor).map_err(Into::into), file),
            Slot::Failed { msg, file } => (Err(anyhow!(msg)), file),
            Slot::Host { .. } | Slot::Disk(_) | Slot::Reading(_) => unreachable!("started and waited for above"),
        };
        if let Some(file) = file {
            self.disk.sub(file.bytes);
            match std::fs::remove_file(&file.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound && tensor.is_ok() => {
                    bail!("activation store: cannot delete {}: {e}", file.path.display())
                }
                _ => {}
            }
        }
        self.report_errors()?;
        self.start_deferred()?;
        tensor
    }

    /// Host bytes held now and at peak since the last reset: pinned memory of `Place::Host` items
    /// on a GPU, and the staging buffers of disk writes and reads.
    pub fn host_bytes(&self) -> (u64, u64) {
        (self.host.now, self.host.peak)
    }

    /// Bytes in files now and at peak since the last reset.
    pub fn disk_bytes(&self) -> (u64, u64) {
        (self.disk.now, self.disk.peak)
    }

    pub fn reset_peaks(&mut self) {
        self.host.peak = self.host.now;
        self.disk.peak = self.disk.now;
    }

    fn id(&self, key: &Key) -> Result<u64> {
        if key.store != self.store {
            bail!("activation store: the key of item {} belongs to another store", key.id);
        }
        Ok(key.id)
    }

    /// Starts the way back of item `id`; `force` ignores the read-ahead limit (for `take`).
    fn start(&mut self, id: u64, force: bool) -> Result<()> {
        let read_slot_free = force || self.reads_ahead() < MAX_READS_AHEAD;
        match self.slots.get(&id) {
            None => bail!("activation store: no item {id} (taken already?)"),
            Some(Slot::Host { .. }) => {}
            Some(Slot::Disk(_)) if read_slot_free => {}
            Some(Slot::Disk(_)) => {
                if !self.deferred.contains(&id) {
                    self.deferred.push_back(id);
                }
                return Ok(());
            }
            Some(_) => return Ok(()),
        }
        self.deferred.retain(|&d| d != id);
        let slot = match self.slots.remove(&id) {
            Some(Slot::Host { tensor, .. }) => {
                self.host.sub((tensor.numel() * tensor.kind().elt_size_in_bytes()) as u64);
                // The pinned source may be dropped now: the host allocator keeps it until the copy ends.
                match transfer::to_device(&tensor, self.device) {
                    Ok((tensor, ready)) => Slot::Arrived { tensor, ready, file: None },
                    Err(e) => {
                        Slot::Failed { msg: format!("copying item {id} back to {:?}: {e}", self.device), file: None }
                    }
                }
            }
            Some(Slot::Disk(item)) => self.start_read(id, item)?,
            _ => unreachable!("matched above"),
        };
        self.slots.insert(id, slot);
        Ok(())
    }

    fn start_read(&mut self, id: u64, item: DiskItem) -> Result<Slot> {
        let (staging, to) = match self.device {
            Device::Cpu => (Tensor::f_empty(&item.shape, (item.kind, Device::Cpu))?, None),
            device => {
                // Allocated now, on the compute stream, and ordered after the work queued there so
                // far (which may still use the memory's previous tenant): the side stream waits for
                // `ready` before the I/O thread's copy.
                let dst = Tensor::f_empty(&item.shape, (item.kind, device))?;
                let ready = CopyEvent::record_current(device)?;
                (transfer::empty_pinned_like(&dst)?, Some((dst, ready)))
            }
        };
        self.send(Job::Read { id, path: item.path.clone(), staging, to })?;
        self.host.add(item.bytes);
        Ok(Slot::Reading(item))
    }

    fn start_deferred(&mut self) -> Result<()> {
        while let Some(&id) = self.deferred.front() {
            if self.reads_ahead() >= MAX_READS_AHEAD {
                break;
            }
            self.deferred.pop_front();
            if matches!(self.slots.get(&id), Some(Slot::Disk(_))) {
                self.start(id, true)?;
            }
        }
        Ok(())
    }

    /// Disk items being read back, or read and not yet taken.
    fn reads_ahead(&self) -> usize {
        self.slots.values().filter(|s| matches!(s, Slot::Reading(_) | Slot::Arrived { file: Some(_), .. })).count()
    }

    fn send(&mut self, job: Job) -> Result<()> {
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job).is_ok()).unwrap_or(false);
        if !sent {
            return Err(self.io_stopped());
        }
        Ok(())
    }

    /// Applies finished background work without waiting, then reports write failures.
    fn poll(&mut self) -> Result<()> {
        loop {
            match self.done.try_recv() {
                Ok(done) => self.apply(done),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(self.io_stopped()),
            }
        }
        self.report_errors()
    }

    /// Waits for the next finished background job.
    fn recv_one(&mut self) -> Result<()> {
        match self.done.recv() {
            Ok(done) => {
                self.apply(done);
                Ok(())
            }
            Err(_) => Err(self.io_stopped()),
        }
    }

    fn apply(&mut self, done: Done) {
        match done {
            Done::Written { id, result } => {
                self.host.sub(self.writing.remove(&id).unwrap_or(0));
                if let Err(msg) = result {
                    // A read queued behind the write (Reading) fails on its own, or reads what the
                    // write left; the write error is reported either way.
                    match self.slots.remove(&id) {
                        Some(Slot::Disk(item)) => {
                            self.slots.insert(id, Slot::Failed { msg: msg.clone(), file: Some(item) });
                        }
                        Some(other) => {
                            self.slots.insert(id, other);
                        }
                        None => {}
                    }
                    self.errors.push(msg);
                }
            }
            Done::Read { id, result } => {
                // A read in flight always has a Reading slot: `take` waits for it to finish.
                let slot = match self.slots.remove(&id) {
                    Some(Slot::Reading(item)) => {
                        self.host.sub(item.bytes);
                        match result {
                            Ok((tensor, ready)) => Slot::Arrived { tensor, ready, file: Some(item) },
                            Err(msg) => Slot::Failed { msg, file: Some(item) },
                        }
                    }
                    Some(other) => other,
                    None => return,
                };
                self.slots.insert(id, slot);
            }
        }
    }

    fn report_errors(&mut self) -> Result<()> {
        if self.errors.is_empty() {
            return Ok(());
        }
        bail!("activation store: {}", std::mem::take(&mut self.errors).join("; "))
    }

    /// The error when the I/O thread is gone (it panicked): with its message where there is one.
    fn io_stopped(&mut self) -> anyhow::Error {
        self.jobs = None;
        let why = match self.io.take().map(JoinHandle::join) {
            Some(Err(panic)) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "it panicked".into()),
            _ => "it stopped".into(),
        };
        anyhow!("activation store: the disk I/O thread stopped ({why}); activations kept on disk are lost")
    }
}

impl Drop for ActivationStore {
    fn drop(&mut self) {
        // Pending writes are skipped: nothing will read them.
        self.cancel.store(true, Ordering::Relaxed);
        self.jobs = None;
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
        self.slots.clear();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("activation store: cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}

/// The background thread: runs jobs in order (so a read follows its file's write) until the
/// store closes the channel; with `cancel` set, drops the remaining jobs.
fn io_loop(jobs: Receiver<Job>, done: Sender<Done>, cancel: Arc<AtomicBool>) {
    for job in jobs {
        if cancel.load(Ordering::Relaxed) {
            continue;
        }
        let reply = match job {
            Job::Write { id, path, staging, copied } => {
                let result = copied.synchronize().map_err(|e| e.to_string()).and_then(|_| write_file(&path, &staging));
                Done::Written { id, result }
            }
            Job::Read { id, path, staging, to } => Done::Read { id, result: read_back(&path, staging, to) },
        };
        if done.send(reply).is_err() {
            return;
        }
    }
}

/// This machine's name, as store folders carry it (an offload folder on a shared file system may
/// hold other hosts' folders, whose processes this host cannot see).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer it is given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    let name = if rc == 0 { &buf[..buf.iter().position(|&b| b == 0).unwrap_or(buf.len())] } else { b"localhost" };
    String::from_utf8_lossy(name).replace(['/', '-'], "_")
}

/// The process id of a store folder name of host `host`: `ulysses-<host>-<pid>-rank<r>`, or
/// `ulysses-<pid>-rank<r>` as ulysses before 2026-12-06 named them (always in the node-local
/// temporary folder by default).
fn folder_pid(name: &str, host: &str) -> Option<i32> {
    let (head, rank) = name.strip_prefix("ulysses-")?.rsplit_once("-rank")?;
    let pid = match head.rsplit_once('-') {
        Some((h, pid)) if h == host => pid,
        Some(_) => return None,
        None => head,
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(rank)).then(|| pid.parse().ok()).flatten()
}

/// Removes the store folders in `base` of this host's processes that no longer run.
fn remove_stale_folders(base: &Path, host: &str) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let Some(pid) = folder_pid(&entry.file_name().to_string_lossy(), host) else { continue };
        // SAFETY: signal 0 checks that the process exists; nothing is sent.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && entry.path().is_dir() {
            log::info!("removing {} (left by a process that ended without cleaning up)", entry.path().display());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Writes the tensor's bytes and drops them from the page cache, so disk offload does not turn
/// into host memory use.
fn write_file(path: &Path, t: &Tensor) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let mut f = crate::files::create(path).map_err(fail)?;
    f.write_all(host_bytes(t)).map_err(fail)?;
    f.sync_data().map_err(fail)?;
    drop_page_cache(&f);
    Ok(())
}

fn read_back(path: &Path, mut staging: Tensor, to: Option<(Tensor, CopyEvent)>) -> Result<(Tensor, CopyEvent), String> {
    let fail = |e: std::io::Error| format!("reading {}: {e}", path.display());
    let mut f = File::open(path).map_err(fail)?;
    let n = staging.numel() * staging.kind().elt_size_in_bytes();
    let len = f.metadata().map_err(fail)?.len();
    if len != n as u64 {
        return Err(format!("reading {}: expected {n} bytes, found {len}", path.display()));
    }
    // `staging` is a new host tensor that only this thread uses until it is sent back or handed
    // to the copy below.
    f.read_exact(host_bytes_mut(&mut staging)).map_err(fail)?;
    drop_page_cache(&f);
    match to {
        None => Ok((staging, CopyEvent::complete())),
        Some((dst, ready)) => {
            let copied = transfer::side_copy(&dst, &staging, Some(&ready)).map_err(|e| e.to_string())?;
            Ok((dst, copied))
        }
    }
}

fn drop_page_cache(f: &File) {
    // SAFETY: a valid open descriptor; posix_fadvise only gives the kernel a hint.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}
