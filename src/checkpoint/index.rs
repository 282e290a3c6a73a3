//! Where a checkpoint's numbers are. Format 2 splits every flat unit (`parallel::zero::Unit`)
//! into `world` equal slices, one per rank file, and `index.json` records each unit's tensors
//! (names, shapes, flat offsets) and each slice's file and byte offsets. `Source` reads any flat
//! range of any unit from a checkpoint of either format, touching only the bytes of that range,
//! so a job of any layout loads what any other layout saved.
use super::tensor_file::{self, read_at, Layout};
use super::{io_err, CheckpointError, EXP_AVG, EXP_AVG_SQ, OPTIMIZER};
use crate::config::LoraConfig;
use crate::ffi::transfer::{host_bytes_mut, host_values};
use crate::model::params::ModelWeights;
use crate::model::spec::adapter::trainable_shapes;
use crate::model::spec::ModelSpec;
use crate::model::weights::WeightsError;
use crate::parallel::units::lora_units;
use crate::parallel::zero::{model_units, State, Unit};
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const INDEX: &str = "index.json";

/// Elements read per chunk when a range goes through a host buffer (a GPU destination, or
/// another dtype): 64 MiB of fp32.
const CHUNK: i64 = 16 << 20;

/// The flat range `(start, len)` of a unit of `numel` elements that rank `rank` of `world`
/// saves: the rank-th of `world` equal slices (the last ones shorter, or empty), at any ZeRO
/// stage. At stage 3 it is exactly the rank's shard without its padding.
pub fn saved_range(numel: i64, rank: usize, world: usize) -> (i64, i64) {
    let per = (numel + world as i64 - 1) / world as i64;
    let start = (per * rank as i64).min(numel);
    (start, (per * (rank as i64 + 1)).min(numel) - start)
}

pub fn rank_file_name(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

/// The file rank `rank` writes: one fp32 tensor `<unit>.<state>` per unit and state, every
/// unit's master weights first, then each Adam moment (`State::ALL` order).
pub fn rank_layout(units: &[Unit], rank: usize, world: usize) -> Layout {
    Layout::new(State::ALL.into_iter().flat_map(|state| {
        units.iter().map(move |u| {
            let (_, len) = saved_range(u.numel, rank, world);
            (format!("{}.{}", u.id.key(), state.name()), Dtype::F32, vec![len as usize])
        })
    }))
}

/// `index.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub format: u32,
    /// Ranks (and rank files) that wrote the checkpoint.
    pub world: usize,
    /// The states every slice holds, in the order of `Slice::bytes`.
    pub states: Vec<String>,
    pub files: Vec<IndexFile>,
    pub units: Vec<IndexUnit>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexFile {
    pub name: String,
    pub bytes: u64,
    /// The file's CRC-32 (8 hex digits), taken while it was written; checked by the first read
    /// of the file. Absent in checkpoints of ulysses before 2026-12-06.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexUnit {
    pub unit: String,
    pub numel: i64,
    pub tensors: Vec<IndexTensor>,
    pub slices: Vec<Slice>,
}

/// A Hugging Face tensor of a unit: its elements are `[offset, offset + numel)` of the flat unit.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: i64,
}

/// Flat elements `[start, start + len)` of a unit, in file `file`, each state's fp32 data at
/// byte `bytes[s]` of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slice {
    pub file: usize,
    pub start: i64,
    pub len: i64,
    pub bytes: Vec<u64>,
}

impl Index {
    /// The index of a checkpoint that `world` ranks wrote with `rank_layout`.
    pub fn new(units: &[Unit], world: usize) -> Index {
        let layouts: Vec<Layout> = (0..world).map(|r| rank_layout(units, r, world)).collect();
        let files = layouts.iter().enumerate().map(|(r, l)| IndexFile {
            name: rank_file_name(r, world),
            bytes: l.file_bytes(),
            crc32: None,
        });
        let units = units.iter().enumerate().map(|(i, u)| IndexUnit {
            unit: u.id.key(),
            numel: u.numel,
            tensors: flat_offsets(&u.tensors)
                .map(|(name, shape, offset)| IndexTensor { name: name.clone(), shape: shape.clone(), offset })
                .collect(),
            slices: (0..world)
                .map(|r| {
                    let (start, len) = saved_range(u.numel, r, world);
                    let bytes = (0..State::ALL.len()).map(|s| layouts[r].offset_of(s * units.len() + i)).collect();
                    Slice { file: r, start, len, bytes }
                })
                .collect(),
        });
        Index {
            format: 2,
            world,
            states: State::ALL.iter().map(|s| s.name().to_string()).collect(),
            files: files.collect(),
            units: units.collect(),
        }
    }
}

/// Each tensor of a unit with where it starts in the flat unit.
fn flat_offsets(tensors: &[(String, Vec<i64>)]) -> impl Iterator<Item = (&String, &Vec<i64>, i64)> {
    tensors.iter().scan(0i64, |at, (name, shape)| {
        let offset = *at;
        *at += shape.iter().product::<i64>();
        Some((name, shape, offset))
    })
}

/// Elements `[start, start + len)` of a flat unit that lie in a file at byte `byte`, as `kind`.
#[derive(Debug, Clone)]
struct Extent {
    start: i64,
    len: i64,
    file: usize,
    byte: u64,
    kind: Kind,
}

/// A unit as a checkpoint holds it: its tensors and, per state, where its elements are.
struct SourceUnit {
    /// The unit's name (`UnitId::key`), for messages.
    name: String,
    numel: i64,
    tensors: Vec<(String, Vec<i64>)>,
    extents: [Vec<Extent>; 3],
}

/// A checkpoint opened for reading, checked against the model it is to be loaded into.
pub struct Source {
    files: Vec<PathBuf>,
    /// The size each file must have (format 2: from the index), checked when it is opened.
    sizes: Vec<Option<u64>>,
    /// The CRC-32 each file must have (format 2 since checksums), checked at its first opening:
    /// a whole read of the file, once per file this process reads from.
    crc32: Vec<Option<u32>>,
    verified: Vec<std::sync::OnceLock<()>>,
    units: Vec<SourceUnit>,
}

impl Source {
    /// The checkpoint folder `dir` of `format` (its run_state.json's), for `spec`: every unit's
    /// tensors must have the spec's names and shapes.
    pub fn open(dir: &Path, spec: &ModelSpec, format: u32) -> Result<Source, CheckpointError> {
        Self::open_trained(dir, spec, None, format)
    }

    /// `open` for the parameters a run trains: the whole model, or under `lora` its trainable
    /// units (`lora_units`: the adapters and the modules trained in full), which only format 2
    /// holds.
    pub fn open_trained(
        dir: &Path,
        spec: &ModelSpec,
        lora: Option<&LoraConfig>,
        format: u32,
    ) -> Result<Source, CheckpointError> {
        match (format, lora) {
            (1, None) => Self::open_format1(dir, spec),
            (1, Some(_)) => Err(CheckpointError::Mismatch {
                path: dir.display().to_string(),
                message: "a format-1 checkpoint holds a whole model and no LoRA adapters; remove [lora] to resume it"
                    .into(),
            }),
            (_, None) => Self::open_format2(dir, model_units(spec, 1), &ModelWeights::shapes(spec)),
            (_, Some(l)) => Self::open_format2(dir, lora_units(spec, l, 1), &trainable_shapes(spec, l)),
        }
    }

    /// A format-2 checkpoint that must hold the units `expected`, whose tensors are `shapes`.
    fn open_format2(dir: &Path, expected: Vec<Unit>, shapes: &[(String, Vec<i64>)]) -> Result<Source, CheckpointError> {
        let path = dir.join(INDEX);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let corrupt = |message: String| CheckpointError::Corrupt { path: path.display().to_string(), message };
        let index: Index = serde_json::from_str(&text).map_err(|e| corrupt(format!("not a checkpoint index: {e}")))?;
        let states: Vec<&str> = State::ALL.iter().map(|s| s.name()).collect();
        if index.format != 2 || index.states != states {
            return Err(corrupt(format!(
                "format {} with states {:?}; this ulysses reads format 2 with {states:?}",
                index.format, index.states
            )));
        }
        let names_ok = index.files.iter().enumerate().all(|(r, f)| f.name == rank_file_name(r, index.world));
        if index.files.len() != index.world || !names_ok {
            return Err(corrupt(format!(
                "expected the files {} .. {}",
                rank_file_name(0, index.world),
                rank_file_name(index.world.saturating_sub(1), index.world)
            )));
        }
        let found: Vec<(String, Vec<i64>)> =
            index.units.iter().flat_map(|u| u.tensors.iter().map(|t| (t.name.clone(), t.shape.clone()))).collect();
        check_tensors(shapes, &found, &path.display().to_string())?;
        if index.units.len() != expected.len() {
            return Err(corrupt(format!("{} units, the model has {}", index.units.len(), expected.len())));
        }
        let mut units = Vec::new();
        for (u, saved) in expected.iter().zip(&index.units) {
            let offsets_ok = flat_offsets(&u.tensors)
                .zip(&saved.tensors)
                .all(|((name, shape, offset), t)| (name, shape, offset) == (&t.name, &t.shape, t.offset));
            let slices_ok = saved.slices.iter().all(|s| {
                s.file < index.files.len()
                    && s.bytes.len() == states.len()
                    && s.start >= 0
                    && s.start + s.len <= u.numel
            });
            if saved.unit != u.id.key() || saved.numel != u.numel || !offsets_ok || !slices_ok {
                return Err(corrupt(format!(
                    "unit `{}` does not describe the model's unit `{}`",
                    saved.unit,
                    u.id.key()
                )));
            }
            let extents = [0, 1, 2].map(|s| {
                saved
                    .slices
                    .iter()
                    .map(|p| Extent { start: p.start, len: p.len, file: p.file, byte: p.bytes[s], kind: Kind::Float })
                    .collect()
            });
            units.push(SourceUnit { name: u.id.key(), numel: u.numel, tensors: u.tensors.clone(), extents });
        }
        let mut crc32 = Vec::new();
        for f in &index.files {
            let parsed = f.crc32.as_deref().map(|c| {
                u32::from_str_radix(c, 16)
                    .map_err(|_| corrupt(format!("file `{}` has crc32 \"{c}\", not 8 hex digits", f.name)))
            });
            crc32.push(parsed.transpose()?);
        }
        Ok(Source {
            files: index.files.iter().map(|f| dir.join(&f.name)).collect(),
            sizes: index.files.iter().map(|f| Some(f.bytes)).collect(),
            verified: index.files.iter().map(|_| std::sync::OnceLock::new()).collect(),
            crc32,
            units,
        })
    }

    /// A format-1 checkpoint: the Hugging Face model files plus `optimizer/exp_avg.safetensors`
    /// and `optimizer/exp_avg_sq.safetensors`, whole tensors by Hugging Face name.
    fn open_format1(dir: &Path, spec: &ModelSpec) -> Result<Source, CheckpointError> {
        let optimizer = dir.join(OPTIMIZER);
        let state_files = [model_files(dir)?, vec![optimizer.join(EXP_AVG)], vec![optimizer.join(EXP_AVG_SQ)]];
        let mut files: Vec<PathBuf> = Vec::new();
        // Per state: tensor name -> (file, entry).
        let mut by_name: [HashMap<String, (usize, tensor_file::Entry)>; 3] = Default::default();
        for (s, paths) in state_files.iter().enumerate() {
            for path in paths {
                let entries = tensor_file::read_header(path)?;
                let file = files.len();
                files.push(path.clone());
                for (name, entry) in entries {
                    if spec.tie_word_embeddings && name == "lm_head.weight" {
                        continue; // transformers ignores a stored head of a tied model, and so do we
                    }
                    if tensor_file::kind_of(entry.dtype).is_none() {
                        let found = format!("{:?}", entry.dtype);
                        let path = path.display().to_string();
                        return Err(WeightsError::Dtype { path, tensor: name, found }.into());
                    }
                    if by_name[s].insert(name.clone(), (file, entry)).is_some() {
                        let origin = dir.display().to_string();
                        return Err(WeightsError::Duplicate { origin, tensor: name }.into());
                    }
                }
            }
            let found: Vec<(String, Vec<i64>)> =
                by_name[s].iter().map(|(n, (_, e))| (n.clone(), e.shape.iter().map(|&d| d as i64).collect())).collect();
            let origin = if paths.len() == 1 { paths[0].display().to_string() } else { dir.display().to_string() };
            check_tensors(&ModelWeights::shapes(spec), &found, &origin)?;
        }
        let units = model_units(spec, 1)
            .into_iter()
            .map(|u| {
                let extents = [0, 1, 2].map(|s| {
                    flat_offsets(&u.tensors)
                        .map(|(name, shape, offset)| {
                            let (file, e) = &by_name[s][name];
                            let kind = tensor_file::kind_of(e.dtype).expect("checked above");
                            Extent { start: offset, len: shape.iter().product(), file: *file, byte: e.begin, kind }
                        })
                        .collect()
                });
                SourceUnit { name: u.id.key(), numel: u.numel, tensors: u.tensors.clone(), extents }
            })
            .collect();
        let n = files.len();
        Ok(Source {
            sizes: vec![None; n],
            crc32: vec![None; n],
            verified: (0..n).map(|_| std::sync::OnceLock::new()).collect(),
            files,
            units,
        })
    }

    /// The units' tensors (Hugging Face names and shapes) in flattening order, by unit.
    pub fn unit_tensors(&self, unit: usize) -> &[(String, Vec<i64>)] {
        &self.units[unit].tensors
    }

    /// Fills `dest` (1-D, any device and float kind) with elements `[start, start + len)` of one
    /// state of unit `unit`; elements past the unit's end (ZeRO padding) are left as they are.
    /// Reads straight into host memory when it can, else through a 64 MiB buffer. A NaN or
    /// infinity among them is an error: training from it would stop at its first step.
    pub fn read(&self, unit: usize, state: State, start: i64, dest: &Tensor) -> Result<(), CheckpointError> {
        let u = &self.units[unit];
        let end = (start + dest.numel() as i64).min(u.numel);
        let s = State::ALL.iter().position(|&x| x == state).unwrap_or_else(|| unreachable!("every state is in ALL"));
        for e in &u.extents[s] {
            let (lo, hi) = (start.max(e.start), end.min(e.start + e.len));
            if lo >= hi {
                continue;
            }
            let (file, path) = (self.open_file(e.file)?, &self.files[e.file]);
            let elt = e.kind.elt_size_in_bytes() as u64;
            let byte = |at: i64| e.byte + (at - e.start) as u64 * elt;
            let non_finite = |t: &Tensor| -> Result<(), CheckpointError> {
                // fp32 (the state's kind) is counted in place: libtorch's isfinite would make a
                // temporary the size of the shard, on top of the peak a load may hold.
                let count = if t.kind() == Kind::Float && t.device() == Device::Cpu {
                    host_values::<f32>(t).iter().filter(|v| !v.is_finite()).count() as i64
                } else {
                    t.isfinite().logical_not().sum(Kind::Int64).int64_value(&[])
                };
                if count == 0 {
                    return Ok(());
                }
                let what = format!("unit `{}`'s {} (elements {lo}..{hi})", u.name, state.name());
                Err(CheckpointError::NonFiniteState { path: path.display().to_string(), what, count })
            };
            if dest.device() == Device::Cpu && dest.kind() == e.kind && dest.is_contiguous() {
                let mut part = dest.narrow(0, lo - start, hi - lo);
                read_at(&file, path, byte(lo), host_bytes_mut(&mut part))?;
                non_finite(&part)?;
                continue;
            }
            let mut at = lo;
            while at < hi {
                let n = (hi - at).min(CHUNK);
                let mut buf = Tensor::empty([n], (e.kind, Device::Cpu));
                read_at(&file, path, byte(at), host_bytes_mut(&mut buf))?;
                non_finite(&buf)?;
                dest.narrow(0, at - start, n).copy_(&buf);
                at += n;
            }
        }
        Ok(())
    }

    /// File `i`, after checking it has the size the index gives it and, the first time, its
    /// checksum.
    fn open_file(&self, i: usize) -> Result<File, CheckpointError> {
        let path = &self.files[i];
        let file = File::open(path).map_err(io_err(path))?;
        if let Some(expected) = self.sizes[i] {
            let len = file.metadata().map_err(io_err(path))?.len();
            if len != expected {
                return Err(CheckpointError::Corrupt {
                    path: path.display().to_string(),
                    message: format!("{len} bytes, but the checkpoint's index says {expected}"),
                });
            }
        }
        if let (Some(expected), None) = (self.crc32[i], self.verified[i].get()) {
            let found = tensor_file::file_crc32(path)?;
            if found != expected {
                return Err(CheckpointError::Checksum { path: path.display().to_string(), expected, found });
            }
            let _ = self.verified[i].set(());
        }
        Ok(file)
    }
}

/// The safetensors files of a Hugging Face model folder: those its index names (which must be
/// plain file names inside the folder), or `model.safetensors`.
fn model_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Ok(vec![single]);
        }
        return Err(WeightsError::NotFound { path: dir.display().to_string() }.into());
    }
    let bad = |problem: String| WeightsError::Index { path: index.display().to_string(), problem };
    let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map: BTreeMap<String, String> = json
        .get("weight_map")
        .cloned()
        .and_then(|m| serde_json::from_value(m).ok())
        .ok_or_else(|| bad("has no `weight_map` object of file names".into()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let plain = !file.is_empty() && Path::new(&file).file_name() == Some(file.as_ref()) && file != "..";
        if !plain {
            return Err(bad(format!(
                "weight_map[\"{tensor}\"] = \"{file}\" is not a file name inside {}",
                dir.display()
            ))
            .into());
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Every tensor of `expected` must be among `found` with its shape, and nothing else.
fn check_tensors(
    expected: &[(String, Vec<i64>)],
    found: &[(String, Vec<i64>)],
    origin: &str,
) -> Result<(), CheckpointError> {
    let found: HashMap<&str, &Vec<i64>> = found.iter().map(|(n, s)| (n.as_str(), s)).collect();
    for (name, shape) in expected {
        if let Some(&got) = found.get(name.as_str()) {
            if got != shape {
                let (tensor, expected, found) = (name.clone(), shape.clone(), got.clone());
                return Err(WeightsError::Shape { origin: origin.to_string(), tensor, expected, found }.into());
            }
        }
    }
    let mut missing: Vec<String> =
        expected.iter().filter(|(n, _)| !found.contains_key(n.as_str())).map(|(n, _)| n.clone()).collect();
    let mut unexpected: Vec<String> =
        found.keys().filter(|n| !expected.iter().any(|(e, _)| e == *n)).map(|n| n.to_string()).collect();
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    missing.sort();
    unexpected.sort();
    Err(WeightsError::Names { origin: origin.to_string(), missing, unexpected }.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_ranges_tile_the_unit() {
        for (numel, world) in [(10, 3), (10, 1), (3, 8), (64, 4)] {
            let mut at = 0;
            for r in 0..world {
                let (start, len) = saved_range(numel, r, world);
                assert!(start == at && len >= 0, "numel {numel}, world {world}, rank {r}");
                at += len;
            }
            assert_eq!(at, numel);
        }
        // At stage 3 the slice is the rank's shard of the padded unit, less the padding.
        assert_eq!(saved_range(10, 2, 3), (8, 2));
        assert_eq!(saved_range(3, 5, 8), (3, 0));
    }
}
