//! The disk tier of the model state: a ZeRO unit's shard whose fp32 vectors (master weights, Adam
//! moments, gradient) live in one file of `memory.offload_dir` instead of memory. Nothing reads
//! it whole into memory except a gather of the master weights (one unit at a time); the optimizer
//! streams it (`DiskShard::stream`): a reader thread fills chunks, the caller updates each in
//! place, a writer thread writes it back, so disk I/O overlaps the CPU update and at most
//! `DISK_CHUNKS_IN_FLIGHT` chunks are in host memory at once.
//!
//! The file is unlinked as soon as it is made: it vanishes when the process ends, however it
//! ends, and no other program sees it. Its space is allocated at creation, so a full disk is an
//! error before training, not in the middle of a step.
use crate::ffi::transfer::{host_bytes, host_bytes_mut};
use crate::plan::memory::{DISK_CHUNK, DISK_CHUNKS_IN_FLIGHT};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// One of the four fp32 vectors of a shard, stored in this order in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    Master,
    ExpAvg,
    ExpAvgSq,
    Grad,
}

/// A disk shard's file could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "cannot make the optimizer state file {} ({} GiB): {source}; set memory.offload_dir to a writable folder with room, or parallel.offload_optimizer to \"device\" or \"host\"",
        path.display(),
        *bytes as f64 / (1u64 << 30) as f64
    )]
    Create { path: PathBuf, bytes: u64, source: std::io::Error },
    #[error("{what} the optimizer state of {unit} in {}: {source}", dir.display())]
    Io { what: &'static str, unit: String, dir: PathBuf, source: std::io::Error },
}

/// This rank's shard of one unit, on disk.
pub struct DiskShard {
    file: Arc<File>,
    /// Elements of each vector.
    len: i64,
    /// The unit's name and the folder, for messages.
    unit: String,
    dir: PathBuf,
    /// Whether the gradient region holds gradients of this step; false: it reads as zeros (the
    /// optimizer cleared it), and the next gradient is written rather than added.
    pub grad_live: bool,
}

impl DiskShard {
    /// A zeroed shard of `len` elements per vector in a new, already unlinked file
    /// `dir/<name>`, its space allocated now.
    pub fn create(dir: &Path, name: &str, unit: String, len: i64) -> Result<DiskShard, DiskError> {
        let path = dir.join(name);
        let bytes = (len as u64) * 4 * 4;
        let created = || -> std::io::Result<File> {
            std::fs::create_dir_all(dir)?;
            let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
            std::fs::remove_file(&path)?;
            // SAFETY: a valid open descriptor; fallocate only reads its arguments.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t) };
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(file)
        };
        let file = created().map_err(|source| DiskError::Create { path: path.clone(), bytes, source })?;
        Ok(DiskShard { file: Arc::new(file), len, unit, dir: dir.to_path_buf(), grad_live: false })
    }

    /// Another handle on the same file, for a background checkpoint writer to read the master
    /// weights and moments while training goes on (the next update waits for it).
    pub fn reader(&self) -> DiskShard {
        DiskShard {
            file: self.file.clone(),
            len: self.len,
            unit: self.unit.clone(),
            dir: self.dir.clone(),
            grad_live: false,
        }
    }

    /// Writes elements `[at, at + n)` of a region to `sink` in chunks of at most `DISK_CHUNK`.
    pub fn read_chunks<E: From<DiskError>>(
        &self,
        region: Region,
        at: i64,
        n: i64,
        mut sink: impl FnMut(&Tensor) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut done = 0;
        while done < n {
            let part = self.read(region, at + done, DISK_CHUNK.min(n - done))?;
            sink(&part)?;
            done += part.numel() as i64;
        }
        Ok(())
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    fn offset(&self, region: Region, at: i64) -> u64 {
        ((region as i64 * self.len + at) * 4) as u64
    }

    fn failed(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
        move |source| DiskError::Io { what, unit: self.unit.clone(), dir: self.dir.clone(), source }
    }

    /// Elements `[at, at + n)` of a region, as a new fp32 CPU tensor.
    pub fn read(&self, region: Region, at: i64, n: i64) -> Result<Tensor, DiskError> {
        let t = Tensor::empty([n], (Kind::Float, Device::Cpu));
        self.read_into(region, at, &t)?;
        Ok(t)
    }

    /// Fills `dst` (a contiguous fp32 CPU tensor) from the region, starting at element `at`.
    pub fn read_into(&self, region: Region, at: i64, dst: &Tensor) -> Result<(), DiskError> {
        if region == Region::Grad && !self.grad_live {
            let _ = dst.shallow_clone().zero_();
            return Ok(());
        }
        // The caller's tensor is this call's alone while it is filled.
        let mut dst = dst.shallow_clone();
        self.file.read_exact_at(host_bytes_mut(&mut dst), self.offset(region, at)).map_err(self.failed("reading"))
    }

    /// Writes `src` (any float CPU tensor; fp32 contiguous is copied as is) into the region from
    /// element `at`.
    pub fn write(&self, region: Region, at: i64, src: &Tensor) -> Result<(), DiskError> {
        let src = src.to_kind(Kind::Float).contiguous();
        self.file.write_all_at(host_bytes(&src), self.offset(region, at)).map_err(self.failed("writing"))
    }

    /// Adds a landed gradient (`[len]`, CPU) into the gradient region, chunk by chunk: a write
    /// when the region holds no gradient yet.
    pub fn add_grad(&mut self, grad: &Tensor) -> Result<(), DiskError> {
        let mut at = 0;
        while at < self.len {
            let n = DISK_CHUNK.min(self.len - at);
            let part = grad.narrow(0, at, n);
            if self.grad_live {
                let sum = self.read(Region::Grad, at, n)?;
                let _ = sum.shallow_clone().g_add_(&part);
                self.write(Region::Grad, at, &sum)?;
            } else {
                self.write(Region::Grad, at, &part)?;
            }
            at += n;
        }
        self.grad_live = true;
        Ok(())
    }

    /// Streams the shard in chunks of `DISK_CHUNK` elements: `read` regions of each chunk are
    /// read on a reader thread, `update(at, chunk)` changes them in place (chunk[i] is region
    /// read[i], elements `[at, at + len)`), and the regions `write` names (a subset of `read`)
    /// go back on a writer thread. At most `DISK_CHUNKS_IN_FLIGHT` chunks exist at once.
    pub fn stream<E: From<DiskError>>(
        &self,
        read: &[Region],
        write: &[Region],
        mut update: impl FnMut(i64, &[Tensor]) -> Result<(), E>,
    ) -> Result<(), E> {
        let starts: Vec<i64> = (0..self.len).step_by(DISK_CHUNK as usize).collect();
        let chunks = starts.len();
        let len = self.len;
        let size = move |at: i64| DISK_CHUNK.min(len - at);
        let (free_tx, free_rx) = sync_channel::<Vec<Tensor>>(DISK_CHUNKS_IN_FLIGHT as usize);
        for _ in 0..DISK_CHUNKS_IN_FLIGHT.min(chunks as i64) {
            let buffers =
                read.iter().map(|_| Tensor::empty([DISK_CHUNK.min(len)], (Kind::Float, Device::Cpu))).collect();
            free_tx.send(buffers).expect("the channel has room for every buffer set");
        }
        let (full_tx, full_rx) = sync_channel::<Result<(i64, Vec<Tensor>), DiskError>>(1);
        let (done_tx, done_rx) = sync_channel::<(i64, Vec<Tensor>)>(1);
        std::thread::scope(|scope| {
            // Each thread owns its channel ends: when one side stops, the other sees it.
            let reader = scope.spawn(move || {
                for at in starts {
                    let Ok(buffers) = free_rx.recv() else { return };
                    let chunk: Result<Vec<Tensor>, DiskError> = read
                        .iter()
                        .zip(&buffers)
                        .map(|(&region, b)| {
                            let part = b.narrow(0, 0, size(at));
                            self.read_into(region, at, &part).map(|_| part)
                        })
                        .collect();
                    if full_tx.send(chunk.map(|c| (at, c))).is_err() {
                        return;
                    }
                }
            });
            let writer = scope.spawn(move || -> Result<(), DiskError> {
                while let Ok((at, chunk)) = done_rx.recv() {
                    for (&region, t) in read.iter().zip(&chunk) {
                        if write.contains(&region) {
                            self.write(region, at, t)?;
                        }
                    }
                    // Hand the set back to the reader. Once it has read the last chunk it is gone
                    // and the set is dropped; the chunks still queued here are written all the
                    // same (the channel holds every set, so the send never blocks).
                    let _ = free_tx.send(chunk);
                }
                Ok(())
            });
            let mut result = Ok(());
            for _ in 0..chunks {
                let (at, chunk) = match full_rx.recv() {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        result = Err(E::from(e));
                        break;
                    }
                    Err(_) => break,
                };
                if let Err(e) = update(at, &chunk) {
                    result = Err(e);
                    break;
                }
                if done_tx.send((at, chunk)).is_err() {
                    break;
                }
            }
            // Stops both threads: the reader finds no more free buffers, the writer no more chunks.
            drop(done_tx);
            drop(full_rx);
            let written = writer.join().expect("the writer thread does not panic");
            reader.join().expect("the reader thread does not panic");
            result?;
            written.map_err(E::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_many_chunks_updates_every_element_once() {
        let dir = tempfile::tempdir().unwrap();
        let len = 2 * DISK_CHUNK + 12_345;
        let mut shard = DiskShard::create(dir.path(), "s", "unit".into(), len).unwrap();
        // Exact in fp32 (an arange past 2^24 is not).
        let values = Tensor::arange(len, (Kind::Int64, Device::Cpu)).remainder(4099).to_kind(Kind::Float);
        shard.write(Region::Master, 0, &values).unwrap();
        shard.add_grad(&Tensor::ones([len], (Kind::Float, Device::Cpu))).unwrap();
        shard.add_grad(&Tensor::ones([len], (Kind::Float, Device::Cpu))).unwrap();
        let read = [Region::Master, Region::Grad, Region::ExpAvg, Region::ExpAvgSq];
        shard
            .stream(&read, &[Region::Master, Region::ExpAvg], |at, c: &[Tensor]| -> Result<(), DiskError> {
                assert!(c[0].equal(&values.narrow(0, at, c[0].numel() as i64)), "master of the chunk at {at}");
                let _ = c[0].shallow_clone().g_add_(&c[1]);
                let _ = c[2].shallow_clone().fill_(at as f64);
                Ok(())
            })
            .unwrap();
        let master = shard.read(Region::Master, 0, len).unwrap();
        // The last chunks were lost once: the writer stopped when the reader, done, dropped
        // its end of the buffers' channel.
        assert!(master.equal(&(&values + 2.0)), "master after the stream");
        let m = shard.read(Region::ExpAvg, 0, len).unwrap();
        for at in [0, DISK_CHUNK, 2 * DISK_CHUNK] {
            let n = DISK_CHUNK.min(len - at);
            assert!(m.narrow(0, at, n).eq(at as f64).all().int64_value(&[]) == 1, "exp_avg of the chunk at {at}");
        }
    }
}
