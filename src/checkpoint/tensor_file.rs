//! Safetensors files written and read in pieces. A writer plans the header up front from each
//! tensor's dtype and shape, then streams the data in order, so it never holds a whole file (or
//! a whole tensor); a reader checks a file's header against its length and reads any byte range
//! of it. The bytes are the safetensors format (8-byte little-endian header length, a JSON
//! header, then the data), so `safetensors.safe_open` and transformers read these files too.
use super::{io_err, CheckpointError};
use crate::ffi::transfer::{host_bytes, host_values};
use safetensors::tensor::{Dtype, TensorInfo};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The header of a file to write: every tensor's name, dtype, shape and place, in data order.
pub struct Layout {
    tensors: Vec<(String, TensorInfo)>,
    header: Vec<u8>,
}

impl Layout {
    pub fn new(tensors: impl IntoIterator<Item = (String, Dtype, Vec<usize>)>) -> Layout {
        let mut at = 0;
        let tensors: Vec<(String, TensorInfo)> = tensors
            .into_iter()
            .map(|(name, dtype, shape)| {
                let n = shape.iter().product::<usize>() * dtype.size();
                let info = TensorInfo { dtype, shape, data_offsets: (at, at + n) };
                at += n;
                (name, info)
            })
            .collect();
        let mut map = serde_json::Map::new();
        // transformers before 4.47 reads `__metadata__.format` of every file it loads and fails
        // on a file without it ('NoneType' object has no attribute 'get'); torch's writer says "pt".
        map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
        for (name, info) in &tensors {
            map.insert(name.clone(), serde_json::to_value(info).expect("a TensorInfo always serializes"));
        }
        let mut json = serde_json::to_vec(&map).expect("a JSON map always serializes");
        // The format asks for data that starts 8-byte aligned: pad the header with spaces.
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let mut header = (json.len() as u64).to_le_bytes().to_vec();
        header.extend(json);
        Layout { tensors, header }
    }

    /// The length prefix and the JSON header: the file's first bytes.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Where tensor `i` (in the order given) starts in the file.
    pub fn offset_of(&self, i: usize) -> u64 {
        (self.header.len() + self.tensors[i].1.data_offsets.0) as u64
    }

    pub fn file_bytes(&self) -> u64 {
        (self.header.len() + self.tensors.last().map_or(0, |(_, t)| t.data_offsets.1)) as u64
    }

    pub fn data_bytes(&self) -> u64 {
        self.file_bytes() - self.header.len() as u64
    }

    /// Names and places of the tensors, in data order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }
}

/// A file being written: its header first, then the data in order; `finish` checks that the
/// layout's every byte was written and flushes the file to disk. On the way it takes the file's
/// CRC-32 and counts each tensor's non-finite fp32 values: the bytes are in the cache then, so
/// neither costs a second read.
pub struct Writer {
    file: File,
    path: PathBuf,
    written: u64,
    expected: u64,
    crc: crc32fast::Hasher,
    /// Where each tensor's data starts in the file, in data order.
    starts: Vec<u64>,
    non_finite: Vec<u64>,
}

/// A finished file: its size, its CRC-32 (`checksum`) and the non-finite fp32 values of each
/// tensor of its layout, in data order.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub bytes: u64,
    pub crc32: u32,
    pub non_finite: Vec<u64>,
}

impl Writer {
    pub fn create(path: &Path, layout: &Layout) -> Result<Writer, CheckpointError> {
        let mut file = crate::files::create(path).map_err(io_err(path))?;
        file.write_all(layout.header()).map_err(io_err(path))?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(layout.header());
        let starts: Vec<u64> = (0..layout.tensors.len()).map(|i| layout.offset_of(i)).collect();
        Ok(Writer {
            file,
            path: path.to_path_buf(),
            written: layout.header().len() as u64,
            expected: layout.file_bytes(),
            crc,
            non_finite: vec![0; starts.len()],
            starts,
        })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        self.file.write_all(bytes).map_err(io_err(&self.path))?;
        self.crc.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// The bytes of a contiguous host tensor (a piece of one tensor of the layout, or all of it).
    pub fn write_tensor(&mut self, t: &Tensor) -> Result<(), CheckpointError> {
        if t.kind() == Kind::Float {
            let n = count_non_finite(host_values::<f32>(t));
            if n > 0 {
                // The tensor this piece starts in: the last one starting at or before it.
                let i = self.starts.partition_point(|&s| s <= self.written).saturating_sub(1);
                self.non_finite[i] += n;
            }
        }
        self.write(host_bytes(t))
    }

    /// Flushes the file to disk (fsync); returns what was written.
    pub fn finish(self) -> Result<Written, CheckpointError> {
        assert_eq!(
            self.written,
            self.expected,
            "{}: the writer wrote other sizes than its layout",
            self.path.display()
        );
        self.file.sync_all().map_err(io_err(&self.path))?;
        Ok(Written { bytes: self.written, crc32: self.crc.finalize(), non_finite: self.non_finite })
    }
}

/// NaNs and infinities among `x` (all exponent bits set).
pub fn count_non_finite(x: &[f32]) -> u64 {
    x.iter().filter(|v| v.to_bits() & 0x7f80_0000 == 0x7f80_0000).count() as u64
}

/// The CRC-32 of a whole file, read in 8 MiB pieces: what `Written::crc32` was when it was written.
pub fn file_crc32(path: &Path) -> Result<u32, CheckpointError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok(crc.finalize());
        }
        crc.update(&buf[..n]);
    }
}

/// One tensor of a file being read: its dtype, shape and where its bytes start in the file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub begin: u64,
}

/// The tensors of a safetensors file, by name, after checking that the header is well formed,
/// that the tensors tile the data without gaps, and that the file is as long as the header says
/// (a truncated file is caught here, before any byte of it is used).
pub fn read_header(path: &Path) -> Result<HashMap<String, Entry>, CheckpointError> {
    let corrupt = |message: String| CheckpointError::Corrupt { path: path.display().to_string(), message };
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut prefix = [0u8; 8];
    file.read_exact_at(&mut prefix, 0).map_err(|_| corrupt(format!("{len} bytes, shorter than a header")))?;
    let n = u64::from_le_bytes(prefix);
    if n > 100 << 20 || 8 + n > len {
        return Err(corrupt(format!("its header claims {n} bytes but the file has {len}")));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact_at(&mut json, 8).map_err(io_err(path))?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| corrupt(format!("its header is not valid JSON: {e}")))?;
    let mut entries: Vec<(String, TensorInfo)> = Vec::new();
    for (name, value) in map {
        if name == "__metadata__" {
            continue;
        }
        let info: TensorInfo =
            serde_json::from_value(value).map_err(|e| corrupt(format!("tensor `{name}` in the header: {e}")))?;
        entries.push((name, info));
    }
    entries.sort_by_key(|(_, info)| info.data_offsets);
    let mut at = 0;
    for (name, info) in &entries {
        let (begin, end) = info.data_offsets;
        let bytes = info.shape.iter().product::<usize>() * info.dtype.size();
        if begin != at || end < begin || end - begin != bytes {
            return Err(corrupt(format!(
                "tensor `{name}` has data offsets {begin}..{end}, expected {at}..{}",
                at + bytes
            )));
        }
        at = end;
    }
    if 8 + n + at as u64 != len {
        return Err(corrupt(format!("the header describes {} bytes but the file has {len}", 8 + n + at as u64)));
    }
    let start = 8 + n;
    Ok(entries
        .into_iter()
        .map(|(name, info)| {
            (name, Entry { dtype: info.dtype, shape: info.shape, begin: start + info.data_offsets.0 as u64 })
        })
        .collect())
}

/// Fills `buf` from `offset` of `file`; a file shorter than that is corrupt.
pub fn read_at(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<(), CheckpointError> {
    file.read_exact_at(buf, offset).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => CheckpointError::Corrupt {
            path: path.display().to_string(),
            message: format!("ends before byte {}", offset + buf.len() as u64),
        },
        _ => io_err(path)(e),
    })
}

/// The libtorch kind of a safetensors dtype, for the float dtypes model weights come in.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

pub fn dtype_of(kind: Kind) -> Dtype {
    match kind {
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Double => Dtype::F64,
        _ => Dtype::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn a_streamed_file_is_a_safetensors_file_and_truncation_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu));
        let b = Tensor::from_slice(&[1.5f32, -2.0]).to_kind(Kind::BFloat16);
        let layout = Layout::new([("a".to_string(), Dtype::F32, vec![2, 3]), ("b".to_string(), Dtype::BF16, vec![2])]);
        let mut w = Writer::create(&path, &layout).unwrap();
        w.write_tensor(&a.narrow(0, 0, 4)).unwrap();
        w.write_tensor(&a.narrow(0, 4, 2)).unwrap();
        w.write_tensor(&b).unwrap();
        let written = w.finish().unwrap();
        assert_eq!(written.bytes, layout.file_bytes());
        assert_eq!(written.crc32, crc32fast::hash(&std::fs::read(&path).unwrap()), "the CRC of the bytes on disk");
        assert_eq!(file_crc32(&path).unwrap(), written.crc32);
        assert_eq!(written.non_finite, vec![0, 0]);
        // tch's own (whole-file) reader agrees.
        let back: HashMap<String, Tensor> = Tensor::read_safetensors(&path).unwrap().into_iter().collect();
        assert!(back["a"].equal(&a.view([2, 3])) && back["b"].equal(&b));
        let entries = read_header(&path).unwrap();
        assert_eq!(entries["b"].begin, layout.offset_of(1));
        assert_eq!(entries["b"].begin - entries["a"].begin, 24, "a's 6 fp32 values come first");
        assert_eq!((entries["a"].shape.clone(), entries["b"].dtype), (vec![2, 3], Dtype::BF16));
        assert_eq!(layout.offset_of(0) % 8, 0, "data starts 8-byte aligned");

        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 1).unwrap();
        let e = read_header(&path).unwrap_err().to_string();
        assert!(e.contains("x.safetensors") && e.contains("truncated or corrupt"), "{e}");
    }
}
