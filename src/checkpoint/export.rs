//! `ulysses export`: a checkpoint (either format) as a Hugging Face model folder, streamed tensor
//! by tensor in 64 MiB pieces, so memory stays bounded whatever the model's size:
//!
//! ```text
//! OUT/config.json                          the checkpoint's, with the export's dtype
//! OUT/model.safetensors                    or model-0000i-of-0000n.safetensors + model.safetensors.index.json
//! OUT/tokenizer.json ...                   whichever tokenizer files the checkpoint has
//! OUT/ulysses-export.json                  what was exported from where: marks the folder as ulysses' own
//! ```
//! The run's `final/` is made by the same code, its output files shared out over the ranks
//! (`write_part`), then published by rank 0 (`finish`). Either way the folder is written as
//! `OUT.tmp-<id>` and renamed into place; an existing OUT is replaced only when it is ulysses'
//! own (an earlier export, or the symbolic link older versions made), never a user's folder.
use super::commit::{fsync, write_synced};
use super::index::Source;
use super::tensor_file::{dtype_of, Layout, Writer};
use super::*;
use crate::comm::Collective;
use crate::model::spec::ModelSpec;
use crate::model::weights::tokenizer_files;
use crate::parallel::zero::State;
use crate::units::bytes;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// The file that marks a folder as an export of ulysses.
pub const MARKER: &str = "ulysses-export.json";
/// transformers' default largest weight file (`max_shard_size="5GB"`, decimal).
pub const HF_MAX_SHARD_BYTES: u64 = 5_000_000_000;
const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
/// Elements converted at a time.
const CHUNK: i64 = 16 << 20;

/// How to export.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    /// `Kind::Float` or `Kind::BFloat16`.
    pub dtype: Kind,
    /// Largest weight file; a tensor larger than that gets a file of its own. Hugging Face's
    /// default is 5 GB.
    pub max_shard_bytes: u64,
}

/// A checkpoint opened for export: its model, where its numbers are, and the output files.
pub struct Export {
    checkpoint: PathBuf,
    state: RunState,
    source: Source,
    options: ExportOptions,
    /// Per output file: its layout and, per tensor, (unit, flat offset, elements).
    files: Vec<(String, Layout, Vec<(usize, i64, i64)>)>,
}

impl Export {
    pub fn open(checkpoint: &Path, options: ExportOptions) -> Result<Export, CheckpointError> {
        if !checkpoint.join(COMPLETE).is_file() {
            return Err(CheckpointError::Incomplete { path: checkpoint.display().to_string() });
        }
        let state = read_state(checkpoint)?;
        let spec = ModelSpec::from_hf_config(&checkpoint.join(CONFIG)).map_err(|e| CheckpointError::Mismatch {
            path: checkpoint.display().to_string(),
            message: e.to_string(),
        })?;
        let source = Source::open(checkpoint, &spec, state.format)?;
        let elt = options.dtype.elt_size_in_bytes() as u64;
        // Tensors in the model's order, grouped into files of at most max_shard_bytes.
        let mut groups: Vec<Vec<(String, Vec<i64>, (usize, i64, i64))>> = vec![Vec::new()];
        let mut group_bytes = 0;
        for unit in 0..crate::parallel::zero::model_units(&spec, 1).len() {
            let mut offset = 0;
            for (name, shape) in source.unit_tensors(unit) {
                let numel: i64 = shape.iter().product();
                let size = numel as u64 * elt;
                let current = groups.last().map_or(0, Vec::len);
                if options.max_shard_bytes > 0 && current > 0 && group_bytes + size > options.max_shard_bytes {
                    groups.push(Vec::new());
                    group_bytes = 0;
                }
                group_bytes += size;
                let group = groups.last_mut().unwrap_or_else(|| unreachable!("starts with one group"));
                group.push((name.clone(), shape.clone(), (unit, offset, numel)));
                offset += numel;
            }
        }
        let n = groups.len();
        let dtype = dtype_of(options.dtype);
        let files = groups
            .into_iter()
            .enumerate()
            .map(|(i, group)| {
                let name =
                    if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
                let layout = Layout::new(
                    group.iter().map(|(t, shape, _)| (t.clone(), dtype, shape.iter().map(|&d| d as usize).collect())),
                );
                (name, layout, group.into_iter().map(|(_, _, r)| r).collect())
            })
            .collect();
        Ok(Export { checkpoint: checkpoint.to_path_buf(), state, source, options, files })
    }

    /// The step of the exported checkpoint.
    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// Writes the weight files `i` with `i % parts == part` into `dir` (which exists), so that
    /// `parts` processes share the work.
    pub fn write_part(&self, dir: &Path, part: usize, parts: usize) -> Result<(), CheckpointError> {
        let n = self.files.len();
        for (i, (name, layout, tensors)) in self.files.iter().enumerate().skip(part).step_by(parts.max(1)) {
            let path = dir.join(name);
            let mut w = Writer::create(&path, layout)?;
            let buf = Tensor::empty([CHUNK], (Kind::Float, Device::Cpu));
            for &(unit, offset, numel) in tensors {
                let mut at = 0;
                while at < numel {
                    let k = (numel - at).min(CHUNK);
                    let piece = buf.narrow(0, 0, k);
                    self.source.read(unit, State::Master, offset + at, &piece)?;
                    w.write_tensor(&piece.to_kind(self.options.dtype))?;
                    at += k;
                }
            }
            let size = w.finish()?.bytes;
            log::info!("export: wrote {} ({}, file {} of {n})", path.display(), bytes(size as f64), i + 1);
        }
        Ok(())
    }

    /// Once every part is written into `dir`: the index, config.json, the tokenizer files and the
    /// marker; then `dir` replaces `out` (see `replace_own`).
    pub fn finish(&self, dir: &Path, out: &Path) -> Result<(), CheckpointError> {
        let mut weight_map = BTreeMap::new();
        let mut total = 0;
        for (name, layout, _) in &self.files {
            for (tensor, _) in layout.tensors() {
                weight_map.insert(tensor.to_string(), name.clone());
            }
            total += layout.data_bytes();
            fsync(&dir.join(name))?;
        }
        if self.files.len() > 1 {
            let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
            write_json(&dir.join(INDEX_FILE), &index)?;
        }
        let dtype = dtype_name(self.options.dtype);
        write_config(&self.checkpoint.join(CONFIG), dir, self.options.dtype)?;
        publish(&self.checkpoint, &tokenizer_files(&self.checkpoint), self.state.step, self.options.dtype, dir, out)?;
        log::info!(
            "export: {} holds step {} of {} ({dtype}, {} in {} file(s))",
            out.display(),
            self.state.step,
            self.checkpoint.display(),
            bytes(total as f64),
            self.files.len()
        );
        Ok(())
    }
}

/// Writes the model's `config.json` (the one at `from`) into `dir`, saying the files hold `dtype`.
pub(super) fn write_config(from: &Path, dir: &Path, dtype: Kind) -> Result<(), CheckpointError> {
    let text = std::fs::read_to_string(from).map_err(io_err(from))?;
    let mut config: serde_json::Value = serde_json::from_str(&text).map_err(|e| CheckpointError::Mismatch {
        path: from.display().to_string(),
        message: format!("not valid JSON: {e}"),
    })?;
    // transformers 4.x reads `torch_dtype`, 5.x `dtype`: both say what the files hold.
    config["torch_dtype"] = dtype_name(dtype).into();
    config["dtype"] = dtype_name(dtype).into();
    write_json(&dir.join(CONFIG), &config)
}

/// Finishes an export of step `step` of `source` written into `dir`: the tokenizer files
/// `tokenizer` (path, name), the marker, then `dir` replaces `out` (see `replace_own`).
pub(super) fn publish(
    source: &Path,
    tokenizer: &[(PathBuf, &str)],
    step: u64,
    dtype: Kind,
    dir: &Path,
    out: &Path,
) -> Result<(), CheckpointError> {
    for (from, name) in tokenizer {
        let to = dir.join(name);
        crate::files::copy(from, &to).map_err(io_err(&to))?;
        fsync(&to)?;
    }
    let marker = serde_json::json!({
        "checkpoint": source.display().to_string(),
        "step": step,
        "dtype": dtype_name(dtype),
        "ulysses_version": env!("CARGO_PKG_VERSION"),
    });
    write_json(&dir.join(MARKER), &marker)?;
    fsync(dir)?;
    replace_own(dir, out)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n";
    write_synced(path, text.as_bytes())
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        _ => "float32",
    }
}

/// The whole export in this process: `checkpoint` as a Hugging Face folder at `out`.
pub fn export(checkpoint: &Path, out: &Path, options: ExportOptions) -> Result<(), CheckpointError> {
    check_replaceable(out)?;
    let export = Export::open(checkpoint, options)?;
    let tmp = new_temporary(out)?;
    export.write_part(&tmp, 0, 1)?;
    export.finish(&tmp, out)
}

/// The folder this process writes an export to `out` into, new and empty (after removing what
/// interrupted exports left).
pub(super) fn new_temporary(out: &Path) -> Result<PathBuf, CheckpointError> {
    let tmp = temporary(out, std::process::id() as i64);
    remove_temporaries(out)?;
    // A new folder, never one (or a link) already at that name.
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    Ok(tmp)
}

/// The run's `final/`: the export of `checkpoint` to `out` with its weight files shared out over
/// the ranks of `world` (collective); `job` names the temporary folder alike on every rank.
pub fn export_collective(
    checkpoint: &Path,
    out: &Path,
    options: ExportOptions,
    job: i64,
    world: &dyn Collective,
) -> Result<(), CheckpointError> {
    let root = world.rank() == 0;
    let tmp = temporary(out, job);
    if root {
        check_replaceable(out)?;
        remove_temporaries(out)?;
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    }
    world.barrier()?;
    let export = Export::open(checkpoint, options)?;
    export.write_part(&tmp, world.rank(), world.size())?;
    world.barrier()?;
    if root {
        export.finish(&tmp, out)?;
    }
    world.barrier()?;
    Ok(())
}

/// The step of the checkpoint that the export at `out` holds (None: no export there).
pub fn exported_step(out: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(out.join(MARKER)).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("step")?.as_u64()
}

/// Where an export to `out` is written before it is renamed into place, by job `job`.
pub fn temporary(out: &Path, job: i64) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    out.with_file_name(format!("{name}.tmp-{job}"))
}

/// Removes the `OUT.tmp-<id>` and `OUT.old-<id>` folders an interrupted export left behind
/// (names only ulysses makes).
pub fn remove_temporaries(out: &Path) -> Result<(), CheckpointError> {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else { return Ok(()) };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(()) };
    let name = name.to_string_lossy().to_string();
    for entry in entries.flatten() {
        let other = entry.file_name().to_string_lossy().to_string();
        let id = other.strip_prefix(&name).and_then(|r| r.strip_prefix(".tmp-").or_else(|| r.strip_prefix(".old-")));
        if id.is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())) {
            log::info!("removing {} (left by an export that did not finish)", entry.path().display());
            std::fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
        }
    }
    Ok(())
}

/// What is at `out` now, and whether an export may replace it.
enum Existing {
    Nothing,
    /// An empty folder, an earlier export, or the link into `checkpoints/` that ulysses made
    /// before exports existed.
    Own,
}

fn existing(out: &Path) -> Result<Existing, CheckpointError> {
    let meta = match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        other => other.map_err(io_err(out))?,
    };
    let refuse = |what: String| {
        Err(CheckpointError::Final(format!(
            "{} {what}, so ulysses will not replace it; move it away (or export to another folder)",
            out.display()
        )))
    };
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(out).map_err(io_err(out))?;
        if target.starts_with(CHECKPOINTS) && target.components().count() == 2 {
            return Ok(Existing::Own);
        }
        return refuse(format!("is a symbolic link to {}, not one ulysses made", target.display()));
    }
    if !meta.is_dir() {
        return refuse("is a file".into());
    }
    let empty = std::fs::read_dir(out).map_err(io_err(out))?.next().is_none();
    if empty || out.join(MARKER).is_file() {
        return Ok(Existing::Own);
    }
    refuse(format!("is a folder that ulysses did not export (it has no {MARKER})"))
}

/// Fails unless an export may be written to `out` (nothing there, or ulysses' own).
pub fn check_replaceable(out: &Path) -> Result<(), CheckpointError> {
    existing(out).map(drop)
}

/// Renames the finished export `dir` to `out`, replacing what is there only if it is ulysses'
/// own: the old one is renamed aside first, so `out` is always a whole export.
fn replace_own(dir: &Path, out: &Path) -> Result<(), CheckpointError> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let aside = out.with_file_name(format!(
        "{}.old-{}",
        out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        std::process::id()
    ));
    match existing(out)? {
        Existing::Nothing => {}
        Existing::Own if std::fs::symlink_metadata(out).is_ok_and(|m| m.file_type().is_symlink()) => {
            // Only the link goes, never what it points at.
            std::fs::remove_file(out).map_err(io_err(out))?;
        }
        Existing::Own => std::fs::rename(out, &aside).map_err(io_err(out))?,
    }
    std::fs::rename(dir, out).map_err(io_err(out))?;
    fsync(parent)?;
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(io_err(&aside))?;
    }
    Ok(())
}

/// The dtype a checkpoint was trained in (`train.dtype` of its experiment), the export's default.
pub fn training_dtype(checkpoint: &Path) -> Result<Kind, CheckpointError> {
    let state = read_state(checkpoint)?;
    let config: toml::Value = toml::from_str(&state.config_toml).unwrap_or(toml::Value::Table(Default::default()));
    let bf16 = config.get("train").and_then(|t| t.get("dtype")).and_then(|d| d.as_str()) == Some("bf16");
    Ok(if bf16 { Kind::BFloat16 } else { Kind::Float })
}

/// A size such as `5GB` (10^9 bytes, as Hugging Face counts), `500MB`, `2GiB` or `123` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => {
            return Err(format!("unknown unit `{other}` in `{text}`; use e.g. 5GB, 500MB, 2GiB or a number of bytes"))
        }
    };
    let n: f64 = number.parse().map_err(|_| format!("`{text}` is not a size; use e.g. 5GB, 500MB or 2GiB"))?;
    Ok((n * factor) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_hugging_face_counts_them() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5 kb"), Ok(1500));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn only_ulysses_own_folders_and_links_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("final");
        assert!(matches!(existing(&out), Ok(Existing::Nothing)));
        std::os::unix::fs::symlink("checkpoints/step-000004", &out).unwrap();
        assert!(matches!(existing(&out), Ok(Existing::Own)), "the link older versions made");
        std::fs::remove_file(&out).unwrap();
        std::os::unix::fs::symlink("/etc", &out).unwrap();
        assert!(existing(&out).is_err(), "a link elsewhere is the user's");
        std::fs::remove_file(&out).unwrap();
        std::fs::create_dir(&out).unwrap();
        assert!(matches!(existing(&out), Ok(Existing::Own)), "an empty folder");
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = existing(&out).err().unwrap().to_string();
        assert!(e.contains("did not export") && e.contains("move it away"), "{e}");
        let tmp = temporary(&out, 7);
        std::fs::create_dir(&tmp).unwrap();
        assert!(replace_own(&tmp, &out).is_err());
        assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine", "the user's folder is untouched");
        std::fs::write(out.join(MARKER), "{}").unwrap();
        std::fs::write(tmp.join("new"), "").unwrap();
        replace_own(&tmp, &out).unwrap();
        assert!(out.join("new").exists() && !tmp.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing left beside it");
    }
}
