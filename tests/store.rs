//! The activation store on the CPU: every place gives back the same bits (bf16, f32, i64, strided
//! inputs), in any order of prefetch and take, with byte counters that add up, a per-process folder
//! that lives as long as the store, and disk failures reported with the path. The side-stream
//! copies themselves need a GPU (tests/gpu); here they are the CPU's no-op moves.
use std::path::Path;
use tch::{Device, Kind, Tensor};
use ulysses::ffi::transfer::{self, CopyEvent};
use ulysses::plan::memory::Place;
use ulysses::train::store::ActivationStore;

const PLACES: [Place; 3] = [Place::Device, Place::Host, Place::Disk];
const KINDS: [Kind; 3] = [Kind::BFloat16, Kind::Float, Kind::Int64];

/// Values of `kind` including, for floats, the ones a conversion could change: -0, ±inf, NaN,
/// subnormals.
fn sample(kind: Kind, shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    let n: i64 = shape.iter().product();
    let t = match kind {
        Kind::Int64 => Tensor::randint_low(i64::MIN / 2, i64::MAX / 2, [n], (Kind::Int64, Device::Cpu)),
        _ => {
            let t = Tensor::randn([n], (Kind::Float, Device::Cpu)) * 1e3;
            let special = Tensor::from_slice(&[-0.0f32, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-40, -3e-39]);
            let k = special.size()[0].min(n);
            t.narrow(0, 0, k).copy_(&special.narrow(0, 0, k));
            t.to_kind(kind)
        }
    };
    t.view(shape)
}

/// The raw bytes of `t` in row-major order (a strided tensor is made contiguous first).
fn bits(t: &Tensor) -> Vec<u8> {
    let c = t.contiguous();
    let mut out = vec![0u8; c.numel() * c.kind().elt_size_in_bytes()];
    c.copy_data_u8(&mut out, c.numel());
    out
}

fn assert_same_bits(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    assert_eq!(got.kind(), want.kind(), "{what}: kind");
    assert_eq!(got.device(), Device::Cpu, "{what}: device");
    assert!(bits(got) == bits(want), "{what}: the bits differ");
}

fn store(dir: &Path) -> ActivationStore {
    ActivationStore::new(Device::Cpu, dir, 0).unwrap()
}

#[test]
fn every_place_and_kind_round_trips_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    for (p, place) in PLACES.into_iter().enumerate() {
        for (k, kind) in KINDS.into_iter().enumerate() {
            let seed = (p * 3 + k) as i64;
            let dense = sample(kind, &[2, 5, 8], seed);
            // [2, 8, 5] -> transposed view [2, 5, 8] with strides (40, 1, 5): not contiguous.
            let strided = sample(kind, &[2, 8, 5], seed + 100).transpose(1, 2);
            assert!(!strided.is_contiguous());
            for (t, layout) in [(dense, "contiguous"), (strided, "strided")] {
                let what = format!("{place:?} {kind:?} {layout}");
                let key = s.put(t.shallow_clone(), place).unwrap();
                let back = s.take(key).unwrap();
                assert_same_bits(&back, &t, &what);
                match place {
                    // Kept as is: the very same storage and strides.
                    Place::Device | Place::Host => {
                        assert_eq!(back.data_ptr(), t.data_ptr(), "{what}: not kept as is");
                        assert_eq!(back.stride(), t.stride(), "{what}: strides");
                    }
                    Place::Disk => assert!(back.is_contiguous(), "{what}: comes back contiguous"),
                }
            }
        }
    }
    assert_eq!(s.disk_bytes().0, 0);
    assert_eq!(s.host_bytes().0, 0);
}

#[test]
fn empty_tensors_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    for place in PLACES {
        let t = Tensor::zeros([3, 0, 4], (Kind::BFloat16, Device::Cpu));
        let key = s.put(t.shallow_clone(), place).unwrap();
        assert_same_bits(&s.take(key).unwrap(), &t, &format!("{place:?} empty"));
    }
}

/// Forward puts layer by layer; backward takes them last to first, prefetching `ahead` layers.
fn forward_then_backward(ahead: usize, prefetch_all_first: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    let n = 12;
    let mut kept = Vec::new();
    let mut keys = Vec::new();
    for l in 0..n {
        let t = sample(KINDS[l % 3], &[1 + l as i64 % 2, 7, 4 + l as i64], l as i64);
        keys.push(Some(s.put(t.shallow_clone(), PLACES[(l / 3 + l) % 3]).unwrap()));
        kept.push(t);
    }
    if prefetch_all_first {
        // More disk items than the read-ahead bound: the rest wait their turn.
        for key in keys.iter().rev() {
            s.prefetch(key.as_ref().unwrap()).unwrap();
        }
    }
    for l in (0..n).rev() {
        for a in 1..=ahead {
            if let Some(Some(key)) = l.checked_sub(a).map(|i| &keys[i]) {
                s.prefetch(key).unwrap();
                s.prefetch(key).unwrap(); // idempotent
            }
        }
        let back = s.take(keys[l].take().unwrap()).unwrap();
        assert_same_bits(&back, &kept[l], &format!("layer {l}"));
    }
    assert_eq!(s.disk_bytes().0, 0);
    assert_eq!(s.host_bytes().0, 0);
    let left: Vec<_> = std::fs::read_dir(s.dir()).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn reverse_order_with_prefetch_one_ahead() {
    forward_then_backward(1, false);
}

#[test]
fn reverse_order_with_prefetch_two_ahead() {
    forward_then_backward(2, false);
}

#[test]
fn reverse_order_without_prefetch() {
    forward_then_backward(0, false);
}

#[test]
fn everything_prefetched_at_once() {
    forward_then_backward(0, true);
}

#[test]
fn take_in_put_order_and_right_after_put() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    let ts: Vec<Tensor> = (0..6).map(|i| sample(Kind::Float, &[3, 4], i)).collect();
    let keys: Vec<_> = ts.iter().map(|t| s.put(t.shallow_clone(), Place::Disk).unwrap()).collect();
    for (t, key) in ts.iter().zip(keys) {
        assert_same_bits(&s.take(key).unwrap(), t, "forward order");
    }
    // Taken while its write may still be pending.
    let t = sample(Kind::BFloat16, &[64, 64], 9);
    let key = s.put(t.shallow_clone(), Place::Disk).unwrap();
    assert_same_bits(&s.take(key).unwrap(), &t, "right after put");
}

#[test]
fn per_process_folder_lives_as_long_as_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = ActivationStore::new(Device::Cpu, tmp.path(), 3).unwrap();
    let dir = s.dir().to_path_buf();
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("ulysses-") && name.ends_with(&format!("-{}-rank3", std::process::id())), "{name}");
    assert_eq!(dir.parent(), Some(tmp.path()));
    assert!(dir.is_dir());
    let _kept_on_disk = s.put(sample(Kind::Float, &[16, 16], 1), Place::Disk).unwrap();
    let taken = s.put(sample(Kind::Float, &[16, 16], 2), Place::Disk).unwrap();
    drop(s.take(taken).unwrap());
    assert!(dir.is_dir());
    drop(s); // with an item still on disk
    assert!(!dir.exists(), "{} is still there after drop", dir.display());
    assert!(tmp.path().is_dir(), "the offload folder itself stays");
}

#[test]
fn empty_offload_dir_means_the_temp_dir() {
    let s = ActivationStore::new(Device::Cpu, Path::new(""), 7).unwrap();
    let dir = s.dir().to_path_buf();
    assert_eq!(dir.parent(), Some(std::env::temp_dir().as_path()));
    assert!(dir.is_dir());
    drop(s);
    assert!(!dir.exists());
}

#[test]
fn unwritable_offload_dir_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    // A regular file where a folder is expected: cannot hold a folder, even for root.
    let not_a_dir = tmp.path().join("not-a-folder");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let err = ActivationStore::new(Device::Cpu, &not_a_dir, 0).err().expect("a file is not a folder");
    let msg = format!("{err:#}");
    assert!(msg.contains(&not_a_dir.display().to_string()), "{msg}");
    assert!(msg.contains("offload_dir"), "{msg}");
}

#[test]
fn failed_disk_write_is_reported_with_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    let dir = s.dir().to_path_buf();
    std::fs::remove_dir_all(&dir).unwrap(); // as if the disk went away
    let key = s.put(sample(Kind::Float, &[8, 8], 0), Place::Disk).unwrap();
    let err = s.take(key).expect_err("the write cannot have succeeded");
    let msg = format!("{err:#}");
    assert!(msg.contains(&dir.join("0.bin").display().to_string()), "{msg}");
    assert!(msg.contains("No such file or directory"), "{msg}");
    // Reported once; the store keeps working for places that need no file.
    let t = sample(Kind::Int64, &[4], 1);
    let key = s.put(t.shallow_clone(), Place::Host).unwrap();
    assert_same_bits(&s.take(key).unwrap(), &t, "after the failure");
}

#[test]
fn failed_write_is_reported_by_the_next_put() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    std::fs::remove_dir_all(s.dir()).unwrap();
    let _lost = s.put(sample(Kind::Float, &[8, 8], 0), Place::Disk).unwrap();
    // The write fails in the background; a later put sees it (waiting at most for the writes in
    // flight, which the next disk puts do once the bound is reached).
    let mut reported = None;
    for i in 0..4 {
        if let Err(e) = s.put(sample(Kind::Float, &[8, 8], i), Place::Disk) {
            reported = Some(format!("{e:#}"));
            break;
        }
    }
    let msg = reported.expect("a put reports the failed write");
    assert!(msg.contains("0.bin"), "{msg}");
}

#[test]
fn byte_counters_follow_the_items() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    let a = sample(Kind::BFloat16, &[4, 8, 16], 0); // 1024 B
    let b = sample(Kind::Float, &[2, 64], 1); // 512 B
                                              // Device, and Host on a CPU run, are kept on the compute device: no host or disk bytes.
    let kd = s.put(a.shallow_clone(), Place::Device).unwrap();
    let kh = s.put(a.shallow_clone(), Place::Host).unwrap();
    assert_eq!((s.host_bytes(), s.disk_bytes()), ((0, 0), (0, 0)));
    let ka = s.put(a.shallow_clone(), Place::Disk).unwrap();
    let kb = s.put(b.shallow_clone(), Place::Disk).unwrap();
    assert_eq!(s.disk_bytes(), (1536, 1536));
    // Staging buffers are held from put until their write is done (a's may be done before b's put).
    let peak = s.host_bytes().1;
    assert!((1024..=1536).contains(&peak), "host peak {peak}");
    drop(s.take(ka).unwrap());
    assert_eq!(s.disk_bytes(), (512, 1536));
    s.reset_peaks();
    assert_eq!(s.disk_bytes(), (512, 512));
    drop(s.take(kb).unwrap());
    assert_eq!(s.disk_bytes(), (0, 512));
    assert_eq!(s.host_bytes(), (0, 512), "the read of b staged 512 B since the reset");
    drop(s.take(kd).unwrap());
    drop(s.take(kh).unwrap());
    s.reset_peaks();
    assert_eq!((s.host_bytes(), s.disk_bytes()), ((0, 0), (0, 0)));
}

#[test]
fn reads_ahead_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    let item = 1 << 20; // bytes: [512, 512] f32
    let ts: Vec<Tensor> = (0..6).map(|i| sample(Kind::Float, &[512, 512], i)).collect();
    let mut keys: Vec<_> = ts.iter().map(|t| Some(s.put(t.shallow_clone(), Place::Disk).unwrap())).collect();
    // The last item's read queues behind every write: afterwards no staging buffer is held.
    assert_same_bits(&s.take(keys[5].take().unwrap()).unwrap(), &ts[5], "last");
    assert_eq!(s.host_bytes().0, 0);
    s.reset_peaks();
    // All at once, in the order backward takes them: two start, the rest wait their turn.
    for key in keys.iter().rev().flatten() {
        s.prefetch(key).unwrap();
    }
    for l in (0..5).rev() {
        assert_same_bits(&s.take(keys[l].take().unwrap()).unwrap(), &ts[l], &format!("item {l}"));
    }
    let (now, peak) = s.host_bytes();
    assert_eq!(now, 0);
    assert!((item..=2 * item).contains(&peak), "staged {peak} B for reads: at most two items of {item} B");
}

#[test]
fn a_key_of_another_store_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    let mut other = store(&tmp.path().join("other"));
    let mine = Tensor::from_slice(&[1.0f32, 2.0]);
    let key = s.put(mine.shallow_clone(), Place::Device).unwrap();
    let foreign = other.put(Tensor::from_slice(&[3.0f32]), Place::Device).unwrap();
    let msg = format!("{:#}", s.prefetch(&foreign).unwrap_err());
    assert!(msg.contains("another store"), "{msg}");
    assert!(s.take(foreign).is_err());
    assert_same_bits(&s.take(key).unwrap(), &mine, "own item");
}

#[test]
fn transfers_on_the_cpu_are_no_op_moves() {
    let t = sample(Kind::Float, &[3, 5], 4);
    let (h, done) = transfer::to_host(&t).unwrap();
    assert_eq!(h.data_ptr(), t.data_ptr());
    done.wait().unwrap();
    done.synchronize().unwrap();
    assert!(done.is_complete().unwrap());
    let (d, done) = transfer::to_device(&h, Device::Cpu).unwrap();
    assert_eq!(d.data_ptr(), t.data_ptr());
    assert!(done.is_complete().unwrap());
    assert!(CopyEvent::record_current(Device::Cpu).unwrap().is_complete().unwrap());
    // side_copy between host tensors copies at once; mismatched shapes are an error.
    let dst = Tensor::zeros([3, 5], (Kind::Float, Device::Cpu));
    transfer::side_copy(&dst, &t, None).unwrap().wait().unwrap();
    assert_same_bits(&dst, &t, "side_copy");
    let wrong = Tensor::zeros([5, 3], (Kind::Float, Device::Cpu));
    let err = transfer::side_copy(&wrong, &t, None).unwrap_err().to_string();
    assert!(err.contains("[3, 5]") && err.contains("[5, 3]"), "{err}");
}

// On a GPU machine (tests/gpu/run.sh runs this test binary from the bundle with `--ignored gpu_`):
// the side-stream copies themselves. `slow` queues ~100 ms of matmuls on the compute stream, so a copy that did
// not wait for the compute stream, or memory handed to a new tensor while a copy still uses it,
// would read or write the wrong bytes.

fn gpu() -> Device {
    assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
    Device::Cuda(0)
}

/// A [n, n] f32 tensor written by the last of 30 queued matmuls (the host does not wait).
fn slow(a: &Tensor) -> Tensor {
    let mut y = a.shallow_clone();
    for _ in 0..30 {
        y = y.matmul(a);
    }
    y
}

fn on_host_bits(t: &Tensor) -> Vec<u8> {
    bits(&t.to_device(Device::Cpu))
}

const N: i64 = 4096; // 64 MiB of f32, a few ms per matmul

fn scaled_random(dev: Device) -> Tensor {
    Tensor::randn([N, N], (Kind::Float, dev)) / (N as f64).sqrt()
}

#[test]
#[ignore = "needs a CUDA GPU (tests/gpu/run.sh)"]
fn gpu_round_trips_bit_identical() {
    let dev = gpu();
    let tmp = tempfile::tempdir().unwrap();
    let mut s = ActivationStore::new(dev, tmp.path(), 0).unwrap();
    for place in PLACES {
        for kind in KINDS {
            let dense = sample(kind, &[2, 5, 8], 1).to_device(dev);
            let strided = sample(kind, &[2, 8, 5], 2).to_device(dev).transpose(1, 2);
            for t in [dense, strided] {
                let key = s.put(t.shallow_clone(), place).unwrap();
                s.prefetch(&key).unwrap();
                let back = s.take(key).unwrap();
                assert_eq!((back.device(), back.kind(), back.size()), (dev, kind, t.size()), "{place:?} {kind:?}");
                assert!(on_host_bits(&back) == on_host_bits(&t), "{place:?} {kind:?}: the bits differ");
            }
        }
    }
    assert_eq!((s.host_bytes().0, s.disk_bytes().0), (0, 0));
}

#[test]
#[ignore = "needs a CUDA GPU (tests/gpu/run.sh)"]
fn gpu_copy_to_host_waits_for_compute_and_keeps_its_source() {
    let dev = gpu();
    let tmp = tempfile::tempdir().unwrap();
    let mut s = ActivationStore::new(dev, tmp.path(), 0).unwrap();
    let a = scaled_random(dev);
    for place in [Place::Host, Place::Disk] {
        let x = slow(&a); // still being computed when put returns
        let reference = x.copy();
        let key = s.put(x, place).unwrap(); // the store drops its handle to x
                                            // Would take x's memory if the allocator did not know the side stream still reads it.
        let overwrite = Tensor::full([N, N], 7.0, (Kind::Float, dev));
        let back = s.take(key).unwrap();
        assert!(on_host_bits(&back) == on_host_bits(&reference), "{place:?}: copied the wrong bytes");
        drop(overwrite);
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tests/gpu/run.sh)"]
fn gpu_copy_to_device_waits_for_the_memory_previous_tenant() {
    let dev = gpu();
    let tmp = tempfile::tempdir().unwrap();
    let mut s = ActivationStore::new(dev, tmp.path(), 0).unwrap();
    let a = scaled_random(dev);
    for place in [Place::Host, Place::Disk] {
        let item = scaled_random(dev);
        let reference = item.copy();
        let key = s.put(item, place).unwrap();
        // Freed [N, N] blocks that queued matmuls still write: the prefetch's destination takes
        // one of them, so its copy must wait for the compute stream.
        drop(slow(&a));
        s.prefetch(&key).unwrap();
        let back = s.take(key).unwrap();
        assert!(on_host_bits(&back) == on_host_bits(&reference), "{place:?}: overwritten after the copy");
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tests/gpu/run.sh)"]
fn gpu_take_orders_the_compute_stream_after_the_copy() {
    let dev = gpu();
    let tmp = tempfile::tempdir().unwrap();
    let mut s = ActivationStore::new(dev, tmp.path(), 0).unwrap();
    let item = Tensor::randn([8192, 8192], (Kind::Float, dev)); // 256 MiB: ~10 ms to copy back
    let want = item.sum(Kind::Double).double_value(&[]);
    let key = s.put(item, Place::Host).unwrap();
    // Without the wait in take, this sum would read the destination before the copy filled it.
    let got = s.take(key).unwrap().sum(Kind::Double).double_value(&[]);
    assert_eq!(got, want);
}

#[test]
#[ignore = "needs a CUDA GPU (tests/gpu/run.sh)"]
fn gpu_events() {
    let dev = gpu();
    let a = scaled_random(dev);
    let _busy = slow(&a);
    let event = CopyEvent::record_current(dev).unwrap();
    event.wait().unwrap();
    event.synchronize().unwrap();
    assert!(event.is_complete().unwrap());
    let (host, done) = transfer::to_host(&a).unwrap();
    let (back, back_done) = transfer::to_device(&host, dev).unwrap();
    back_done.wait().unwrap();
    done.synchronize().unwrap();
    assert!(host.is_pinned(dev));
    assert!(on_host_bits(&back) == on_host_bits(&a));
}

#[test]
fn without_a_gpu_cuda_calls_are_errors_not_crashes() {
    if tch::Cuda::is_available() {
        return;
    }
    let dev = Device::Cuda(0);
    let err = CopyEvent::record_current(dev).unwrap_err().to_string();
    assert!(err.starts_with("recording an event: "), "{err}");
    let host = Tensor::zeros([4], (Kind::Float, Device::Cpu));
    let err = transfer::empty_pinned_like(&host).map(|_| ()).unwrap_err().to_string();
    assert!(err.starts_with("allocating pinned host memory: "), "{err}");
    let err = transfer::to_device(&host, dev).map(|_| ()).unwrap_err().to_string();
    assert!(err.starts_with("copy to device: "), "{err}");
}

#[test]
fn folders_of_processes_that_are_gone_are_removed_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let s = ActivationStore::new(Device::Cpu, tmp.path(), 0).unwrap();
    let name = s.dir().file_name().unwrap().to_string_lossy().to_string();
    let host = name.strip_prefix("ulysses-").unwrap().strip_suffix(&format!("-{pid}-rank0")).unwrap().to_string();
    drop(s);
    // A process that has ended (killed with -9, aborted): its pid runs nothing now.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = [format!("ulysses-{host}-{dead}-rank1"), format!("ulysses-{dead}-rank2")];
    let kept =
        [format!("ulysses-elsewhere-{dead}-rank1"), format!("ulysses-{host}-{pid}-rank5"), "ulysses-notes".into()];
    for folder in stale.iter().chain(&kept) {
        std::fs::create_dir_all(tmp.path().join(folder)).unwrap();
        std::fs::write(tmp.path().join(folder).join("0.bin"), b"x").unwrap();
    }
    let s = ActivationStore::new(Device::Cpu, tmp.path(), 0).unwrap();
    for folder in &stale {
        assert!(!tmp.path().join(folder).exists(), "{folder} (a process of this host that is gone) is left");
    }
    for folder in &kept {
        assert!(tmp.path().join(folder).exists(), "{folder} (another host's, a live process's, not ours) was removed");
    }
    drop(s);
}
